/** The interop vectors the gridq Python code made (scripts/make_vectors.py), read once. */
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";

const here = (name: string): string => fileURLToPath(new URL(`./vectors/${name}`, import.meta.url));

export const vectors: any = JSON.parse(readFileSync(here("vectors.json"), "utf8"));
export const plans: any = JSON.parse(readFileSync(here("plans.json"), "utf8"));

export function fromHex(text: string): Uint8Array {
  return Uint8Array.from(text.match(/../g) ?? [], (h) => parseInt(h, 16));
}

export function fromB64(text: string): Uint8Array {
  return new Uint8Array(Buffer.from(text, "base64"));
}
