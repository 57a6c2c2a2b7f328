/** Byte encodings as the Python side writes them: base64 (standard and URL-safe, both padded) and
 * lowercase hex. Decoding is strict: a malformed encoding is an InvalidRequest, not garbage bytes. */
import { InvalidRequest } from "./errors.js";
import { sodium } from "./sodium.js";

export function b64(data: Uint8Array): string {
  const s = sodium();
  return s.to_base64(data, s.base64_variants.ORIGINAL);
}

export function unb64(text: string, what = "value"): Uint8Array {
  const s = sodium();
  try {
    return s.from_base64(text, s.base64_variants.ORIGINAL);
  } catch {
    throw new InvalidRequest(`${what} is not valid base64`);
  }
}

/** Python's `base64.urlsafe_b64encode` (padded): keys and envelope signatures. */
export function b64url(data: Uint8Array): string {
  const s = sodium();
  return s.to_base64(data, s.base64_variants.URLSAFE);
}

export function unb64url(text: string, what = "value"): Uint8Array {
  const s = sodium();
  try {
    return s.from_base64(text, s.base64_variants.URLSAFE);
  } catch {
    throw new InvalidRequest(`${what} is not valid URL-safe base64`);
  }
}

export function hex(data: Uint8Array): string {
  return sodium().to_hex(data);
}

export function unhex(text: string, what = "value"): Uint8Array {
  if (!/^(?:[0-9a-fA-F]{2})*$/.test(text)) throw new InvalidRequest(`${what} is not hex`);
  return sodium().from_hex(text);
}

export function concat(...parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

/** Fresh random bytes from libsodium's CSPRNG (the platform's: getRandomValues or the OS). */
export function randomBytes(length: number): Uint8Array {
  return sodium().randombytes_buf(length);
}

/** `secrets.token_hex(16)` / `uuid4().hex`: 32 random hex digits. */
export function randomHex(bytes = 16): string {
  return hex(randomBytes(bytes));
}
