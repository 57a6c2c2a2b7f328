/**
 * The Grid's whole flow, offline, against the in-memory grid of fake-edge.ts: connect and trust
 * the gateway, search, raw and DP get, tickets, approvals, errors, claim-checks, the MPC query —
 * and a hostile relay refused at every step.
 */
import { beforeEach, describe, expect, it } from "vitest";
import {
  ApprovalRequired,
  BadSignature,
  BudgetExhausted,
  GatewayKeyChanged,
  Grid,
  GridError,
  Identity,
  MemoryPins,
  MisdirectedReply,
  NotFound,
  PermissionDenied,
  ReplayedNonce,
  StaleMessage,
  WrongRecipient,
  float,
  pack,
  Tensor,
} from "../src/index.js";
import { B, FakeGrid, W } from "./fake-edge.js";

const URL_ = "http://edge.test/";
let fake: FakeGrid;
let alice: Identity;

async function connect(me: Identity = alice, options: Record<string, unknown> = {}): Promise<Grid> {
  return Grid.connect(URL_, me, { fetch: fake.fetch, gatewayKey: fake.gateway.public.text(), timeout: 2, ...options });
}

beforeEach(() => {
  fake = new FakeGrid();
  alice = Identity.generate("alice");
  fake.addUser(alice);
});

describe("connecting", () => {
  it("trusts the pinned gateway key, and learns the nodes' keys from its signed listing", async () => {
    const grid = await connect();
    expect((await grid.nodeKey("hospital")).text()).toBe(fake.node("hospital").public.text());
    await expect(grid.nodeKey("nowhere")).rejects.toThrow(NotFound);
  });

  it("refuses a listing signed by another key than the pinned one", async () => {
    await expect(connect(alice, { gatewayKey: Identity.generate("gateway").public.text() })).rejects.toThrow(BadSignature);
  });

  it("refuses a stale listing", async () => {
    fake.listingAge = 120;
    await expect(connect()).rejects.toThrow(StaleMessage);
  });

  it("trusts on first use, then refuses a changed key", async () => {
    const pins = new MemoryPins();
    await Grid.connect(URL_, alice, { fetch: fake.fetch, pins });
    expect(await pins.pinned(URL_)).toBe(fake.gateway.public.text());
    const impostor = new FakeGrid();
    await expect(Grid.connect(URL_, alice, { fetch: impostor.fetch, pins })).rejects.toThrow(GatewayKeyChanged);
  });
});

describe("use case 1 through the edge", () => {
  it("searches, and gets a mean released raw", async () => {
    const grid = await connect();
    const found = await grid.search("#birth-records", "#february");
    const births = found["hospital"]![0]!;
    expect([births.shape, births.dtype, births.columns, births.tags]).toEqual([[240, 2], "float32", ["weight", "height"],
      ["#february", "#birth-records"]]);
    expect(await grid.search("#no-such-tag")).toEqual({});
    const value = await births.col("weight").mean().get();
    expect(value.item()).toBe(3.25);
    const sent = [...fake.jobs.values()].at(-1)!;
    expect(sent.task).toBe("gridq.node.run_job");
    expect(sent.envelope.job_id).toMatch(/^hospital:[0-9a-f]{32}$/);
    expect(sent.body["release"]).toEqual({ door: "raw" });
  });

  it("gets a DP release, with its noise", async () => {
    const grid = await connect();
    const births = (await grid.search("#birth-records"))["hospital"]![0]!;
    const released = await births.col("weight").clamp(0, 7).mean().get({ epsilon: 0.1 });
    expect(released.item()).toBe(3.25);
    expect(released.noise.mechanism).toBe("laplace");
    expect(String(released)).toMatch(/laplace noise of scale 0.2900, ε=0.1/);
    const gauss = await births.col("weight").mean().get({ epsilon: 1, delta: 1e-7 });
    expect(gauss.noise.mechanism).toBe("gaussian");
    const last = [...fake.jobs.values()].at(-1)!;
    expect(last.envelope.body).toContain('"release":{"door":"dp","epsilon":1.0,"delta":1e-07}');
  });

  it("submits, keeps the result at the node, and picks the ticket up again", async () => {
    const grid = await connect();
    const births = (await grid.search("#birth-records"))["hospital"]![0]!;
    const ticket = await births.index(":", 0).sum().submit();
    expect(await ticket.status()).toBe("done");
    const ptr = await ticket.result();
    expect([ptr.kind, ptr.name, ptr.shape]).toEqual(["object", "obj-1", []]);
    expect(await ptr.mul(float(2)).get()).toBeTruthy();
    const again = await grid.ticket(ticket.id);
    expect((await again.reply()).ticket?.object_id).toBe("obj-1");
    await expect(grid.ticket("hospital:" + "0".repeat(32))).rejects.toThrow(NotFound);
    await expect(grid.ticket("not-an-id")).rejects.toThrow(/not a job id/);
  });

  it("opens a value left by claim-check, and refuses one replaced on the way", async () => {
    const grid = await connect();
    const births = (await grid.search("#birth-records"))["hospital"]![0]!;
    fake.claimCheck = true;
    expect((await births.col("weight").mean().get()).item()).toBe(3.25);
    fake.tamperBlob = (_key, data) => alice.public.seal(alice.unseal(data)); // same value, sealed again by the relay
    await expect(births.col("weight").mean().get()).rejects.toThrow(BadSignature);
  });

  it("raises the node's typed refusal", async () => {
    const grid = await connect();
    const births = (await grid.search("#birth-records"))["hospital"]![0]!;
    fake.refuse = { status: "denied", code: "permission_denied", message: "carol may not see birth-records-feb" };
    await expect(births.get()).rejects.toThrow(PermissionDenied);
    fake.refuse = { status: "denied", code: "budget_exhausted", message: "0.05 left, 0.1 asked" };
    const err = await births.col("weight").mean().get({ epsilon: 0.1 }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(BudgetExhausted);
    expect((err as GridError).code).toBe("budget_exhausted");
    expect((err as GridError).jobId).toMatch(/^hospital:/);
  });

  it("waits on a parked job, says it needs approval, and gets it once approved", async () => {
    const grid = await connect();
    const births = (await grid.search("#birth-records"))["hospital"]![0]!;
    const ticket = await births.requestAccess("thesis on birth weights");
    expect(await ticket.status()).toBe("pending_approval");
    await expect(ticket.wait(0.3)).rejects.toThrow(ApprovalRequired);
    fake.approve(ticket.id);
    expect((await ticket.reply()).status).toBe("done");
  });

  it("reads budgets", async () => {
    const grid = await connect();
    const [budget] = await grid.budget("hospital", "birth-records-feb");
    expect(budget?.spent_epsilon).toBe(0.3);
  });

  it("maps the edge's own errors to typed errors", async () => {
    const grid = await connect();
    await expect(grid.submit("nowhere", "budget", { kind: "budget", dataset: null })).rejects.toThrow(NotFound);
    const offline = await Grid.connect(URL_, alice, { fetch: fake.fetch, gatewayKey: fake.gateway.public.text() });
    (offline.edge as unknown as { fetcher: typeof fetch }).fetcher = async () => { throw new TypeError("fetch failed"); };
    await expect(offline.search("#x")).rejects.toThrow(/cannot be reached/);
  });
});

describe("a hostile relay", () => {
  async function births(grid: Grid) {
    return (await grid.search("#birth-records"))["hospital"]![0]!;
  }

  it("cannot answer one job with the node's answer to another", async () => {
    const grid = await connect();
    const b = await births(grid);
    const first = await b.col("weight").mean().submit();
    await first.wait();
    fake.tamper = (_id, answer) => ({ ...answer, reply: fake.jobs.get(first.id)!.reply });
    await expect(b.col("height").mean().get()).rejects.toThrow(MisdirectedReply);
  });

  it("cannot give alice bob's answer", async () => {
    const bob = Identity.generate("bob");
    fake.addUser(bob);
    const bobs = await connect(bob);
    const bobTicket = await (await births(bobs)).mean().submit();
    await bobTicket.wait();
    const grid = await connect();
    const b = await births(grid);
    fake.tamper = (_id, answer) => ({ ...answer, reply: { ...(fake.jobs.get(bobTicket.id)!.reply as object) } });
    await expect(b.mean().get()).rejects.toThrow(WrongRecipient);
  });

  it("cannot alter a signed answer", async () => {
    const grid = await connect();
    const b = await births(grid);
    fake.tamper = (_id, answer) => {
      const env = answer.reply as Record<string, unknown>;
      return { ...answer, reply: { ...env, body: String(env["body"]).replace('"done"', '"failed"') } };
    };
    await expect(b.mean().get()).rejects.toThrow(BadSignature);
  });

  it("cannot replay an answer under another job", async () => {
    const grid = await connect();
    const b = await births(grid);
    const first = await b.mean().submit();
    await first.wait();
    const stolen = fake.jobs.get(first.id)!.reply as Record<string, unknown>;
    fake.tamper = (id, answer) => ({ ...answer, reply: { ...stolen, job_id: id } });
    await expect(b.mean().get()).rejects.toThrow(BadSignature); // the job id is signed
    // and the same envelope read again for another delivery is a replay
    fake.tamper = undefined;
    const ticket = await grid.ticket(first.id);
    await ticket.wait();
    const { openEnvelope } = await import("../src/index.js");
    expect(() => openEnvelope(stolen, { recipient: "alice", keyring: new Map([["hospital", fake.node("hospital").public]]),
      nonces: (grid as unknown as { nonces: never }).nonces, deliveryId: "hospital:" + "1".repeat(32) })).toThrow(ReplayedNonce);
  });

  it("cannot pass off another search's answer as this one's", async () => {
    const grid = await connect();
    const original = fake.fetch;
    const stale = await (await original("http://edge.test/v1/search", { method: "POST",
      body: JSON.stringify({ tags: ["#birth-records"], words: [], node: null }) })).json();
    const asked: string[] = [];
    let relay = (_jobId: string): unknown => stale;
    (grid.edge as unknown as { fetcher: typeof fetch }).fetcher = async (input, init) => {
      const url = new URL(String(input));
      if (url.pathname !== "/v1/search") return original(input, init);
      asked.push(url.searchParams.get("job_id") ?? "");
      return new Response(JSON.stringify(relay(asked.at(-1) as string)));
    };
    // an earlier answer to another search, or to this very question (it may have changed since: a
    // dataset withdrawn, a node gone), as the relay kept it
    await expect(grid.search("#digits")).rejects.toThrow(MisdirectedReply);
    await expect(grid.search("#birth-records")).rejects.toThrow(MisdirectedReply);
    // filed under this search's id by the relay: the id the gateway signed is still the other one
    relay = (jobId) => ({ ...(stale as object), job_id: jobId });
    await expect(grid.search("#birth-records")).rejects.toThrow(MisdirectedReply);
    // each search asked under a fresh id of the client's own, which the gateway's answer must be signed for
    expect(asked).toHaveLength(3);
    for (const id of asked) expect(id).toMatch(/^[0-9a-f]{32}$/);
    expect(new Set(asked).size).toBe(3);
    relay = (jobId) => ({ job_id: jobId, reply: { ...((stale as { reply: object }).reply), job_id: jobId } });
    await expect(grid.search("#birth-records")).rejects.toThrow(BadSignature); // the job id is signed
    (grid.edge as unknown as { fetcher: typeof fetch }).fetcher = original;
    expect(Object.keys(await grid.search("#birth-records"))).toEqual(["hospital"]);
    expect(fake.requests.filter((r) => r === "POST /v1/search")).toHaveLength(2); // the stale one, and this one
  });
});

describe("use case 3 through the edge", () => {
  it("lists the served model, checked by its owner's and its host's signatures", async () => {
    const grid = await connect();
    const [card] = await grid.models();
    expect([card?.owner, card?.name, card?.host, card?.parties]).toEqual(["dana", "risk", "company", ["hospital", "clinic"]]);
  });

  it("leaves out a card its owner did not sign", async () => {
    const grid = await connect(alice, { trusted: [Identity.generate("dana").public] });
    expect(await grid.models()).toEqual([]);
  });

  it("queries it on shares: the plaintext model's answer within 1e-3", async () => {
    const grid = await connect();
    const x = [0.3, -1.2, 2.5];
    const y = await grid.query("dana/risk", x);
    const expected = W.map((w, o) => Math.max(0, w.reduce((s, wi, i) => s + wi * (x[i] as number), B[o] as number)));
    expect(y.shape).toEqual([2]);
    y.numbers().forEach((v, i) => expect(Math.abs(v - (expected[i] as number))).toBeLessThan(1e-3));
    const batch = await grid.query("risk", [x, [1, 1, 1]]);
    expect(batch.shape).toEqual([2, 2]);
    const job = [...fake.jobs.values()].at(-1)!;
    expect([job.task, job.envelope.recipient, job.envelope.kind]).toEqual(["gridq.mpc.query", "company", "mpc_query"]);
    // the input travels only as sealed shares: no value of it in the body (a substring test
    // would trip on a timestamp such as 1796596640.386)
    const leaves: unknown[] = [];
    const walk = (v: unknown): void => {
      if (v !== null && typeof v === "object") Object.values(v).forEach(walk);
      else leaves.push(v);
    };
    walk(JSON.parse(job.envelope.body));
    for (const xi of [...x, 1]) expect(leaves).not.toContain(xi);
    expect(leaves).toContain(2); // the batch size: the walk does see the numbers
  });

  it("refuses an output share its party did not sign, though it is sealed to the querier", async () => {
    const grid = await connect();
    // whoever can write a blob (the relay; any broker user) swaps a share for one of its own, sealed to alice
    fake.tamperBlob = () => alice.public.seal(pack({ y: new Tensor("int64", [1, 2], new BigInt64Array(2)) }));
    await expect(grid.query("dana/risk", [0.3, -1.2, 2.5])).rejects.toThrow(BadSignature);
  });

  it("refuses inputs it cannot carry, before sending anything", async () => {
    const grid = await connect();
    await expect(grid.query("dana/risk", [1, NaN, 2])).rejects.toThrow(/NaN or infinite/);
    await expect(grid.query("dana/risk", [1, 2])).rejects.toThrow(/3 features/);
    await expect(grid.query("dana/other", [1, 2, 3])).rejects.toThrow(NotFound);
  });
});

describe("the README's quickstart", () => {
  it("runs as written (against the in-memory edge)", async () => {
    const grid = await connect();
    const found = await grid.search("#birth-records", "#february");
    const births = found["hospital"]![0]!;
    const total = births.index(":", 0).sum();
    const ticket = await total.submit();
    expect(["queued", "running", "done"]).toContain(await ticket.status());
    expect((await ticket.result()).kind).toBe("object");
    expect((await births.col("weight").mean().get()).item()).toBe(3.25);
    await births.col("height").gt(52).count().get();
    await births.col("weight").sub(Tensor.full([240], 3.5)).abs().mean().get();
    expect(String(await births.col("weight").mean().get({ epsilon: 0.1 }))).toMatch(/^PrivateValue\(3\.25000; laplace/);
    await births.col("height").mean().get({ epsilon: 0.2, delta: 1e-7 });
    expect(await grid.budget("hospital", "birth-records-feb")).toHaveLength(1);
    expect((await grid.ticket(ticket.id)).id).toBe(ticket.id);
    const [card] = await grid.models();
    expect(card?.name).toBe("risk");
  });
});
