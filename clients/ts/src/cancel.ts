/**
 * The signed cancellation of a job (Python's `protocol/cancel.py`): what a requester's
 * `ticket.cancel()` puts under the job's key `gridq:cancel:<job id>` with `SET NX`, racing the
 * node, which sets the same key to `started` when it takes the job up. The node runs nothing of a
 * job whose key holds its sender's cancellation for that job.
 *
 * Mark: `"cancel " + name + " " + base64(Ed25519 signature of "gridq cancel v1\0" + job id)`
 * (standard base64, padded). The statement is domain-separated: no other signature passes for one.
 *
 * Through the HTTP edge, `ticket.cancel()` hands its mark to `POST /v1/jobs/{id}/cancel`: the edge
 * checks it against the signer's key and that the signer sent the job, then sets the key (`SET NX`).
 */
import { b64, concat, unb64 } from "./bytes.js";
import { GridError } from "./errors.js";
import type { Identity, PublicIdentity } from "./identity.js";
import { utf8 } from "./pyjson.js";

/** What the node writes under a job's cancel key when it takes the job up. */
export const STARTED = "started";
const PREFIX = "cancel";
const DOMAIN = utf8("gridq cancel v1\0");

function statement(jobId: string): Uint8Array {
  return concat(DOMAIN, utf8(jobId));
}

/** `identity`'s signed cancellation of `jobId`, as it is kept under the job's key. */
export function cancellation(identity: Identity, jobId: string): string {
  return `${PREFIX} ${identity.name} ${b64(identity.sign(statement(jobId)))}`;
}

/** Who a cancellation says it is from ("" if `mark` is not one): for messages only. */
export function signer(mark: string | null | undefined): string {
  const parts = (mark ?? "").split(" ");
  return parts.length === 3 && parts[0] === PREFIX ? (parts[1] as string).slice(0, 64) : "";
}

/** Whether `mark` (what a job's key holds) is `key`'s signed cancellation of `jobId`. */
export function cancelledBy(mark: string | null | undefined, key: PublicIdentity, jobId: string): boolean {
  const parts = (mark ?? "").split(" ");
  if (parts.length !== 3 || parts[0] !== PREFIX || parts[1] !== key.name) return false;
  try {
    key.verify(statement(jobId), unb64(parts[2] as string, "cancellation"));
  } catch (exc) {
    if (exc instanceof GridError) return false;
    throw exc;
  }
  return true;
}
