/**
 * Signed envelopes, as Python's `protocol/envelope.py`: every job and reply is one. An envelope
 * names its protocol version, sender, recipient, kind and job id, carries a fresh nonce, an issue
 * time and an expiry, and a body (JSON text, parsed only after the signature checks out). The
 * Ed25519 signature covers every other field, as the bytes of
 * `json.dumps(fields, sort_keys=True, separators=(",", ":"))` — reproduced here by `pyDumps`,
 * with both times written as Python floats.
 *
 * {@link openEnvelope} refuses, each with its own error: another protocol major version, a
 * malformed envelope, an unknown sender, a bad signature, a wrong recipient, an expired (or
 * future-dated) message, an answer to another job, and a replayed nonce.
 */
import { b64url, randomHex, unb64url } from "./bytes.js";
import {
  BadSignature,
  IncompatibleProtocol,
  InvalidRequest,
  LimitExceeded,
  MessageExpired,
  MisdirectedReply,
  ReplayedNonce,
  UnknownSender,
  WrongRecipient,
} from "./errors.js";
import type { Identity, PublicIdentity } from "./identity.js";
import { float, pyDumps, type PyJson, utf8 } from "./pyjson.js";

export const PROTOCOL_VERSION = "1.0";
export const MAX_BODY_CHARS = 2 * 1024 * 1024;
export const MAX_TTL_SECONDS = 24 * 3600;
export const CLOCK_SKEW_SECONDS = 60;
/** How long a job this client signs stays valid (Python's default). */
export const DEFAULT_TTL_SECONDS = 600;

/** An envelope as it travels (Python's `Envelope.model_dump(mode="json")`). */
export interface Envelope {
  readonly v: string;
  readonly sender: string;
  readonly recipient: string;
  readonly kind: string;
  readonly job_id: string;
  readonly nonce: string;
  readonly issued_at: number;
  readonly expires_at: number;
  readonly body: string;
  readonly signature: string;
}

/** The bytes the signature covers: every field but the signature, keys sorted, times as floats. */
export function signedBytes(env: Omit<Envelope, "signature">): Uint8Array {
  const fields: PyJson = {
    v: env.v, sender: env.sender, recipient: env.recipient, kind: env.kind, job_id: env.job_id,
    nonce: env.nonce, issued_at: float(env.issued_at), expires_at: float(env.expires_at), body: env.body,
  };
  return utf8(pyDumps(fields, true));
}

/** Seconds since the epoch, as Python's `time.time()`. */
export function now(): number {
  return Date.now() / 1000;
}

export interface SealOptions {
  recipient: string;
  kind: string;
  jobId: string;
  /** The body: a value written as Python's `json.dumps` would (see `pyDumps`). */
  body: PyJson;
  now?: number;
  ttl?: number;
  /** A fixed nonce, for test vectors only; by default 16 fresh random bytes in hex. */
  nonce?: string;
}

/** Build and sign an envelope from `identity` (Python's `seal_envelope`). */
export function sealEnvelope(identity: Identity, options: SealOptions): Envelope {
  const text = pyDumps(options.body);
  if (codePoints(text) > MAX_BODY_CHARS) {
    throw new LimitExceeded(`message body of ${codePoints(text)} characters exceeds ${MAX_BODY_CHARS}`);
  }
  const issued = options.now ?? now();
  const unsigned = {
    v: PROTOCOL_VERSION,
    sender: identity.name,
    recipient: options.recipient,
    kind: options.kind,
    job_id: options.jobId,
    nonce: options.nonce ?? randomHex(16),
    issued_at: issued,
    expires_at: issued + Math.min(options.ttl ?? DEFAULT_TTL_SECONDS, MAX_TTL_SECONDS),
    body: text,
  };
  checkFields(unsigned);
  return { ...unsigned, signature: b64url(identity.sign(signedBytes(unsigned))) };
}

/** Remembers nonces until their envelope expires. */
export interface NonceStore {
  /** True if the nonce is new, or was seen before under this same delivery id (the same reply
   * read again — a ticket polled twice — is not a replay). */
  remember(sender: string, nonce: string, deliveryId: string, expiresAt: number): boolean;
}

/** A process-local nonce store. Nonces are forgotten once their envelope has expired: an
 * expired envelope is refused before its nonce is looked at, so it cannot be replayed. */
export class MemoryNonceStore implements NonceStore {
  private readonly seen = new Map<string, { deliveryId: string; expiresAt: number }>();
  private lastSweep = 0;

  constructor(private readonly clock: () => number = now) {}

  get size(): number {
    return this.seen.size;
  }

  remember(sender: string, nonce: string, deliveryId: string, expiresAt: number): boolean {
    this.forgetExpired(this.clock());
    const key = `${sender}\u0000${nonce}`;
    const seen = this.seen.get(key);
    if (seen !== undefined) return seen.deliveryId === deliveryId;
    this.seen.set(key, { deliveryId, expiresAt });
    return true;
  }

  forgetExpired(at: number): void {
    if (at - this.lastSweep < 5 && this.seen.size < 10_000) return; // a sweep every few seconds is plenty
    this.lastSweep = at;
    for (const [key, entry] of this.seen) if (entry.expiresAt < at) this.seen.delete(key);
  }
}

export interface OpenOptions {
  /** Who the reader is: the envelope must be addressed to it. */
  recipient: string;
  /** The keys a sender may have: one entry, the node asked, for a reply. */
  keyring: ReadonlyMap<string, PublicIdentity>;
  nonces: NonceStore;
  deliveryId: string;
  now?: number;
  /** The job the reader asked about: an answer signed for another job is refused before its
   * nonce is remembered. */
  jobId?: string;
}

/** Verify an envelope as received from the wire and return it, or throw why not. */
export function openEnvelope(raw: unknown, options: OpenOptions): Envelope {
  const at = options.now ?? now();
  if (isRecord(raw) && "v" in raw && major(String(raw["v"])) !== major(PROTOCOL_VERSION)) {
    throw new IncompatibleProtocol(
      `message speaks protocol ${String(raw["v"]).slice(0, 16)}, this side speaks ${PROTOCOL_VERSION}`,
      { jobId: String(raw["job_id"] ?? "").slice(0, 80) || undefined },
    );
  }
  const env = parseEnvelope(raw);
  const key = options.keyring.get(env.sender);
  if (key === undefined) {
    throw new UnknownSender(`'${env.sender}' is not a sender this client expects here`, { jobId: env.job_id });
  }
  let signature: Uint8Array;
  try {
    signature = unb64url(env.signature);
  } catch {
    signature = new Uint8Array(0);
  }
  try {
    key.verify(signedBytes(env), signature);
  } catch (exc) {
    throw new BadSignature((exc as Error).message, { jobId: env.job_id });
  }
  if (env.recipient !== options.recipient) {
    throw new WrongRecipient(`message is addressed to '${env.recipient}', not '${options.recipient}'`, {
      jobId: env.job_id,
    });
  }
  if (env.expires_at < at || env.expires_at - env.issued_at > MAX_TTL_SECONDS) {
    throw new MessageExpired(`message expired ${(at - env.expires_at).toFixed(1)} s ago; send the job again`, {
      jobId: env.job_id,
    });
  }
  if (env.issued_at > at + CLOCK_SKEW_SECONDS) {
    throw new MessageExpired(`message is issued ${(env.issued_at - at).toFixed(0)} s in the future; check the clocks`, {
      jobId: env.job_id,
    });
  }
  if (options.jobId !== undefined && env.job_id !== options.jobId) {
    throw new MisdirectedReply(
      `the answer given for job ${options.jobId} is '${env.sender}''s signed answer to job ${env.job_id}: refused ` +
        "(something between this client and the node moved it)",
      { jobId: options.jobId },
    );
  }
  if (!options.nonces.remember(env.sender, env.nonce, options.deliveryId, env.expires_at)) {
    throw new ReplayedNonce(`nonce ${env.nonce.slice(0, 8)}… of '${env.sender}' was already used`, {
      jobId: env.job_id,
    });
  }
  return env;
}

/** The envelope's body, parsed (after it is verified). */
export function bodyJson(env: Envelope): unknown {
  try {
    return JSON.parse(env.body);
  } catch (exc) {
    throw new InvalidRequest(`envelope body is not JSON: ${String(exc)}`, { jobId: env.job_id });
  }
}

const FIELDS = ["v", "sender", "recipient", "kind", "job_id", "nonce", "issued_at", "expires_at", "body", "signature"];
const NAME_FIELD = /^[A-Za-z0-9_.-]{1,64}$/;

/** The envelope's shape, checked as strictly as Python's pydantic model (extra fields forbidden). */
function parseEnvelope(raw: unknown): Envelope {
  if (!isRecord(raw)) throw new InvalidRequest("malformed envelope: envelope: not an object");
  const extra = Object.keys(raw).filter((k) => !FIELDS.includes(k));
  if (extra.length) throw new InvalidRequest(`malformed envelope: ${extra[0]}: Extra inputs are not permitted`);
  const env = { signature: "", ...raw } as Record<string, unknown>;
  checkFields(env);
  return env as unknown as Envelope;
}

function checkFields(env: Record<string, unknown>): void {
  const text = (field: string, min: number, max: number, pattern?: RegExp): void => {
    const value = env[field];
    if (typeof value !== "string") throw new InvalidRequest(`malformed envelope: ${field}: not a string`);
    const n = codePoints(value);
    if (n < min || n > max || (pattern !== undefined && !pattern.test(value))) {
      throw new InvalidRequest(`malformed envelope: ${field}: invalid`);
    }
  };
  text("v", 0, 16);
  text("sender", 1, 64, NAME_FIELD);
  text("recipient", 1, 64, NAME_FIELD);
  text("kind", 0, 64);
  text("job_id", 1, 80);
  text("nonce", 16, 64);
  text("body", 0, MAX_BODY_CHARS);
  if ("signature" in env) text("signature", 0, 128);
  for (const field of ["issued_at", "expires_at"]) {
    const value = env[field];
    if (typeof value !== "number" || !Number.isFinite(value)) {
      throw new InvalidRequest(`malformed envelope: ${field}: not a finite number`);
    }
  }
}

function codePoints(text: string): number {
  // what Python's len() counts: a surrogate pair is one character
  let n = text.length;
  for (let i = 0; i < text.length - 1; i++) {
    const c = text.charCodeAt(i);
    if (c >= 0xd800 && c < 0xdc00) {
      const d = text.charCodeAt(i + 1);
      if (d >= 0xdc00 && d < 0xe000) {
        n -= 1;
        i += 1;
      }
    }
  }
  return n;
}

function major(version: string): string {
  return version.split(".", 1)[0] as string;
}

export function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}
