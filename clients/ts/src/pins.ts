/**
 * Trust on first use for the gateway's key, as ssh's known_hosts (Python's `protocol/pinning.py`).
 * Without a `gatewayKey` from the grid's operator, the key an edge first presents is pinned under
 * the edge's address, and a different one later is refused with GatewayKeyChanged. (A key pinned
 * by the caller is better: on first contact the edge could present any key.)
 */
import { sha256 } from "@noble/hashes/sha2.js";
import { b64 } from "./bytes.js";
import { utf8 } from "./pyjson.js";

/** Where gateway keys are pinned, one per edge address. */
export interface GatewayPins {
  /** What a person is told to look at (a file, the browser's storage). */
  readonly where: string;
  pinned(address: string): Promise<string | undefined>;
  /** Pin `key` for `address` unless one is pinned already; the key pinned now. */
  pin(address: string, key: string): Promise<string>;
}

/** Pins for this process's (or page's) life only. */
export class MemoryPins implements GatewayPins {
  readonly where = "this process's memory";
  private readonly pins = new Map<string, string>();

  async pinned(address: string): Promise<string | undefined> {
    return this.pins.get(address);
  }

  async pin(address: string, key: string): Promise<string> {
    if (!this.pins.has(address)) this.pins.set(address, key);
    return this.pins.get(address) as string;
  }
}

/** A key's short form for people to compare, as Python's `fingerprint`: `SHA256:<base64>`. */
export function fingerprint(key: string): string {
  return "SHA256:" + b64(sha256(utf8(key))).replace(/=+$/, "");
}
