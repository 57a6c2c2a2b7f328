/**
 * Reply verification on replies Python signed (test/vectors): genuine ones open, and a relay that
 * forges, replays, moves or redirects one is refused — as orchestrator/transport.py refuses them.
 */
import { describe, expect, it } from "vitest";
import {
  BadSignature,
  bodyJson,
  decodeTensor,
  IncompatibleProtocol,
  Identity,
  InvalidRequest,
  MemoryNonceStore,
  MessageExpired,
  MisdirectedReply,
  openEnvelope,
  openSealedValue,
  PublicIdentity,
  ReplayedNonce,
  UnknownSender,
  WrongRecipient,
  type OpenOptions,
} from "../src/index.js";
import { parseGatewayReply, parseJobReply } from "../src/messages.js";
import { fromB64, fromHex, vectors } from "./vectors.js";

const r = vectors.replies;
const alice = new Identity("alice", fromHex(vectors.identities.alice.signing_seed_hex), fromHex(vectors.identities.alice.box_secret_hex));
const hospital = PublicIdentity.parse("hospital", vectors.identities.hospital.public_key);
const gateway = PublicIdentity.parse("gateway", vectors.identities.gateway.public_key);

function options(overrides: Partial<OpenOptions> = {}): OpenOptions {
  return { recipient: "alice", keyring: new Map([["hospital", hospital]]), nonces: new MemoryNonceStore(() => r.now),
    deliveryId: r.job_id, jobId: r.job_id, now: r.now, ...overrides };
}

describe("a node's genuine reply", () => {
  it("opens, and its DP value unseals to what the node computed", async () => {
    const env = openEnvelope(r.dp_done, options());
    const reply = parseJobReply(bodyJson(env), r.job_id);
    expect(reply.status).toBe("done");
    expect(reply.noise?.mechanism).toBe("laplace");
    const plain = await openSealedValue(reply.value!, alice, async () => new Uint8Array());
    expect(decodeTensor(plain).numbers()).toEqual(r.dp_value);
  });

  it("read twice under the same delivery is not a replay (a ticket polled again)", () => {
    const o = options();
    openEnvelope(r.parked, o);
    expect(parseJobReply(bodyJson(openEnvelope(r.parked, o))).status).toBe("pending_approval");
  });

  it("by claim-check: the bytes must be the ones the signed reply names", async () => {
    const o = options({ deliveryId: r.claim_checked_job_id, jobId: r.claim_checked_job_id });
    const reply = parseJobReply(bodyJson(openEnvelope(r.claim_checked, o)));
    const blob = fromB64(r.claim_checked_blob_b64);
    const plain = await openSealedValue(reply.value!, alice, async () => blob);
    expect(decodeTensor(plain).numbers()).toEqual([0, 1, 2, 3]);
    // bytes sealed to alice by anyone (her key is public) put under the key: refused
    const other = alice.public.seal(plain);
    await expect(openSealedValue(reply.value!, alice, async () => other)).rejects.toThrow(BadSignature);
  });
});

describe("a relay cannot", () => {
  it("forge or alter a reply", () => {
    const body = JSON.parse(r.dp_done.body);
    body.noise.epsilon = 10;
    expect(() => openEnvelope({ ...r.dp_done, body: JSON.stringify(body) }, options())).toThrow(BadSignature);
    expect(() => openEnvelope({ ...r.dp_done, expires_at: r.dp_done.expires_at + 1000 }, options())).toThrow(BadSignature);
    const stranger = Identity.generate("hospital");
    expect(() => openEnvelope(r.dp_done, options({ keyring: new Map([["hospital", stranger.public]]) }))).toThrow(BadSignature);
  });

  it("replay a reply under another job's delivery", () => {
    const nonces = new MemoryNonceStore(() => r.now);
    openEnvelope(r.dp_done, options({ nonces }));
    expect(() => openEnvelope(r.dp_done, options({ nonces, deliveryId: "hospital:" + "0".repeat(32) }))).toThrow(ReplayedNonce);
  });

  it("answer one job with the node's reply to another", () => {
    const other = "hospital:" + "9".repeat(32);
    expect(() => openEnvelope(r.dp_done, options({ jobId: other, deliveryId: other }))).toThrow(MisdirectedReply);
  });

  it("hand one user's reply to another", () => {
    expect(() => openEnvelope(r.dp_done, options({ recipient: "bob" }))).toThrow(WrongRecipient);
  });

  it("pass off a reply from a sender that was not asked", () => {
    expect(() => openEnvelope(r.dp_done, options({ keyring: new Map([["clinic", hospital]]) }))).toThrow(UnknownSender);
  });

  it("serve an expired reply, or one dated in the future", () => {
    expect(() => openEnvelope(r.dp_done, options({ now: r.dp_done.expires_at + 1 }))).toThrow(MessageExpired);
    expect(() => openEnvelope(r.dp_done, options({ now: r.dp_done.issued_at - 61 }))).toThrow(MessageExpired);
  });

  it("slip in another protocol or a malformed envelope", () => {
    expect(() => openEnvelope({ ...r.dp_done, v: "2.0" }, options())).toThrow(IncompatibleProtocol);
    expect(() => openEnvelope({ ...r.dp_done, extra: 1 }, options())).toThrow(InvalidRequest);
    expect(() => openEnvelope({ ...r.dp_done, issued_at: "now" }, options())).toThrow(InvalidRequest);
    expect(() => openEnvelope(null, options())).toThrow(InvalidRequest);
  });
});

describe("the gateway's search answer", () => {
  it("opens for anyone, bound to its job", () => {
    const o = options({ recipient: "public", keyring: new Map([["gateway", gateway]]), deliveryId: r.search_job_id, jobId: r.search_job_id });
    const reply = parseGatewayReply(bodyJson(openEnvelope(r.search, o)));
    expect(reply.datasets[0]?.name).toBe("birth-records-feb");
    expect(reply.nodes[0]?.public_key).toBe(vectors.identities.hospital.public_key);
  });

  it("is refused when signed by a node, not the gateway", () => {
    const o = options({ recipient: "public", keyring: new Map([["gateway", hospital]]), deliveryId: r.search_job_id, jobId: r.search_job_id });
    expect(() => openEnvelope(r.search, o)).toThrow(BadSignature);
  });
});
