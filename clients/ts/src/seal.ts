/**
 * Sealed values: what a node releases (sealed to the one requester, inline or by claim-check),
 * and the signed-and-sealed blobs of the MPC pool (`protocol/mpc/wire.py` `seal_signed`).
 *
 * A sealed box says nothing of who sealed it, and whoever can write a claim-check key (the edge,
 * the broker) could put other bytes sealed to the same reader under it: so a node's signed reply
 * carries the bytes' SHA-256, and {@link openSealedValue} refuses anything else.
 */
import { sha256 } from "@noble/hashes/sha2.js";
import { concat, hex, unb64, unhex } from "./bytes.js";
import { BadSignature, InvalidRequest } from "./errors.js";
import type { Identity, PublicIdentity } from "./identity.js";
import { utf8 } from "./pyjson.js";
import { sodium } from "./sodium.js";

/** A released value as a node's reply carries it (Python's `protocol.messages.SealedValue`). */
export interface SealedValue {
  readonly sealed?: string | null;
  readonly claim_check?: string | null;
  readonly sha256?: string | null;
  readonly size?: number;
}

export const CLAIM_CHECK_PREFIX = "gridq:blob:";
/** Sealed values above this many bytes travel by claim-check (Python's `CLAIM_CHECK_THRESHOLD`). */
export const CLAIM_CHECK_THRESHOLD = 256 * 1024;
const BLOB_KEY = /^gridq:blob:[A-Za-z0-9_-]{16,64}$/;

export function sha256Hex(data: Uint8Array): string {
  return hex(sha256(data));
}

/** BLAKE2b-256 (libsodium's generichash; Python's `hashlib.blake2b(digest_size=32)`). */
export function blake2b256(data: Uint8Array): Uint8Array {
  return sodium().crypto_generichash(32, data, null);
}

export function isBlobKey(key: string): boolean {
  return BLOB_KEY.test(key);
}

/**
 * The plaintext of a released value sealed to `me`: inline, or fetched by `claim` from its
 * claim-check key and refused unless its SHA-256 is the one the signed reply names.
 */
export async function openSealedValue(
  value: SealedValue,
  me: Identity,
  claim: (key: string) => Promise<Uint8Array>,
  jobId?: string,
): Promise<Uint8Array> {
  let sealed: Uint8Array;
  if (value.claim_check != null) {
    if (!isBlobKey(value.claim_check)) throw new InvalidRequest(`'${value.claim_check}' is not a claim-check key`, { jobId });
    const data = await claim(value.claim_check);
    if (value.sha256 == null || sha256Hex(data) !== value.sha256) {
      throw new BadSignature(
        `the value under '${value.claim_check}' is not the one the signed message names (replaced on the way?); refused`,
        { jobId },
      );
    }
    sealed = data;
  } else {
    sealed = unb64(value.sealed ?? "", "sealed value");
  }
  return me.unseal(sealed);
}

function labelled(label: string, data: Uint8Array): Uint8Array {
  return blake2b256(concat(utf8(label), new Uint8Array([0]), data));
}

/** `data` for `recipient`'s eyes only, signed by `sender` for `label` (bundle or query, and party):
 * a share copied to another place does not open there. */
export function sealSigned(sender: Identity, recipient: PublicIdentity, label: string, data: Uint8Array): Uint8Array {
  return recipient.seal(concat(sender.sign(labelled(label, data)), data));
}

/** The data of a {@link sealSigned} blob, if `sender` signed it for `label` (BadSignature otherwise). */
export function openSigned(me: Identity, sender: PublicIdentity, label: string, blob: Uint8Array): Uint8Array {
  const plain = me.unseal(blob);
  const signature = plain.subarray(0, 64);
  const data = plain.subarray(64);
  sender.verify(labelled(label, data), signature);
  return data;
}

/** Hex signature text → bytes (an InvalidRequest if it is not hex). */
export function signatureBytes(text: string, what: string): Uint8Array {
  return unhex(text, what);
}
