/**
 * What issue 19 added to the Python client, here: your own requests in the nodes' approval
 * queues (`grid.requests`, `grid.cancelRequest`), `ticket.cancel()` (of a queued job through the
 * edge's `POST /v1/jobs/{id}/cancel`, of one waiting for approval from the owner's queue), the errors RequestExpired, JobCancelled and CannotCancel, JobReply's `requests`,
 * and the signed cancellation of protocol/cancel.py — offline, against the in-memory grid of
 * fake-edge.ts (whose node answers as workers/approvals.py does).
 */
import { beforeEach, describe, expect, it } from "vitest";
import {
  ApprovalRequired,
  CannotCancel,
  cancellation,
  cancelledBy,
  errorFromWire,
  Grid,
  GridError,
  Identity,
  InvalidRequest,
  JobCancelled,
  JobFailed,
  JobTicket,
  NodeUnavailable,
  NotFound,
  PermissionDenied,
  RequestDenied,
  RequestExpired,
  CANCEL_STARTED,
  REQUESTS_WAIT_SECONDS,
  sealEnvelope,
  type DataPointer,
} from "../src/index.js";
import { cancelRequest, myRequests, parseJobReply } from "../src/messages.js";
import { FakeGrid } from "./fake-edge.js";

const URL_ = "http://edge.test/";
let fake: FakeGrid;
let alice: Identity;
let bob: Identity;

async function connect(me: Identity = alice): Promise<Grid> {
  return Grid.connect(URL_, me, { fetch: fake.fetch, gatewayKey: fake.gateway.public.text(), timeout: 1 });
}

async function births(grid: Grid): Promise<DataPointer> {
  return (await grid.search("#birth-records"))["hospital"]?.[0] as DataPointer;
}

beforeEach(() => {
  fake = new FakeGrid();
  fake.manual = true; // every job waits for the owner
  alice = Identity.generate("alice");
  bob = Identity.generate("bob");
  fake.addUser(alice);
  fake.addUser(bob);
});

describe("the errors", () => {
  it("RequestExpired is a RequestDenied, JobCancelled a JobFailed, CannotCancel its own; each from its wire code", () => {
    const expired = errorFromWire({ code: "request_expired", message: "too late", job_id: "ward:1" });
    expect(expired).toBeInstanceOf(RequestExpired);
    expect(expired).toBeInstanceOf(RequestDenied);
    expect(expired).toBeInstanceOf(PermissionDenied);
    expect([expired.code, expired.jobId, expired.retryable]).toEqual(["request_expired", "ward:1", false]);
    const cancelled = errorFromWire({ code: "job_cancelled", message: "m" });
    expect(cancelled).toBeInstanceOf(JobCancelled);
    expect(cancelled).toBeInstanceOf(JobFailed);
    const late = errorFromWire({ code: "cannot_cancel", message: "m" });
    expect(late).toBeInstanceOf(CannotCancel);
    expect(late).not.toBeInstanceOf(JobFailed);
    expect(new CannotCancel("m").code).toBe("cannot_cancel");
  });
});

describe("the messages", () => {
  const info = { id: `hospital:${"1".repeat(32)}`, kind: "dp", datasets: ["births"], release: "dp", status: "pending",
    created_at: 1.5, decided_at: null, expires_at: 601.5, decision: "" };

  it("a JobReply's requests are read, their left-out defaults filled in", () => {
    const { decided_at: _d, expires_at: _e, decision: _c, ...short } = info;
    const reply = parseJobReply({ kind: "job_reply", status: "done", requests: [info, short], shares: {}, metrics: null });
    expect(reply.requests).toEqual([info, { ...info, expires_at: null }]);
    expect(parseJobReply({ kind: "job_reply", status: "done" }).requests).toEqual([]);
  });

  it.each([{ status: "lost" }, { created_at: "now" }, { id: "with space" }, { datasets: "births" }, { decision: 1 },
    { expires_at: "later" }])("a malformed request listing is refused: %o", (bad) => {
    expect(() => parseJobReply({ kind: "job_reply", status: "done", requests: [{ ...info, ...bad }] })).toThrow(InvalidRequest);
  });

  it("refuses malformed metrics and shares", () => {
    expect(() => parseJobReply({ kind: "job_reply", status: "done", metrics: { sealed: 3 } })).toThrow(InvalidRequest);
    expect(() => parseJobReply({ kind: "job_reply", status: "done", shares: { a: 1 } })).toThrow(InvalidRequest);
  });

  it("builds MyRequests and CancelRequest bodies, checked as Python's checked() checks them", () => {
    expect(myRequests()).toEqual({ kind: "requests", status: null });
    expect(myRequests("expired")).toEqual({ kind: "requests", status: "expired" });
    expect(() => myRequests("lost" as "pending")).toThrow(/MyRequests: status = "lost"/);
    expect(cancelRequest("ward:abc")).toEqual({ kind: "cancel", request: "ward:abc" });
    expect(() => cancelRequest("ward: abc")).toThrow(InvalidRequest);
    expect(() => cancelRequest("x".repeat(81))).toThrow(InvalidRequest);
  });
});

describe("a signed cancellation (protocol/cancel.py)", () => {
  it("verifies for its job and its signer only", () => {
    const mark = cancellation(alice, "desk:1");
    expect(mark).toMatch(/^cancel alice [A-Za-z0-9+/]{86}==$/);
    expect(cancelledBy(mark, alice.public, "desk:1")).toBe(true);
    expect(cancelledBy(mark, alice.public, "desk:2")).toBe(false);
    expect(cancelledBy(mark, bob.public, "desk:1")).toBe(false);
    expect(cancelledBy(mark.replace("alice", "bob"), bob.public, "desk:1")).toBe(false);
    for (const junk of [CANCEL_STARTED, "", null, undefined, "cancel alice !!!", "cancel alice", `${mark} x`]) {
      expect(cancelledBy(junk, alice.public, "desk:1")).toBe(false);
    }
  });
});

describe("your requests", () => {
  it("lists yours only, oldest first, of one status or all; nobody else's", async () => {
    const grid = await connect();
    const b = await births(grid);
    const kept = await b.col("weight").sum().submit();
    const dp = await b.col("height").mean().submit({ epsilon: 0.2 });
    const theirs = await (await births(await connect(bob))).col("weight").max().submit();
    expect(await kept.status()).toBe("pending_approval");

    const mine = await grid.requests("hospital", "pending");
    expect(mine.map((r) => r.id)).toEqual([kept.id, dp.id]);
    expect(mine.map((r) => r.kind)).toEqual(["compute", "dp"]);
    expect(mine.every((r) => r.status === "pending" && r.expires_at === null && r.decided_at === null)).toBe(true);
    expect((await grid.requests()).map((r) => r.id)).toEqual([kept.id, dp.id]); // every node
    expect(await grid.requests("hospital", "denied")).toEqual([]);
    expect((await (await connect(bob)).requests("hospital")).map((r) => r.id)).toEqual([theirs.id]);
    const sent = fake.requests.filter((r) => r === "POST /v1/jobs").length;
    await expect(grid.requests("hospital", "lost" as "pending")).rejects.toThrow(InvalidRequest);
    expect(fake.requests.filter((r) => r === "POST /v1/jobs").length).toBe(sent); // refused before anything is sent
  });

  it("asked of every node, skips a node no worker serves; asked of that node, says so", async () => {
    const grid = await connect();
    const kept = await (await births(grid)).col("weight").sum().submit();
    fake.down.add("company"); // an MPC-only node: no job queue
    fake.down.add("clinic");
    expect((await grid.requests()).map((r) => r.id)).toEqual([kept.id]);
    await expect(grid.requests("clinic")).rejects.toThrow(/no worker of 'clinic'/);
  });

  it("asked of every node, lists those that answer and names the one that does not in `missing`, without waiting for it; " +
    "asked of that node, throws NodeUnavailable", async () => {
    const grid = await connect(); // timeout 1 s: the wait is the least of it and REQUESTS_WAIT_SECONDS
    const kept = await (await births(grid)).col("weight").sum().submit();
    fake.down.add("company");
    fake.silent.add("clinic"); // its worker was killed since it last said it was up: the edge still takes its jobs
    const started = Date.now();
    const found = await grid.requests();
    expect(Date.now() - started).toBeLessThan(3000);
    expect(found.map((r) => r.id)).toEqual([kept.id]);
    expect(Object.keys(found.missing)).toEqual(["clinic"]);
    expect(found.missing["clinic"]).toMatch(/^no answer within 1 s: its worker may have stopped .* up to 1 s$/);
    expect(REQUESTS_WAIT_SECONDS).toBe(5);
    await expect(grid.requests("clinic")).rejects.toThrow(NodeUnavailable);
    expect((await grid.requests("hospital")).missing).toEqual({});
    fake.silent.clear();
    expect((await grid.requests()).missing).toEqual({});
  });

  it("asked of every node, a node's signed error is its answer, not a silence: it is thrown at once", async () => {
    const grid = await connect();
    fake.tamper = (jobId, answer) => !jobId.startsWith("clinic:") ? answer : { state: "SUCCESS", reply: sealEnvelope(
      fake.node("clinic"), { recipient: "alice", kind: "job_reply", jobId, body: { kind: "job_reply", status: "failed",
        error: { code: "node_unavailable", message: "its store is unreachable", job_id: jobId } } }) };
    const started = Date.now();
    await expect(grid.requests()).rejects.toThrow(/its store is unreachable/);
    expect(Date.now() - started).toBeLessThan(900); // not the 1 s wait for a silent node
  });

  it("cancels yours: it never runs, its ticket says cancelled and throws JobCancelled; twice is no error", async () => {
    const grid = await connect();
    const ticket = await (await births(grid)).col("weight").sum().submit();
    const info = await grid.cancelRequest(ticket.id);
    expect([info.id, info.status]).toEqual([ticket.id, "cancelled"]);
    expect(info.decided_at).toBeTypeOf("number");
    expect(await ticket.status()).toBe("cancelled");
    await expect(ticket.wait()).rejects.toThrow(JobCancelled);
    expect((await grid.cancelRequest(ticket.id)).status).toBe("cancelled");
    expect((await grid.requests("hospital", "cancelled")).map((r) => r.id)).toEqual([ticket.id]);
  });

  it("refuses another user's request, a decided one, an unknown one and what is no request id", async () => {
    const grid = await connect();
    const b = await births(grid);
    const theirs = await (await births(await connect(bob))).col("weight").max().submit();
    await expect(grid.cancelRequest(theirs.id)).rejects.toThrow(PermissionDenied);
    expect(fake.approvals.get(theirs.id)?.status).toBe("pending");
    const denied = await b.col("weight").sum().submit();
    fake.close(denied.id, "denied", "not this term");
    await expect(grid.cancelRequest(denied.id)).rejects.toThrow(/was already denied/);
    await expect(grid.cancelRequest(`hospital:${"0".repeat(32)}`)).rejects.toThrow(NotFound);
    await expect(grid.cancelRequest("hospital:nope")).rejects.toThrow(/is not a request id/);
    await expect(grid.cancelRequest("hospital")).rejects.toThrow(InvalidRequest);
  });

  it("takes a unique prefix of one of yours, and refuses one that names none or several", async () => {
    const grid = await connect();
    const one = await (await births(grid)).col("weight").sum().submit();
    await (await births(await connect(bob))).col("weight").max().submit();
    const row = fake.approvals.get(one.id);
    for (const id of [`hospital:${"ab".repeat(16)}`, `hospital:${"ab".repeat(15)}cd`]) {
      fake.approvals.set(id, { ...row!, id, status: "approved" }); // two more of hers, decided
    }
    expect((await grid.cancelRequest(one.id.slice(0, "hospital:".length + 8))).id).toBe(one.id);
    await expect(grid.cancelRequest("hospital:abab")).rejects.toThrow(/'hospital:abab' names 2 of your requests at 'hospital' \(.*\): give more/);
    await expect(grid.cancelRequest(`hospital:${"ab".repeat(15)}c`)).rejects.toThrow(/was already approved/);
    const none = "0123456789abcdef".split("").find((d) => ![one.id, ...fake.approvals.keys()].some((id) => id.startsWith(`hospital:${d}`)));
    await expect(grid.cancelRequest(`hospital:${none}`)).rejects.toThrow(/names 0 of your requests/);
    await expect(grid.cancelRequest(`hospital:${none}`)).rejects.toThrow(NotFound);
    await expect(grid.cancelRequest("hospital:")).rejects.toThrow(/is not a request id/);
  });

  it("an expired request: the ticket throws RequestExpired (a RequestDenied) and says denied", async () => {
    fake.expireAfter = 3;
    const grid = await connect();
    const ticket = await (await births(grid)).col("weight").mean().submit({ epsilon: 0.5 });
    const [pending] = await grid.requests("hospital", "pending");
    expect(pending?.expires_at).toBeCloseTo((pending?.created_at ?? 0) + 3, 6);
    fake.close(ticket.id, "expired", "no decision within 3 s ([approval] expire_after)");
    await expect(ticket.wait()).rejects.toThrow(RequestExpired);
    await expect(ticket.wait()).rejects.toThrow(RequestDenied);
    expect(await ticket.status()).toBe("denied");
    const [expired] = await grid.requests("hospital");
    expect([expired?.status, expired?.expires_at]).toEqual(["expired", null]);
  });
});

describe("ticket.cancel()", () => {
  it("withdraws a job waiting for its owner's approval; again, nothing happens", async () => {
    const grid = await connect();
    const ticket = await (await births(grid)).col("weight").sum().submit();
    await expect(ticket.wait(0.3)).rejects.toThrow(ApprovalRequired);
    expect(await ticket.cancel()).toBe(ticket);
    expect(await ticket.status()).toBe("cancelled");
    await expect(ticket.wait()).rejects.toThrow(JobCancelled);
    expect(await ticket.cancel()).toBe(ticket);
    expect(fake.approvals.get(ticket.id)?.status).toBe("cancelled");
    const again = await grid.ticket(ticket.id); // picked up again: the node's word says cancelled
    expect(await again.status()).toBe("cancelled");
    expect(await again.cancel()).toBe(again);
    await expect(again.wait()).rejects.toThrow(JobCancelled);
  });

  it("says cancelled at once, even before the node's answer can be read", async () => {
    const grid = await connect();
    const ticket = await (await births(grid)).col("weight").sum().submit();
    await ticket.cancel();
    fake.tamper = (id, answer) => (id === ticket.id ? { state: "PENDING", reply: null } : answer); // not stored yet
    expect(await ticket.status()).toBe("cancelled");
    await expect(ticket.wait()).rejects.toThrow(/you cancelled job .* before 'hospital' ran it: it did not run/);
  });

  it("refuses a job that has finished, saying how", async () => {
    fake.manual = false;
    const grid = await connect();
    const ticket = await (await births(grid)).col("weight").sum().submit();
    await ticket.wait();
    const refused = ticket.cancel();
    await expect(refused).rejects.toThrow(CannotCancel);
    await expect(ticket.cancel()).rejects.toThrow(/has already finished at 'hospital' \(done\): there is nothing left to cancel; its result is there/);
    expect(await ticket.status()).toBe("done");
  });

  it("refuses a job the owner decides while it is being cancelled", async () => {
    const grid = await connect();
    const ticket = await (await births(grid)).col("weight").sum().submit();
    fake.onCancel = (id) => fake.close(id, "denied", "no");
    await expect(ticket.cancel()).rejects.toThrow(/has already finished at 'hospital' \(denied\)/);
    await expect(ticket.wait()).rejects.toThrow(RequestDenied);
  });

  it("cancels a queued job through the edge: it never runs, the ticket says so at once, the node answers so", async () => {
    fake.hold = true; // a busy node: the job waits in its queue
    fake.manual = false;
    const grid = await connect();
    const ticket = await (await births(grid)).col("weight").mean().submit();
    expect(await ticket.status()).toBe("queued");
    expect(await ticket.cancel()).toBe(ticket);
    expect(fake.requests).toContain(`POST /v1/jobs/${encodeURIComponent(ticket.id)}/cancel`);
    expect(cancelledBy(fake.marks.get(ticket.id), alice.public, ticket.id)).toBe(true); // hers, signed, on the key
    expect(await ticket.status()).toBe("cancelled");
    const started = Date.now();
    await expect(ticket.wait(30)).rejects.toThrow(/you cancelled job .* before 'hospital' ran it: it did not run/);
    expect(Date.now() - started).toBeLessThan(2000); // at once, not when the node gets to it
    expect(await ticket.cancel()).toBe(ticket); // again: nothing more happens
    const again = await grid.ticket(ticket.id); // picked up again, before the node answered: the edge shows the mark
    expect(await again.status()).toBe("cancelled");
    await expect(again.wait(30)).rejects.toThrow(JobCancelled);
    expect(await (await grid.ticket(ticket.id)).cancel()).toBeInstanceOf(JobTicket);
    const posts = fake.requests.filter((r) => r.endsWith("/cancel")).length;
    expect(posts).toBe(1); // the later ones saw the mark, and sent nothing

    fake.reach(ticket.id); // the node takes it up: it finds the cancellation and runs nothing
    await expect((await grid.ticket(ticket.id)).wait()).rejects.toThrow(/alice cancelled this job before 'hospital' started it/);
    expect(await (await grid.ticket(ticket.id)).status()).toBe("cancelled");
    expect(await (await grid.ticket(ticket.id)).cancel()).toBeInstanceOf(JobTicket); // its answer is a cancellation
  });

  it("a job the node took up first cannot be cancelled: started, or finished, each said as Python says it", async () => {
    fake.hold = true;
    fake.manual = false;
    const grid = await connect();
    const running = await (await births(grid)).col("weight").mean().submit();
    fake.marks.set(running.id, CANCEL_STARTED); // taken up, not answered yet
    await expect(running.cancel()).rejects.toThrow(CannotCancel);
    await expect(running.cancel()).rejects.toThrow(new RegExp(`job ${running.id} has already started at 'hospital'; a ` +
      "running job is not stopped halfway. Wait for it \\(ticket.wait\\(\\)\\) or ignore its result"));
    expect(await running.status()).toBe("queued"); // the edge's word of STARTED is the Celery state's, not the mark's
    fake.reach(running.id);
    expect(await (await running.wait()).status()).toBe("done"); // it ran
    await expect(running.cancel()).rejects.toThrow(/has already finished at 'hospital' \(done\)/);
  });

  it("another user cannot cancel your job, nor can a forged or foreign cancellation", async () => {
    fake.hold = true;
    fake.manual = false;
    const grid = await connect();
    const ticket = await (await births(grid)).col("weight").mean().submit();
    const theirs = await (await connect(bob)).ticket(ticket.id);
    await expect(theirs.cancel()).rejects.toThrow(PermissionDenied);
    expect(fake.marks.has(ticket.id)).toBe(false);
    const edge = grid.edge;
    const mallory = Identity.generate("mallory");
    await expect(edge.cancel(ticket.id, cancellation(mallory, ticket.id))).rejects.toThrow(/not a user this edge admits/);
    const forged = cancellation(bob, ticket.id).replace("cancel bob ", "cancel alice ");
    await expect(edge.cancel(ticket.id, forged)).rejects.toThrow(/is not 'alice''s signature/);
    const other = await (await births(grid)).col("weight").sum().submit();
    await expect(edge.cancel(ticket.id, cancellation(alice, other.id))).rejects.toThrow(/is not 'alice''s signature/);
    await expect(edge.cancel(ticket.id, "started")).rejects.toThrow(InvalidRequest);
    expect(fake.marks.has(ticket.id)).toBe(false);
    expect(await ticket.status()).toBe("queued");
    expect(await ticket.cancel()).toBe(ticket); // hers goes through
  });

  it("a mark someone else put on the broker first: CannotCancel naming it; the job runs", async () => {
    fake.hold = true;
    fake.manual = false;
    const grid = await connect();
    const ticket = await (await births(grid)).col("weight").mean().submit();
    fake.marks.set(ticket.id, cancellation(bob, ticket.id)); // a scientist with broker access wrote it first
    await expect(ticket.cancel()).rejects.toThrow(/has a mark on the broker that is not yours \(a cancellation signed as 'bob'\): someone who knows its id wrote there first/);
    expect(await ticket.status()).toBe("queued");
    fake.reach(ticket.id);
    expect(await (await ticket.wait()).status()).toBe("done"); // the node ignored it: the job ran
  });

  it("NotFound for a job never sent", async () => {
    const grid = await connect();
    const ticket = new JobTicket(grid, `hospital:${"0".repeat(32)}`);
    await expect(ticket.cancel()).rejects.toThrow(NotFound);
    await expect(ticket.cancel()).rejects.toBeInstanceOf(GridError);
  });
});
