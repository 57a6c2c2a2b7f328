/**
 * Interop with the Python side, on vectors its own code made (test/vectors/vectors.json):
 * keys, the exact bytes an envelope's signature covers, sealed boxes, tensors, fixed point, the
 * gateway's listing and the MPC pool's digests and signed shares.
 */
import { describe, expect, it } from "vitest";
import {
  cardDigest,
  canonicalCard,
  decodeTensor,
  encodeTensor,
  FixedPoint,
  float,
  Identity,
  inputLabel,
  openListing,
  openSigned,
  pack,
  PublicIdentity,
  pyDumps,
  queryDigest,
  sealEnvelope,
  signedBytes,
  StaleMessage,
  Tensor,
  verifySignedCard,
  type DType,
  type Query,
  BadSignature,
  unpack,
} from "../src/index.js";
import { parseCard } from "../src/mpc.js";
import { fromB64, fromHex, vectors } from "./vectors.js";

function identity(name: string): Identity {
  const v = vectors.identities[name];
  return new Identity(name, fromHex(v.signing_seed_hex), fromHex(v.box_secret_hex));
}

const hex = (data: Uint8Array): string => Buffer.from(data).toString("hex");

describe("identities", () => {
  it("derive the same public key text from the same secrets", () => {
    for (const name of Object.keys(vectors.identities)) {
      expect(identity(name).public.text()).toBe(vectors.identities[name].public_key);
    }
  });

  it("read and write Python's key files", () => {
    const v = vectors.identities.alice;
    const me = Identity.fromJson(v.key_file);
    expect(me.public.text()).toBe(v.public_key);
    expect(me.toJson()).toBe(v.key_file);
  });

  it("parse public key text, and refuse what is not one", () => {
    const text = vectors.identities.hospital.public_key;
    expect(PublicIdentity.parse("hospital", text).text()).toBe(text);
    expect(() => PublicIdentity.parse("x", text.replace("gridq1:", "gridq2:"))).toThrow(/must start with/);
    expect(() => PublicIdentity.parse("x", "gridq1:AAAA")).toThrow(/64 bytes/);
    expect(() => Identity.fromJson(text)).toThrow(/public key/);
  });
});

describe("Python's JSON text", () => {
  it("writes floats as Python's repr does", () => {
    for (const { value, text } of vectors.floats) expect(pyDumps(float(value))).toBe(text);
  });

  it("writes strings as json.dumps does (ensure_ascii)", () => {
    for (const { value, text } of vectors.strings) expect(pyDumps(value)).toBe(text);
  });

  it("writes ints, bigints and nested values", () => {
    expect(pyDumps({ b: [1, 2.5, true, null, 2n ** 62n], a: { "é": "x" } }, true)).toBe(
      '{"a":{"\\u00e9":"x"},"b":[1,2.5,true,null,4611686018427387904]}',
    );
    expect(pyDumps(1e21)).toBe("1e+21"); // no exact int in JavaScript: the float it is
    expect(pyDumps(2 ** 53 - 1)).toBe("9007199254740991");
    expect(pyDumps(-0)).toBe("-0.0");
  });
});

describe("envelopes", () => {
  const alice = identity("alice");

  it("sign the very bytes Python signs, with the very signature", () => {
    for (const v of vectors.envelopes) {
      const env = v.envelope;
      expect(new TextDecoder().decode(signedBytes(env))).toBe(v.signed_bytes);
      const mine = sealEnvelope(alice, {
        recipient: env.recipient, kind: env.kind, jobId: env.job_id, body: v.body, now: env.issued_at,
        ttl: env.expires_at - env.issued_at, nonce: env.nonce,
      });
      expect(mine.body).toBe(env.body);
      expect(mine.signature).toBe(env.signature); // Ed25519 is deterministic: same bytes, same signature
    }
  });
});

describe("sealed boxes", () => {
  it("open what Python sealed", () => {
    const alice = identity("alice");
    for (const v of vectors.sealed) {
      expect(hex(alice.unseal(fromB64(v.sealed_b64)))).toBe(hex(fromB64(v.plaintext_b64)));
    }
  });

  it("refuse what was sealed to another key, or altered", () => {
    const v = vectors.sealed[1];
    expect(() => identity("hospital").unseal(fromB64(v.sealed_b64))).toThrow(BadSignature);
    const altered = fromB64(v.sealed_b64);
    altered[40] = (altered[40] as number) ^ 1;
    expect(() => identity("alice").unseal(altered)).toThrow(BadSignature);
  });
});

describe("tensors", () => {
  it("decode Python's safetensors bytes and encode them byte for byte", () => {
    for (const v of vectors.tensors) {
      const bytes = fromB64(v.bytes_b64);
      const t = decodeTensor(bytes);
      expect(t.dtype).toBe(v.dtype);
      expect(t.shape).toEqual(v.shape);
      const values = t.values().map((x) => (typeof x === "bigint" ? x.toString() : x));
      expect(values).toEqual(v.values);
      expect(hex(encodeTensor(t))).toBe(hex(bytes));
      const rebuilt = Tensor.fromFlat(v.values.map((x: unknown) => (typeof x === "string" ? BigInt(x) : x)), v.shape, v.dtype as DType);
      expect(hex(encodeTensor(rebuilt))).toBe(hex(bytes));
    }
  });

  it("refuse bytes that are not one allowed tensor", () => {
    const good = fromB64(vectors.tensors[0].bytes_b64);
    expect(() => decodeTensor(good.subarray(0, good.length - 1))).toThrow(/safetensors/);
    expect(() => decodeTensor(new Uint8Array(4))).toThrow(/too short/);
    expect(() => decodeTensor(pack({ t: Tensor.of([1]), u: Tensor.of([2]) }))).toThrow(/exactly one/);
    expect(() => decodeTensor(pack({ t: Tensor.full([2], 0) }), 1)).toThrow(/limit/);
  });
});

describe("fixed point", () => {
  it("encodes and decodes as protocol.mpc.ring.FixedPoint (ties to even)", () => {
    for (const v of vectors.fixed_point.slice(0, -1)) {
      const fp = new FixedPoint(v.frac_bits);
      const encoded = fp.encode(v.values);
      expect(Array.from(encoded, (x) => x.toString())).toEqual(v.encoded);
      expect(Array.from(fp.decode(encoded))).toEqual(v.decoded);
    }
  });

  it("refuses what does not fit, and wraps modulo 2^64", () => {
    const last = vectors.fixed_point.at(-1);
    expect(last.too_big_2_47_at_16).toBe(true);
    expect(() => new FixedPoint(16).encode([2 ** 47])).toThrow(/do not fit/);
    const ring = BigInt64Array.of(2n ** 63n - 1n);
    ring[0] = (ring[0] as bigint) + 1n;
    expect(ring[0]?.toString()).toBe(last.wrap_max_plus_one[0]);
  });
});

describe("the gateway's node listing", () => {
  const v = vectors.listing;
  const gateway = PublicIdentity.parse("gateway", v.gateway_public_key);

  it("is read when the gateway signed it and it is recent", () => {
    const listing = openListing(v.posted, gateway, { now: v.issued_at + 5 });
    expect(listing.nodes.map((n) => n.node)).toEqual(["hospital", "company"]);
    expect(listing.nodes[0]?.public_key).toBe(vectors.identities.hospital.public_key);
  });

  it("is refused when stale, older than one read, or signed by another key", () => {
    expect(() => openListing(v.posted, gateway, { now: v.issued_at + 61 })).toThrow(StaleMessage);
    expect(() => openListing(v.posted, gateway, { now: v.issued_at, newerThan: v.issued_at + 1 })).toThrow(StaleMessage);
    expect(() => openListing(v.posted, identity("hospital").public, { now: v.issued_at })).toThrow(BadSignature);
    const forged = JSON.parse(v.posted);
    forged.listing = forged.listing.replace("hospital", "hospita1");
    expect(() => openListing(JSON.stringify(forged), gateway, { now: v.issued_at })).toThrow(BadSignature);
  });
});

describe("MPC digests, signatures and shares", () => {
  const m = vectors.mpc;
  const signedCard = JSON.parse(m.entry.card);

  it("derive a card's canonical form and digest as Python does, and check its owner's signature", () => {
    const card = parseCard(signedCard.card);
    expect(canonicalCard(card)).toBe(m.card_canonical);
    expect(cardDigest(card)).toBe(m.card_digest);
    expect(verifySignedCard(signedCard, identity("company").public).name).toBe("risk");
    expect(() => verifySignedCard(signedCard, identity("alice").public)).toThrow(/other than the one known here/);
    const tampered = { ...signedCard, card: { ...signedCard.card, queriers: {} } };
    expect(() => verifySignedCard(tampered)).toThrow(BadSignature);
  });

  it("sign a query with the signature Python makes", () => {
    const q = m.query as Query;
    expect(hex(queryDigest(q))).toBe(m.query_digest_hex);
    expect(hex(identity("alice").sign(queryDigest(q)))).toBe(m.query_signature);
  });

  it("open an input share Python sealed and signed, bound to its query and party", () => {
    const blob = fromB64(m.input_sealed_signed_b64);
    const data = openSigned(identity("hospital"), identity("alice").public, m.input_label, blob);
    expect(hex(data)).toBe(hex(fromB64(m.pack_x_b64)));
    const x = unpack(data).tensors["x"] as Tensor;
    expect(x.values().map(String)).toEqual(m.input_share);
    expect(hex(pack({ x }))).toBe(hex(data));
    expect(() => openSigned(identity("hospital"), identity("alice").public, inputLabel(m.query.id, "other"), blob))
      .toThrow(BadSignature);
  });
});
