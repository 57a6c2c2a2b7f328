/**
 * Encrypted ML-as-a-service, the querier's side (Python's `orchestrator/mpc.py` with
 * `protocol/mpc/{ring,sharing,cards,wire}.py`): list the models served secret-shared, and query
 * one so that nobody but you sees the input or the output.
 *
 * A query's input is encoded in fixed point over the ring Z_2^64 (BigInt64Array: its arithmetic
 * wraps modulo 2^64), split into additive shares — one per party, each sealed to that party and
 * signed for this query — and the parties' output shares come back sealed to you; their sum,
 * decoded, is the model's output.
 */
import { hex, randomBytes, randomHex, unhex } from "./bytes.js";
import { isRecord } from "./envelope.js";
import { InvalidRequest, PermissionDenied } from "./errors.js";
import type { Identity } from "./identity.js";
import { PublicIdentity } from "./identity.js";
import { float, pyDumps, type PyJson, utf8 } from "./pyjson.js";
import { blake2b256, sealSigned } from "./seal.js";
import { concat } from "./bytes.js";
import { pack } from "./codec.js";
import { Tensor } from "./tensor.js";

export const RING_BITS = 64;
const LIMIT = 2 ** (RING_BITS - 1);

/** Reals as ring elements: x ↦ round(x · 2^f), ties to even (as torch.round). |x| < 2^(63-f). */
export class FixedPoint {
  constructor(readonly fracBits = 16) {
    if (!Number.isInteger(fracBits) || fracBits < 1 || fracBits > 30) {
      throw new InvalidRequest(`frac_bits must be within 1..30, not ${fracBits}`);
    }
  }

  get scale(): number {
    return 2 ** this.fracBits;
  }

  encode(values: ArrayLike<number>): BigInt64Array {
    const out = new BigInt64Array(values.length);
    let largest = 0;
    for (let i = 0; i < values.length; i++) {
      const scaled = roundHalfEven((values[i] as number) * this.scale); // exact: a power-of-two scale
      if (!(Math.abs(scaled) < LIMIT)) largest = Number.isNaN(scaled) ? NaN : Math.max(largest, Math.abs(scaled));
      else out[i] = BigInt(scaled);
    }
    if (largest !== 0) {
      throw new InvalidRequest(`values up to ${largest / this.scale} do not fit in ${RING_BITS}-bit fixed point with ` +
        `${this.fracBits} fractional bits; scale the values down`);
    }
    return out;
  }

  /** Back to reals; `scalePower` 2 for an untruncated product. */
  decode(values: BigInt64Array, scalePower = 1): Float64Array {
    const divisor = this.scale ** scalePower;
    return Float64Array.from(values, (v) => Number(v) / divisor); // Number(bigint): nearest, ties to even
  }
}

export function roundHalfEven(x: number): number {
  const floor = Math.floor(x);
  const rest = x - floor; // exact for a double
  if (rest < 0.5) return floor;
  if (rest > 0.5) return floor + 1;
  return floor % 2 === 0 ? floor : floor + 1;
}

/** Split a ring tensor into `n` additive shares: n-1 uniform, the last the secret minus them. */
export function share(secret: BigInt64Array, n: number, random: (bytes: number) => Uint8Array = randomBytes): BigInt64Array[] {
  if (n < 2) throw new InvalidRequest(`secret sharing needs at least 2 parties, not ${n}`);
  const shares: BigInt64Array[] = [];
  const last = BigInt64Array.from(secret);
  for (let k = 0; k < n - 1; k++) {
    const bytes = random(8 * secret.length);
    const s = new BigInt64Array(bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + 8 * secret.length));
    for (let i = 0; i < secret.length; i++) last[i] = (last[i] as bigint) - (s[i] as bigint); // stores wrap mod 2^64
    shares.push(s);
  }
  return [...shares, last];
}

export function reconstruct(shares: readonly BigInt64Array[]): BigInt64Array {
  const total = BigInt64Array.from(shares[0] as BigInt64Array);
  for (const s of shares.slice(1)) {
    if (s.length !== total.length) throw new InvalidRequest("shares of different sizes cannot be added up");
    for (let i = 0; i < total.length; i++) total[i] = (total[i] as bigint) + (s[i] as bigint);
  }
  return total;
}

// --- model cards ---------------------------------------------------------------------------

export interface Layer {
  readonly kind: "linear" | "relu";
  readonly in_features: number;
  readonly out_features: number;
}

/** What the grid knows of a served model — no number of it — as its owner signed it. */
export interface ModelCard {
  readonly name: string;
  readonly owner: string;
  readonly owner_key: string;
  readonly host: string;
  readonly parties: readonly string[];
  readonly provider: string;
  readonly queriers: Readonly<Record<string, string>>;
  readonly plan: { readonly layers: readonly Layer[]; readonly frac_bits: number };
  readonly issued_at: number;
}

export function qualified(card: ModelCard): string {
  return `${card.owner}/${card.name}`;
}

export function inFeatures(card: ModelCard): number {
  const first = card.plan.layers.find((l) => l.kind === "linear");
  if (first === undefined) throw new InvalidRequest(`model ${qualified(card)} has no linear layer`);
  return first.in_features;
}

/** The bytes a card's signature covers, as Python's `canonical`: sorted keys, no spaces. */
export function canonicalCard(card: ModelCard): string {
  return pyDumps({
    name: card.name, owner: card.owner, owner_key: card.owner_key, host: card.host, parties: [...card.parties],
    provider: card.provider, queriers: { ...card.queriers },
    plan: { layers: card.plan.layers.map((l) => ({ kind: l.kind, in_features: l.in_features, out_features: l.out_features })),
      frac_bits: card.plan.frac_bits },
    issued_at: float(card.issued_at),
  }, true);
}

export function cardDigest(card: ModelCard): string {
  return hex(blake2b256(concat(utf8("gridq-mpc-card\0"), utf8(canonicalCard(card)))));
}

const NAME = /^[A-Za-z0-9_.-]{1,64}$/;
const KEY = /^gridq1:[A-Za-z0-9_\-=]{1,121}$/;
const CARD_FIELDS = ["name", "owner", "owner_key", "host", "parties", "provider", "queriers", "plan", "issued_at"];

/** A card as parsed JSON, checked as strictly as Python's model (extra fields are refused, as
 * pydantic refuses them: the canonical form, hence the signature, depends on every field). */
export function parseCard(raw: unknown): ModelCard {
  const bad = (why: string): never => { throw new InvalidRequest(`malformed model card: ${why}`); };
  if (!isRecord(raw)) return bad("not an object");
  if (Object.keys(raw).some((k) => !CARD_FIELDS.includes(k))) bad("unknown field");
  for (const f of ["name", "owner", "host", "provider"]) if (typeof raw[f] !== "string" || !NAME.test(raw[f] as string)) bad(f);
  if (typeof raw["owner_key"] !== "string" || !KEY.test(raw["owner_key"])) bad("owner_key");
  const parties = raw["parties"];
  if (!Array.isArray(parties) || parties.length < 1 || parties.length > 16 || !parties.every((p) => typeof p === "string" && NAME.test(p))) bad("parties");
  const queriers = raw["queriers"] ?? {};
  if (!isRecord(queriers) || !Object.entries(queriers).every(([k, v]) => NAME.test(k) && typeof v === "string" && KEY.test(v))) bad("queriers");
  const plan = raw["plan"];
  if (!isRecord(plan) || Object.keys(plan).some((k) => k !== "layers" && k !== "frac_bits")) return bad("plan");
  const fracBits = plan["frac_bits"] ?? 16;
  if (!Number.isInteger(fracBits) || (fracBits as number) < 8 || (fracBits as number) > 24) bad("plan.frac_bits");
  const layers = plan["layers"];
  if (!Array.isArray(layers) || layers.length < 1 || layers.length > 64) return bad("plan.layers");
  const parsed = layers.map((l: unknown): Layer => {
    if (!isRecord(l) || (l["kind"] !== "linear" && l["kind"] !== "relu") ||
      Object.keys(l).some((k) => !["kind", "in_features", "out_features"].includes(k))) return bad("plan.layers");
    const feature = (v: unknown): number => (v === undefined ? 0 : Number.isInteger(v) && (v as number) >= 0 && (v as number) <= 65536 ? (v as number) : bad("features"));
    return { kind: l["kind"], in_features: feature(l["in_features"]), out_features: feature(l["out_features"]) };
  });
  const issued = raw["issued_at"] ?? 0;
  if (typeof issued !== "number" || !Number.isFinite(issued) || issued < 0) bad("issued_at");
  return {
    name: raw["name"] as string, owner: raw["owner"] as string, owner_key: raw["owner_key"] as string,
    host: raw["host"] as string, parties: parties as string[], provider: raw["provider"] as string,
    queriers: queriers as Record<string, string>, plan: { layers: parsed, frac_bits: fracBits as number },
    issued_at: issued as number,
  };
}

/**
 * The card of a signed card `{card, signature}`, if its owner's key signed it (BadSignature
 * otherwise) — and, if the caller knows the owner's key (`trusted`), only if the card carries it.
 */
export function verifySignedCard(signed: unknown, trusted?: PublicIdentity): ModelCard {
  if (!isRecord(signed) || typeof signed["signature"] !== "string" || Object.keys(signed).some((k) => k !== "card" && k !== "signature")) {
    throw new InvalidRequest("malformed signed model card");
  }
  const card = parseCard(signed["card"]);
  if (trusted !== undefined && trusted.text() !== card.owner_key) {
    throw new PermissionDenied(`the card of '${qualified(card)}' carries a key for '${card.owner}' other than the one known here: ` +
      "it is not the owner's card");
  }
  PublicIdentity.parse(card.owner, card.owner_key).verify(utf8(cardDigest(card)), unhex(signed["signature"], "card signature"));
  return card;
}

// --- queries -------------------------------------------------------------------------------

export interface Query {
  readonly querier: string;
  readonly owner: string;
  readonly model: string;
  readonly card: string;
  readonly batch: number;
  readonly id: string;
  readonly issued_at: number;
}

function queryJson(q: Query): PyJson {
  return { querier: q.querier, owner: q.owner, model: q.model, card: q.card, batch: q.batch, id: q.id, issued_at: float(q.issued_at) };
}

/** What the querier's signature covers: BLAKE2b-256 of the query's canonical form. */
export function queryDigest(q: Query): Uint8Array {
  return blake2b256(concat(utf8("gridq-mpc-query\0"), utf8(pyDumps(queryJson(q), true))));
}

export function inputLabel(queryId: string, party: string): string {
  return `mpc-input:${queryId}:${party}`;
}

/** What a party's signature on its output share covers: this query, this party (a share only
 * sealed to the querier could have been sealed by anyone who can write a blob). */
export function outputLabel(queryId: string, party: string): string {
  return `mpc-output:${queryId}:${party}`;
}

export interface PreparedQuery {
  readonly query: Query;
  /** The query as it travels (`SignedQuery`): the parties check its signature too. */
  readonly signed: PyJson;
  /** Each party's input share, packed, sealed to it and signed for this query. */
  readonly blobs: ReadonlyMap<string, Uint8Array>;
  readonly fixed: FixedPoint;
  readonly rows: number;
  readonly features: number;
}

/** A batch (rows × features, row-major) as its signed query and sealed input shares. */
export function prepareQuery(me: Identity, card: ModelCard, partyKeys: ReadonlyMap<string, PublicIdentity>,
  values: Float64Array, rows: number, now: number): PreparedQuery {
  const fixed = new FixedPoint(card.plan.frac_bits);
  const features = inFeatures(card);
  const pieces = share(fixed.encode(values), card.parties.length);
  const query: Query = { querier: me.name, owner: card.owner, model: card.name, card: cardDigest(card), batch: rows,
    id: randomHex(16), issued_at: now };
  const blobs = new Map<string, Uint8Array>();
  card.parties.forEach((party, i) => {
    const key = partyKeys.get(party);
    if (key === undefined) throw new InvalidRequest(`no key for party '${party}'`);
    const x = new Tensor("int64", [rows, features], pieces[i] as BigInt64Array);
    blobs.set(party, sealSigned(me, key, inputLabel(query.id, party), pack({ x })));
  });
  const signed = { query: queryJson(query), signature: hex(me.sign(queryDigest(query))) };
  return { query, signed, blobs, fixed, rows, features };
}

/** A query's input as rows × features float64 values: one row (features,) or a batch. */
export function queryInput(x: Tensor | readonly number[] | readonly (readonly number[])[], features: number, name: string): {
  values: Float64Array; rows: number; single: boolean; dtype: "float32" | "float64";
} {
  const t = x instanceof Tensor ? x : Tensor.of(x as number[], "float64");
  if (t.dtype === "bool") throw new InvalidRequest("the query's input must hold real numbers, not bool: pass floats");
  const values = Float64Array.from(t.numbers());
  const bad = values.filter((v) => !Number.isFinite(v)).length;
  if (bad) {
    throw new InvalidRequest(`the query's input holds ${bad} NaN or infinite value(s), which no encrypted computation can carry: ` +
      "replace them and ask again");
  }
  const single = t.ndim === 1;
  const rows = single ? 1 : (t.shape[0] as number);
  if ((t.ndim !== 1 && t.ndim !== 2) || (t.shape[t.ndim - 1] as number) !== features) {
    throw new InvalidRequest(`model '${name}' takes inputs of ${features} features, not shape [${t.shape.join(", ")}]`);
  }
  return { values, rows, single, dtype: t.dtype === "float32" ? "float32" : "float64" };
}
