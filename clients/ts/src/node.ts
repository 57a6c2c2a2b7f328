/**
 * Node-only helpers (`@gridq/client/node`): key files and pins on disk, where the Python client
 * keeps them. Browsers import `@gridq/client` only, which touches no file system.
 *
 *     import { readKey, readPublicKey, FilePins } from "@gridq/client/node";
 *     const alice = await readKey("alice");                  // $GRIDQ_HOME/keys/alice.key
 *     const gatewayKey = await readPublicKey("gateway");     // $GRIDQ_HOME/keys/gateway.pub
 *     const grid = await Grid.connect(url, alice, { gatewayKey });   // or { pins: new FilePins() }
 */
import { promises as fs } from "node:fs";
import { homedir } from "node:os";
import { dirname, join } from "node:path";
import { InvalidRequest, NotFound } from "./errors.js";
import { Identity, PublicIdentity } from "./identity.js";
import type { GatewayPins } from "./pins.js";
import { ready } from "./sodium.js";

/** `$GRIDQ_HOME`, else `~/.gridq` (as the Python side). */
export function gridqHome(): string {
  const home = process.env["GRIDQ_HOME"];
  return home ? home.replace(/^~(?=$|\/)/, homedir()) : join(homedir(), ".gridq");
}

/** A key file's path: a bare name ("alice") is `$GRIDQ_HOME/keys/alice.key`. */
export function keyPath(identity: string): string {
  if (!identity.includes("/") && !identity.endsWith(".key") && !identity.endsWith(".pub")) {
    return join(gridqHome(), "keys", `${identity}.key`);
  }
  return identity.replace(/^~(?=$|\/)/, homedir());
}

/** The identity in a secret key file, refused if others may read it (as ssh and gridq refuse). */
export async function readKey(identity: string): Promise<Identity> {
  await ready();
  const file = keyPath(identity);
  let text: string;
  let mode: number;
  let uid: number;
  try {
    const stat = await fs.stat(file);
    [mode, uid, text] = [stat.mode, stat.uid, await fs.readFile(file, "utf8")];
  } catch (exc) {
    const error = exc as NodeJS.ErrnoException;
    if (error.code === "ENOENT") throw new NotFound(`no key file at ${file}: create one with \`gridq keys new\``);
    throw new InvalidRequest(`cannot read the key file ${file}: ${error.message}`);
  }
  const mine = typeof process.getuid === "function" && uid === process.getuid();
  if (mine && (mode & 0o077) !== 0) {
    throw new InvalidRequest(`UNPROTECTED KEY FILE: ${file} has mode ${(mode & 0o777).toString(8).padStart(4, "0")}, so ` +
      `others may read the secret key in it; refused. Run \`chmod 600 ${file}\``);
  }
  try {
    return Identity.fromJson(text);
  } catch (exc) {
    throw new InvalidRequest(`${file}: ${(exc as Error).message}`);
  }
}

/** The `gridq1:…` text of a public key file: a bare name ("gateway") is `$GRIDQ_HOME/keys/gateway.pub`
 * (what `gridq up` and `gridq keys new` write), checked to be a key. */
export async function readPublicKey(name: string): Promise<string> {
  await ready();
  const file = !name.includes("/") && !name.endsWith(".pub") ? join(gridqHome(), "keys", `${name}.pub`)
    : name.replace(/^~(?=$|\/)/, homedir());
  let text: string;
  try {
    text = (await fs.readFile(file, "utf8")).trim();
  } catch (exc) {
    const error = exc as NodeJS.ErrnoException;
    if (error.code === "ENOENT") throw new NotFound(`no public key file at ${file}`);
    throw new InvalidRequest(`cannot read the public key file ${file}: ${error.message}`);
  }
  return PublicIdentity.parse(name, text).text();
}

/** Gateway keys pinned per edge in a file (default `$GRIDQ_HOME/known_edges`), one line each:
 * `<edge url> gridq1:…`. The file is its owner's only (0600). */
export class FilePins implements GatewayPins {
  readonly where: string;

  constructor(readonly path: string = join(gridqHome(), "known_edges")) {
    this.where = path;
  }

  async pinned(address: string): Promise<string | undefined> {
    return (await this.read()).get(address);
  }

  async pin(address: string, key: string): Promise<string> {
    const pins = await this.read();
    const pinned = pins.get(address);
    if (pinned !== undefined) return pinned;
    pins.set(address, key);
    await fs.mkdir(dirname(this.path), { recursive: true, mode: 0o700 });
    const text = "# gridq: the gateway key pinned for each edge on first contact\n" +
      [...pins].map(([a, k]) => `${a} ${k}\n`).join("");
    const temporary = `${this.path}.${process.pid}.tmp`;
    await fs.writeFile(temporary, text, { mode: 0o600 });
    await fs.rename(temporary, this.path); // whole or not at all: a reader never sees half a file
    return key;
  }

  private async read(): Promise<Map<string, string>> {
    let text: string;
    try {
      text = await fs.readFile(this.path, "utf8");
    } catch (exc) {
      if ((exc as NodeJS.ErrnoException).code === "ENOENT") return new Map();
      throw exc;
    }
    const pins = new Map<string, string>();
    for (const line of text.split("\n")) {
      const fields = line.trim().split(/\s+/);
      if (fields.length === 2 && !(fields[0] as string).startsWith("#")) pins.set(fields[0] as string, fields[1] as string);
    }
    return pins;
  }
}
