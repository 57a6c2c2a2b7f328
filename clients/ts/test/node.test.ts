/** The Node-only helpers: key files as `gridq keys new` writes them, and pins on disk. */
import { chmod, mkdtemp, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { Identity } from "../src/index.js";
import { FilePins, keyPath, readKey, readPublicKey } from "../src/node.js";

const saved = process.env["GRIDQ_HOME"];
afterEach(() => {
  if (saved === undefined) delete process.env["GRIDQ_HOME"];
  else process.env["GRIDQ_HOME"] = saved;
});

async function home(): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), "gridq-ts-"));
  process.env["GRIDQ_HOME"] = dir;
  return dir;
}

describe("key files", () => {
  it("are read by name from $GRIDQ_HOME/keys, and refused if others may read them", async () => {
    const dir = await home();
    const me = Identity.generate("alice");
    await import("node:fs/promises").then((fs) => fs.mkdir(join(dir, "keys")));
    await writeFile(join(dir, "keys", "alice.key"), me.toJson(), { mode: 0o600 });
    await writeFile(join(dir, "keys", "alice.pub"), me.public.text() + "\n");
    expect(keyPath("alice")).toBe(join(dir, "keys", "alice.key"));
    expect((await readKey("alice")).public.text()).toBe(me.public.text());
    expect(await readPublicKey("alice")).toBe(me.public.text());
    await chmod(join(dir, "keys", "alice.key"), 0o644);
    await expect(readKey("alice")).rejects.toThrow(/UNPROTECTED KEY FILE/);
    await expect(readKey("bob")).rejects.toThrow(/no key file/);
  });
});

describe("file pins", () => {
  it("keep the first key pinned for an edge, across instances", async () => {
    const dir = await home();
    const pins = new FilePins(join(dir, "known_edges"));
    expect(await pins.pin("http://edge/", "gridq1:first")).toBe("gridq1:first");
    expect(await new FilePins(join(dir, "known_edges")).pin("http://edge/", "gridq1:second")).toBe("gridq1:first");
    expect(await pins.pinned("http://other/")).toBeUndefined();
  });
});
