/**
 * The wire test vectors the Python side publishes (protocol/schema/v1/vectors.json, described in
 * protocol/schema/SPEC.md §11), checked with this client's own functions: every vector is either
 * reproduced byte for byte (keys, signed bytes, signatures, tensors, fixed point, shares, digests)
 * or opened (envelopes verified, sealed boxes opened, the gateway's listing read).
 *
 * Sealed boxes are also rebuilt from the ephemeral secret each vector gives, with libsodium's
 * primitives (the client's `seal` draws that secret fresh, as it must). The PRG
 * (`expand`, AES-256-CTR) is no part of the client — a client may share with any CSPRNG (SPEC
 * §8) — so it is written here with node:crypto, checked against the `prg` vector, and then fed
 * to the client's own `share` to reproduce the `additive_shares` vector.
 */
import { createCipheriv } from "node:crypto";
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { describe, expect, it } from "vitest";
import {
  BadSignature,
  blake2b256,
  cardDigest,
  canonicalCard,
  decodeTensor,
  encodeTensor,
  FixedPoint,
  fingerprint,
  Identity,
  inputLabel,
  MemoryNonceStore,
  openEnvelope,
  openListing,
  openSealedValue,
  openSigned,
  pack,
  PublicIdentity,
  queryDigest,
  reconstruct,
  sealEnvelope,
  sha256Hex,
  share,
  signedBytes,
  StaleMessage,
  Tensor,
  unpack,
  verifySignedCard,
  type DType,
  type Envelope,
  type Query,
} from "../src/index.js";
import { b64, b64url, concat, hex, unb64, unb64url, unhex } from "../src/bytes.js";
import { listingSignedPart, nodeKeys } from "../src/listing.js";
import { parseCard } from "../src/mpc.js";
import { utf8 } from "../src/pyjson.js";
import { sodium } from "../src/sodium.js";

const PUBLISHED = fileURLToPath(new URL("../../../protocol/schema/v1/vectors.json", import.meta.url));
const V: any = JSON.parse(readFileSync(PUBLISHED, "utf8"));

/** What this file checks, by top-level key of vectors.json: a new kind of vector fails the test. */
const COVERED = [
  "keys", "envelopes", "tensors", "sealed_value", "sealed_metrics", "fixed_point", "prg", "additive_shares",
  "mpc_query", "node_listing",
];

const text = (data: Uint8Array): string => new TextDecoder().decode(data);

function key(name: string): any {
  const found = V.keys.find((k: any) => k.name === name);
  if (found === undefined) throw new Error(`no key vector for '${name}'`);
  return found;
}

function identity(name: string): Identity {
  const k = key(name);
  return new Identity(name, unhex(k.signing_seed_hex), unhex(k.box_secret_hex));
}

/** libsodium's crypto_box_seal with its ephemeral secret given (SPEC §5). */
function sealWithEphemeral(ephemeral: Uint8Array, recipientBoxKey: Uint8Array, plaintext: Uint8Array): Uint8Array {
  const s = sodium();
  const epk = s.crypto_scalarmult_base(ephemeral);
  const nonce = s.crypto_generichash(24, concat(epk, recipientBoxKey), null);
  return concat(epk, s.crypto_box_easy(plaintext, nonce, recipientBoxKey, ephemeral));
}

/** The MPC PRG (SPEC §8): AES-256-CTR keyed by the seed, the counter block the first 16 bytes of
 * SHA-256(label), counting as one 128-bit big-endian integer (OpenSSL's CTR mode does); the first
 * `bytes` keystream bytes. */
function keystream(seed: Uint8Array, label: string, bytes: number): Uint8Array {
  const counter = unhex(sha256Hex(utf8(label)).slice(0, 32));
  const cipher = createCipheriv("aes-256-ctr", seed, counter);
  return new Uint8Array(Buffer.concat([cipher.update(new Uint8Array(bytes)), cipher.final()]));
}

function expand(seed: Uint8Array, shape: readonly number[], label: string): BigInt64Array {
  const count = shape.reduce((a, b) => a * b, 1);
  const stream = keystream(seed, label, 8 * count);
  return new BigInt64Array(stream.buffer, stream.byteOffset, count); // little-endian, as every platform Node runs on
}

const ring = (values: ArrayLike<bigint>): string[] => Array.from(values, (v) => v.toString());
const bigints = (values: readonly string[]): BigInt64Array => BigInt64Array.from(values, (v) => BigInt(v));

describe("published vectors (protocol/schema/v1/vectors.json)", () => {
  it("are all covered here", () => {
    const kinds = Object.keys(V).filter((k) => !k.startsWith("$") && k !== "description");
    expect(kinds.sort()).toEqual([...COVERED].sort());
  });
});

describe("keys", () => {
  it("has the four fixed identities", () => {
    expect(V.keys.map((k: any) => k.name)).toEqual(["alice", "hospital", "party-a", "gateway"]);
  });

  for (const k of V.keys as any[]) {
    it(`derives '${k.name}' from its seeds: keys, key text, fingerprint, key file`, () => {
      const me = new Identity(k.name, unhex(k.signing_seed_hex), unhex(k.box_secret_hex));
      expect(hex(me.public.verifyKey)).toBe(k.verify_key_hex);
      expect(hex(me.public.boxKey)).toBe(k.box_public_hex);
      expect(me.public.text()).toBe(k.public_key);
      expect(k.public_key).toHaveLength(95);
      expect(fingerprint(me.public.text())).toBe(k.fingerprint);
      expect(me.toJson()).toBe(k.key_file);
      const read = Identity.fromJson(k.key_file);
      expect(read.name).toBe(k.name);
      expect(hex(read.signingKey)).toBe(k.signing_seed_hex);
      expect(hex(read.boxSecret)).toBe(k.box_secret_hex);
      const parsed = PublicIdentity.parse(k.name, k.public_key);
      expect(hex(parsed.verifyKey)).toBe(k.verify_key_hex);
      expect(hex(parsed.boxKey)).toBe(k.box_public_hex);
    });
  }
});

describe("envelopes", () => {
  it("has run_job and unicode_body", () => {
    expect(Object.keys(V.envelopes).sort()).toEqual(["run_job", "unicode_body"]);
  });

  for (const [name, v] of Object.entries(V.envelopes) as [string, any][]) {
    it(`${name}: signed bytes and signature byte for byte, and it verifies`, () => {
      const env = v.envelope as Envelope;
      const sender = PublicIdentity.parse(env.sender, v.sender_public_key);
      expect(sender.text()).toBe(key(env.sender).public_key);
      const signed = signedBytes(env);
      expect(text(signed)).toBe(v.signed_bytes);
      expect(hex(signed)).toBe(v.signed_bytes_hex);
      const signature = identity(env.sender).sign(signed);
      expect(hex(signature)).toBe(v.signature_hex);
      expect(b64url(signature)).toBe(env.signature);
      expect(hex(unb64url(env.signature))).toBe(v.signature_hex);
      sender.verify(signed, signature);
      const opened = openEnvelope(env, {
        recipient: env.recipient, keyring: new Map([[env.sender, sender]]), nonces: new MemoryNonceStore(),
        deliveryId: env.job_id, jobId: env.job_id, now: v.verify_at,
      });
      expect(opened.body).toBe(env.body);
      expect(() => openEnvelope({ ...env, body: env.body + " " }, {
        recipient: env.recipient, keyring: new Map([[env.sender, sender]]), nonces: new MemoryNonceStore(),
        deliveryId: env.job_id, now: v.verify_at,
      })).toThrow(BadSignature);
    });
  }

  it("run_job: sealEnvelope with the vector's nonce and time rebuilds the very envelope", () => {
    const env = V.envelopes.run_job.envelope as Envelope;
    const mine = sealEnvelope(identity(env.sender), {
      recipient: env.recipient, kind: env.kind, jobId: env.job_id, body: JSON.parse(env.body), now: env.issued_at,
      ttl: env.expires_at - env.issued_at, nonce: env.nonce,
    });
    expect(mine).toEqual(env);
  });
});

describe("tensors", () => {
  it("has four", () => expect(V.tensors).toHaveLength(4));

  for (const v of V.tensors as any[]) {
    it(`${v.dtype} [${v.shape.join(", ")}]: decodes to its values and encodes back byte for byte`, () => {
      const bytes = unb64(v.bytes_base64);
      const headerLength = Number(new DataView(bytes.buffer, bytes.byteOffset).getBigUint64(0, true));
      expect(text(bytes.subarray(8, 8 + headerLength))).toBe(v.header);
      const t = decodeTensor(bytes);
      expect(t.dtype).toBe(v.dtype);
      expect(t.shape).toEqual(v.shape);
      expect(t.toArray()).toEqual(v.values);
      expect(hex(encodeTensor(t))).toBe(hex(bytes));
      const built = Tensor.of(v.values, v.dtype as DType);
      expect(built.shape).toEqual(v.shape);
      expect(b64(encodeTensor(built))).toBe(v.bytes_base64);
    });
  }
});

describe("sealed values", () => {
  const v = V.sealed_value;

  it("sealed_value: opens to the tensor's bytes, inline and by claim-check, and rebuilds from its ephemeral key", async () => {
    const me = identity(v.recipient);
    expect(hex(me.boxSecret)).toBe(v.recipient_box_secret_hex);
    expect(hex(me.public.boxKey)).toBe(v.recipient_box_public_hex);
    const sealed = unb64(v.ciphertext_base64);
    const plain = me.unseal(sealed);
    expect(b64(plain)).toBe(v.plaintext_base64);
    expect(sealed.length).toBe(plain.length + 48);
    const t = decodeTensor(plain);
    expect([t.dtype, t.shape, t.toArray()]).toEqual([v.tensor.dtype, v.tensor.shape, v.tensor.values]);
    expect(b64(encodeTensor(Tensor.of(v.tensor.values, v.tensor.dtype)))).toBe(v.plaintext_base64);
    expect(b64(sealWithEphemeral(unhex(v.ephemeral_secret_hex), me.public.boxKey, plain))).toBe(v.ciphertext_base64);

    expect(v.value_inline.sealed).toBe(v.ciphertext_base64);
    expect(v.value_inline.size).toBe(sealed.length);
    const noClaim = async (): Promise<Uint8Array> => { throw new Error("an inline value needs no claim-check"); };
    expect(b64(await openSealedValue(v.value_inline, me, noClaim))).toBe(v.plaintext_base64);

    const byKey = v.value_by_claim_check;
    expect(byKey.sha256).toBe(sha256Hex(sealed));
    expect(byKey.size).toBe(sealed.length);
    const claimed: string[] = [];
    const claim = async (k: string): Promise<Uint8Array> => { claimed.push(k); return sealed; };
    expect(b64(await openSealedValue(byKey, me, claim))).toBe(v.plaintext_base64);
    expect(claimed).toEqual([byKey.claim_check]);
    const other = concat(sealed.subarray(0, 40), new Uint8Array([sealed[40]! ^ 1]), sealed.subarray(41));
    await expect(openSealedValue(byKey, me, async () => other)).rejects.toThrow(BadSignature);
    expect(() => identity("hospital").unseal(sealed)).toThrow(BadSignature);
  });

  it("sealed_metrics: opens to the 512-byte padded TrainMetrics JSON", () => {
    const m = V.sealed_metrics;
    const me = identity(m.recipient);
    expect(hex(me.boxSecret)).toBe(m.recipient_box_secret_hex);
    const sealed = unb64(m.sealed_metrics.sealed);
    const plain = me.unseal(sealed);
    expect(plain.length).toBe(512);
    expect(text(plain)).toBe(m.plaintext);
    expect(JSON.parse(text(plain).trimEnd())).toEqual(m.metrics);
    expect(b64(sealWithEphemeral(unhex(m.ephemeral_secret_hex), me.public.boxKey, plain))).toBe(m.sealed_metrics.sealed);
  });
});

describe("fixed point", () => {
  const v = V.fixed_point;

  it(`encodes the ${V.fixed_point.values.length} values (ties to even) and decodes them`, () => {
    const fp = new FixedPoint(v.frac_bits);
    const encoded = fp.encode(v.values);
    expect(ring(encoded)).toEqual(v.encoded);
    expect(Array.from(encoded, (x) => BigInt.asUintN(64, x).toString())).toEqual(v.encoded_unsigned);
    expect(Array.from(fp.decode(encoded))).toEqual(v.decoded);
    expect(Array.from(fp.decode(bigints(v.encoded)))).toEqual(v.decoded);
    // the half-unit cases: 0.5, 1.5 and -2.5 units round to 0, 2 and -2
    expect(ring(fp.encode(v.values.slice(-3)))).toEqual(["0", "2", "-2"]);
  });
});

describe("the PRG and additive shares", () => {
  it("expand(seed, shape, label) gives each case's counter block and values", () => {
    const seed = unhex(V.prg.seed_hex);
    expect(V.prg.cases).toHaveLength(2);
    for (const c of V.prg.cases) {
      expect(sha256Hex(utf8(c.label)).slice(0, 32)).toBe(c.counter_block_hex);
      expect(ring(expand(seed, c.shape, c.label))).toEqual(c.values);
    }
  });

  it("share() fed the seeds' keystreams gives the published shares, which add up to the secret", () => {
    const v = V.additive_shares;
    const secret = new FixedPoint(v.frac_bits).encode(v.values.flat());
    expect(ring(secret)).toEqual(v.secret);
    const seeds = (v.seeds_hex as string[]).map((s) => unhex(s));
    const shares = share(secret, v.shares.length, (bytes) => {
      const seed = seeds.shift();
      if (seed === undefined) throw new Error("more random draws than seeds");
      return keystream(seed, "", bytes);
    });
    expect(seeds).toHaveLength(0);
    expect(shares.map(ring)).toEqual(v.shares);
    expect(ring(reconstruct(shares))).toEqual(v.secret);
    expect(ring(reconstruct(v.shares.map(bigints)))).toEqual(v.secret);
    const x = new Tensor("int64", v.shape, shares[0]!);
    expect(b64(pack({ x }))).toBe(v.input_share_0_base64);
    expect(ring(unpack(unb64(v.input_share_0_base64)).tensors["x"]!.data as BigInt64Array)).toEqual(v.shares[0]);
  });
});

describe("MPC query", () => {
  const m = V.mpc_query;
  const owner = identity(m.card.owner);
  const querier = identity(m.query.querier);

  it("the card: canonical JSON, digest and the owner's signature", () => {
    const card = parseCard(m.card);
    expect(canonicalCard(card)).toBe(m.card_canonical);
    expect(hex(blake2b256(concat(utf8("gridq-mpc-card\0"), utf8(m.card_canonical))))).toBe(m.card_digest_hex);
    expect(cardDigest(card)).toBe(m.card_digest_hex);
    expect(m.signed_card.card).toEqual(m.card);
    expect(hex(owner.sign(utf8(cardDigest(card))))).toBe(m.signed_card.signature);
    expect(verifySignedCard(m.signed_card, owner.public)).toEqual(card);
    const tampered = { ...m.signed_card, card: { ...m.signed_card.card, provider: "other" } };
    expect(() => verifySignedCard(tampered)).toThrow(BadSignature);
  });

  it("the query: digest over its canonical JSON and the querier's signature", () => {
    const q = m.query as Query;
    expect(q.card).toBe(m.card_digest_hex);
    const digest = queryDigest(q);
    expect(hex(digest)).toBe(m.query_digest_hex);
    expect(hex(blake2b256(concat(utf8("gridq-mpc-query\0"), utf8(m.query_canonical))))).toBe(m.query_digest_hex);
    expect(m.signed_query.query).toEqual(m.query);
    expect(hex(querier.sign(digest))).toBe(m.signed_query.signature);
    querier.public.verify(digest, unhex(m.signed_query.signature));
  });

  it("the input share: opens for its party, signed by the querier for this query, and rebuilds", () => {
    const s = m.input_share;
    const party = identity(s.party);
    expect(hex(party.boxSecret)).toBe(s.party_box_secret_hex);
    expect(inputLabel(m.query.id, s.party)).toBe(s.label);
    const sealed = unb64(s.sealed_base64);
    const data = openSigned(party, querier.public, s.label, sealed);
    expect(b64(data)).toBe(s.data_base64);
    const x = unpack(data).tensors["x"]!;
    expect([x.dtype, x.shape]).toEqual(["int64", s.shape]);
    expect(ring(x.data as BigInt64Array)).toEqual(s.share);
    expect(b64(pack({ x: new Tensor("int64", s.shape, bigints(s.share)) }))).toBe(s.data_base64);
    const digest = blake2b256(concat(utf8(s.label), new Uint8Array([0]), data));
    expect(hex(digest)).toBe(s.digest_hex);
    const rebuilt = sealWithEphemeral(unhex(s.ephemeral_secret_hex), party.public.boxKey, concat(querier.sign(digest), data));
    expect(b64(rebuilt)).toBe(s.sealed_base64);
    expect(() => openSigned(party, querier.public, inputLabel(m.query.id, "party-b"), sealed)).toThrow(BadSignature);
    expect(() => openSigned(party, owner.public, s.label, sealed)).toThrow(BadSignature);
  });
});

describe("the gateway's node listing", () => {
  const v = V.node_listing;
  const gateway = PublicIdentity.parse("gateway", v.gateway_public_key);

  it("signed bytes and signature byte for byte, and it opens at verify_at", () => {
    expect(v.gateway_public_key).toBe(key("gateway").public_key);
    const posted = JSON.parse(v.posted);
    const signed = listingSignedPart(posted.listing);
    expect(text(signed)).toBe(v.signed_bytes);
    expect(hex(identity("gateway").sign(signed))).toBe(posted.signature);
    const listing = openListing(v.posted, gateway, { now: v.verify_at });
    expect(listing).toEqual(JSON.parse(posted.listing));
    expect(nodeKeys(listing.nodes).get("hospital")?.text()).toBe(key("hospital").public_key);
    expect(() => openListing(v.posted, gateway, { now: listing.issued_at + 61 })).toThrow(StaleMessage);
    expect(() => openListing(v.posted, identity("hospital").public, { now: v.verify_at })).toThrow(BadSignature);
  });
});
