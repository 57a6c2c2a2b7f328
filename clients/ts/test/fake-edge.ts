/**
 * An in-memory grid behind the edge's HTTP API v1, as a `fetch` function: a gateway, a data node
 * (`hospital`) and an MPC pool (host `company`, parties `hospital` and `clinic`), each signing its
 * answers with its own key, as the Python workers do. It lets the Grid's whole flow run offline,
 * and `tamper` plays a hostile relay.
 */
import {
  type Envelope,
  CANCEL_STARTED,
  cancellationSigner,
  cancelledBy,
  Identity,
  MemoryNonceStore,
  PublicIdentity,
  Tensor,
  cardDigest,
  canonicalCard,
  decodeTensor,
  encodeTensor,
  inputLabel,
  openEnvelope,
  openSigned,
  outputLabel,
  pack,
  pyDumps,
  queryDigest,
  reconstruct,
  sealEnvelope,
  sealSigned,
  share,
  sha256Hex,
  unpack,
  FixedPoint,
  type ModelCard,
  type PyJson,
  type Query,
} from "../src/index.js";
import { listingSignedPart } from "../src/listing.js";
import { type DatasetMeta, matches, type SearchQuery } from "../src/messages.js";

/** A request in the node's approval queue (workers/approvals.py's row, as its requester sees it). */
export interface ApprovalRow {
  id: string;
  requester: string;
  kind: string;
  datasets: string[];
  release: string;
  status: "pending" | "approved" | "denied" | "expired" | "cancelled";
  created_at: number;
  decided_at: number | null;
  expires_at: number | null;
  decision: string;
}

export interface StoredJob {
  state: string;
  reply: unknown;
  task: string;
  envelope: Envelope;
  body: Record<string, unknown>;
}

const hex = (data: Uint8Array): string => Buffer.from(data).toString("hex");
const b64 = (data: Uint8Array): string => Buffer.from(data).toString("base64");
const now = (): number => Date.now() / 1000;

export const BIRTHS: DatasetMeta = {
  node: "hospital", name: "birth-records-feb", shape: [240, 2], dtype: "float32", columns: ["weight", "height"],
  description: "Monthly birth records: weight (kg), height (cm)", tags: ["#february", "#birth-records"],
};

/** The served model: y = relu(x Wᵀ + b). */
export const W = [[0.5, -1, 0.25], [1, 1, 1]];
export const B = [0.1, -0.2];

export class FakeGrid {
  readonly gateway = Identity.generate("gateway");
  readonly nodes = new Map(["hospital", "clinic", "company"].map((n) => [n, Identity.generate(n)]));
  readonly dana = Identity.generate("dana");
  readonly users = new Map<string, PublicIdentity>();
  readonly jobs = new Map<string, StoredJob>();
  readonly blobs = new Map<string, Uint8Array>();
  readonly requests: string[] = [];
  private readonly nonces = new MemoryNonceStore();
  /** The value a run job releases. */
  value: Tensor = Tensor.of(3.25);
  /** Sealed values go by claim-check (as values above 256 KB do). */
  claimCheck = false;
  /** A hostile relay: rewrite what GET /v1/jobs/{id} answers. */
  tamper: ((jobId: string, answer: { state: string; reply: unknown }) => { state: string; reply: unknown }) | undefined;
  /** A hostile relay: rewrite what GET /v1/blobs/{key} answers. */
  tamperBlob: ((key: string, data: Uint8Array) => Uint8Array) | undefined;
  /** Answer the job with this error instead (code, message, status). */
  refuse: { code: string; message: string; status: "denied" | "failed" } | undefined;
  listingAge = 0;
  readonly card: ModelCard;
  /** Run jobs wait for the owner's approval (a node with `[approval] default = "manual"`). */
  manual = false;
  /** Seconds a parked request waits before it expires (the node's `[approval] expire_after`); 0: never. */
  expireAfter = 0;
  /** Jobs are taken but not answered (a busy node): they stay queued. */
  hold = false;
  /** Nodes no worker serves: the edge refuses their jobs (503 node_unavailable). */
  readonly down = new Set<string>();
  /** Nodes whose worker was killed since it last said it was up: the edge takes their jobs, nobody answers them. */
  readonly silent = new Set<string>();
  /** The approval queue, by job id. */
  readonly approvals = new Map<string, ApprovalRow>();
  /** Runs when a CancelRequest reaches the node, before it is handled (the owner deciding meanwhile). */
  onCancel: ((request: string) => void) | undefined;
  /** Each job's cancel key (`gridq:cancel:<id>`): `started` once the node took it up, or a cancellation. */
  readonly marks = new Map<string, string>();

  constructor(readonly userNames: string[] = ["alice", "bob"]) {
    this.card = {
      name: "risk", owner: "dana", owner_key: this.dana.public.text(), host: "company", parties: ["hospital", "clinic"],
      provider: "gateway", queriers: {}, plan: { layers: [{ kind: "linear", in_features: 3, out_features: 2 },
        { kind: "relu", in_features: 0, out_features: 0 }], frac_bits: 16 }, issued_at: now(),
    };
  }

  addUser(identity: Identity, querier = true): void {
    this.users.set(identity.name, identity.public);
    if (querier) (this.card as { queriers: Record<string, string> }).queriers[identity.name] = identity.public.text();
  }

  node(name: string): Identity {
    return this.nodes.get(name) as Identity;
  }

  listing(): string {
    const nodes = [...this.nodes.values()].map((n) => ({ node: n.name, public_key: n.public.text(), queue: `node.${n.name}`,
      last_seen: now() }));
    const text = JSON.stringify({ issued_at: now() - this.listingAge, nodes });
    return JSON.stringify({ listing: text, signature: hex(this.gateway.sign(listingSignedPart(text))) });
  }

  readonly fetch: typeof fetch = async (input, init) => {
    const url = new URL(String(input));
    const method = init?.method ?? "GET";
    this.requests.push(`${method} ${url.pathname}`);
    const path = url.pathname.replace(/^\/+/, "").split("/").map(decodeURIComponent);
    try {
      if (method === "GET" && path[1] === "gateway") return json({ public_key: this.gateway.public.text(), listing: this.listing() });
      if (method === "POST" && path[1] === "search") {
        return json(this.search(JSON.parse(String(init?.body)), url.searchParams.get("job_id")));
      }
      if (method === "POST" && path[1] === "jobs" && path[3] === "cancel") {
        return json(this.cancel(path[2] as string, JSON.parse(String(init?.body))));
      }
      if (method === "POST" && path[1] === "jobs") return json(this.enqueue(JSON.parse(String(init?.body))), 202);
      if (method === "GET" && path[1] === "jobs") return json(this.answer(path[2] as string));
      if (method === "POST" && path[1] === "blobs") return json({ key: this.leave(new Uint8Array(init?.body as Uint8Array)) });
      if (method === "GET" && path[1] === "blobs") {
        const key = path[2] as string;
        const data = this.take(key);
        return new Response((this.tamperBlob ? this.tamperBlob(key, data) : data) as BodyInit);
      }
      if (method === "GET" && path[1] === "models") return json({ models: this.models() });
      return error(404, "not_found", `no route ${method} ${url.pathname}`);
    } catch (exc) {
      const e = exc as { code?: string; message: string };
      const status = { not_found: 404, node_unavailable: 503, bad_signature: 401, unknown_sender: 401, permission_denied: 403 }
        [e.code ?? ""] ?? 400;
      return error(status, e.code ?? "invalid_request", e.message);
    }
  };

  /** The gateway's signed answer, for the client's job id (as the edge sends the task), else a new one. */
  private search(query: SearchQuery, asked: string | null): unknown {
    const jobId = asked ?? hex(crypto.getRandomValues(new Uint8Array(16)));
    const datasets = [BIRTHS].filter((m) => matches(m, query));
    const nodes = [...this.nodes.values()].map((n) => ({ node: n.name, public_key: n.public.text(), queue: `node.${n.name}`, last_seen: now() }));
    const body = { kind: "gateway_reply", datasets, nodes, error: null } as unknown as PyJson;
    return { job_id: jobId, reply: sealEnvelope(this.gateway, { recipient: "public", kind: "gateway_reply", jobId, body }) };
  }

  private enqueue(request: { task: string; envelope: Envelope }): unknown {
    const env = request.envelope;
    const recipient = this.node(env.recipient);
    if (recipient === undefined) throw Object.assign(new Error(`no node ${env.recipient}`), { code: "not_found" });
    if (this.down.has(env.recipient)) {
      throw Object.assign(new Error(`no worker of '${env.recipient}' serves node.${env.recipient}`), { code: "node_unavailable" });
    }
    // the node verifies as Python's open_envelope does
    openEnvelope(env, { recipient: env.recipient, keyring: this.users, nonces: this.nonces, deliveryId: env.job_id });
    const body = JSON.parse(env.body) as Record<string, unknown>;
    const job: StoredJob = { state: "PENDING", reply: null, task: request.task, envelope: env, body };
    this.jobs.set(env.job_id, job);
    if (this.silent.has(env.recipient)) return { job_id: env.job_id, queue: `node.${env.recipient}` };
    if (request.task === "gridq.mpc.query") this.runQuery(job);
    else this.runJob(job);
    return { job_id: env.job_id, queue: `node.${env.recipient}` };
  }

  private sign(job: StoredJob, reply: Record<string, unknown>, to = job.envelope.sender): unknown {
    return sealEnvelope(this.node(job.envelope.recipient), { recipient: to, kind: String(reply["kind"]), jobId: job.envelope.job_id,
      body: reply as PyJson });
  }

  private runJob(job: StoredJob): void {
    const sender = this.users.get(job.envelope.sender) as PublicIdentity;
    const body = job.body;
    if (body["kind"] === "requests" || body["kind"] === "cancel") {
      this.own(job, body);
      return;
    }
    if (this.hold) return;
    // the node takes the job up (workers/jobs.py): SET NX of its cancel key, unless its sender's cancellation came first
    const mark = this.marks.get(job.envelope.job_id);
    if (mark !== undefined && cancelledBy(mark, sender, job.envelope.job_id)) {
      job.state = "SUCCESS";
      job.reply = this.sign(job, { kind: "job_reply", status: "failed", error: { code: "job_cancelled",
        message: `${sender.name} cancelled this job before 'hospital' started it: it did not run`, job_id: job.envelope.job_id } });
      return;
    }
    if (mark === undefined) this.marks.set(job.envelope.job_id, CANCEL_STARTED);
    if (this.refuse !== undefined) {
      const { status, code, message } = this.refuse;
      job.state = "SUCCESS";
      job.reply = this.sign(job, { kind: "job_reply", status, error: { code, message, job_id: job.envelope.job_id } });
      return;
    }
    if (body["kind"] === "access" || (this.manual && body["kind"] === "run")) {
      const created = now();
      const release = (body["release"] ?? { door: "keep" }) as { door: string };
      this.approvals.set(job.envelope.job_id, { id: job.envelope.job_id, requester: sender.name,
        kind: body["kind"] === "access" ? "access" : release.door === "keep" ? "compute" : release.door,
        datasets: ["birth-records-feb"], release: release.door, status: "pending", created_at: created, decided_at: null,
        expires_at: this.expireAfter ? created + this.expireAfter : null, decision: "" });
      job.state = "PENDING_APPROVAL";
      job.reply = this.sign(job, { kind: "job_reply", status: "pending_approval" });
      return;
    }
    if (body["kind"] === "budget") {
      job.state = "SUCCESS";
      job.reply = this.sign(job, { kind: "job_reply", status: "done", budgets: [{ node: "hospital", dataset: "birth-records-feb",
        user: sender.name, epsilon: 1, delta: 1e-6, spent_epsilon: 0.3, spent_delta: 0, releases: 3 }] });
      return;
    }
    const release = (body["release"] ?? { door: "raw" }) as { door: string; epsilon?: number; delta?: number };
    if (release.door === "keep") {
      job.state = "SUCCESS";
      job.reply = this.sign(job, { kind: "job_reply", status: "done", ticket: { node: "hospital", object_id: "obj-1",
        job_id: job.envelope.job_id, shape: [...this.value.shape], dtype: this.value.dtype, sources: ["birth-records-feb"] } });
      return;
    }
    const sealed = sender.seal(encodeTensor(this.value));
    const value = this.claimCheck
      ? { claim_check: this.leave(sealed), sha256: sha256Hex(sealed), size: sealed.length }
      : { sealed: b64(sealed), size: sealed.length };
    const noise = release.door === "dp"
      ? { mechanism: release.delta ? "gaussian" : "laplace", epsilon: release.epsilon, delta: release.delta, scale: 0.29, sensitivity: 0.029 }
      : null;
    job.state = "SUCCESS";
    job.reply = this.sign(job, { kind: "job_reply", status: "done", value, noise });
  }

  /** The node reaches a job it held (`hold`): it takes it up now, and runs it unless it was cancelled. */
  reach(jobId: string): void {
    const hold = this.hold;
    this.hold = false;
    try {
      this.runJob(this.jobs.get(jobId) as StoredJob);
    } finally {
      this.hold = hold;
    }
  }

  /** POST /v1/jobs/{id}/cancel, checked as ops/edge/app.py checks it. */
  private cancel(jobId: string, body: { cancellation?: unknown }): unknown {
    const mark = String(body.cancellation);
    const name = cancellationSigner(mark);
    const fail = (code: string, message: string): Error => Object.assign(new Error(message), { code });
    if (!name) throw fail("invalid_request", "not a signed cancellation");
    const key = this.users.get(name);
    if (key === undefined) throw fail("unknown_sender", `'${name}' is not a user this edge admits`);
    if (!cancelledBy(mark, key, jobId)) throw fail("bad_signature", `the cancellation is not '${name}''s signature of job ${jobId}`);
    const job = this.jobs.get(jobId);
    if (job === undefined) throw fail("not_found", `no job ${jobId} was sent`);
    if (job.envelope.sender !== name) throw fail("permission_denied", `job ${jobId} is '${job.envelope.sender}''s`);
    const first = this.marks.get(jobId);
    if (first === undefined) {
      this.marks.set(jobId, mark);
      return { job_id: jobId, cancelled: true };
    }
    return { job_id: jobId, cancelled: false, mark: first };
  }

  /** Approve a parked job (the owner's decision): its answer is then the node's. */
  approve(jobId: string): void {
    const job = this.jobs.get(jobId) as StoredJob;
    const row = this.approvals.get(jobId);
    if (row !== undefined) Object.assign(row, { status: "approved", decided_at: now(), expires_at: null });
    job.state = "SUCCESS";
    job.reply = this.sign(job, { kind: "job_reply", status: "done" });
  }

  /** Close a parked request (denied by the owner, expired, cancelled by its requester) and answer its job so. */
  close(jobId: string, status: "denied" | "expired" | "cancelled", decision = ""): void {
    const row = this.approvals.get(jobId) as ApprovalRow;
    Object.assign(row, { status, decided_at: now(), expires_at: null, decision });
    const [code, replied] = status === "denied" ? ["request_denied", "denied"] : status === "expired"
      ? ["request_expired", "denied"] : ["job_cancelled", "failed"];
    const job = this.jobs.get(jobId) as StoredJob;
    job.state = "SUCCESS";
    job.reply = this.sign(job, { kind: "job_reply", status: replied, error: { code, message: `${status}: ${decision}`, job_id: jobId } });
  }

  /** MyRequests and CancelRequest, as workers/approvals.py's OwnRequests answers them. */
  private own(job: StoredJob, body: Record<string, unknown>): void {
    const me = job.envelope.sender;
    const answer = (reply: Record<string, unknown>): void => {
      job.state = "SUCCESS";
      job.reply = this.sign(job, { kind: "job_reply", ...reply });
    };
    const refuse = (status: string, code: string, message: string): void =>
      answer({ status, error: { code, message, job_id: job.envelope.job_id } });
    if (body["kind"] === "requests") {
      const node = `${job.envelope.recipient}:`; // each node's own queue
      const rows = [...this.approvals.values()].filter((r) => r.id.startsWith(node) && r.requester === me &&
        (body["status"] == null || r.status === body["status"]));
      answer({ status: "done", requests: rows.map((r) => { const { requester: _, ...info } = r; return info; }) });
      return;
    }
    const id = String(body["request"]);
    this.onCancel?.(id);
    const row = this.approvals.get(id);
    if (row === undefined) return refuse("failed", "not_found", `no request ${id} at this node`);
    if (row.requester !== me) return refuse("denied", "permission_denied", `request ${id} is not yours: only the user who sent it may cancel it`);
    if (row.status === "pending") this.close(id, "cancelled");
    else if (row.status !== "cancelled") return refuse("failed", "invalid_request", `request ${id} was already ${row.status}`);
    const { requester: _, ...info } = row;
    answer({ status: "done", requests: [info] });
  }

  private runQuery(job: StoredJob): void {
    // a test double of the whole MPC pool: it opens the input shares the way each party does
    // (sealed to it, signed by the querier for this query), then answers with output shares
    const signed = job.body["query"] as { query: Query; signature: string };
    const q = signed.query;
    const querier = this.users.get(q.querier) as PublicIdentity;
    querier.verify(queryDigest(q), Uint8Array.from(Buffer.from(signed.signature, "hex")));
    if (q.card !== cardDigest(this.card)) throw new Error("query for another card");
    const inputs = job.body["inputs"] as Record<string, string>;
    const shares = this.card.parties.map((p) => {
      const data = openSigned(this.node(p), querier, inputLabel(q.id, p), this.take(inputs[p] as string));
      return (unpack(data).tensors["x"] as Tensor).data as BigInt64Array;
    });
    const fp = new FixedPoint(this.card.plan.frac_bits);
    const x = fp.decode(reconstruct(shares));
    const rows = q.batch;
    const y: number[] = [];
    for (let r = 0; r < rows; r++) {
      for (let o = 0; o < W.length; o++) {
        const wo = W[o] as number[];
        let sum = B[o] as number;
        for (let i = 0; i < wo.length; i++) sum += (wo[i] as number) * (x[r * 3 + i] as number);
        y.push(Math.max(0, sum));
      }
    }
    const outputs: Record<string, string> = {};
    share(fp.encode(y), 2).forEach((s, i) => {
      const party = this.card.parties[i] as string;
      const y = pack({ y: new Tensor("int64", [rows, W.length], s) });
      outputs[party] = this.leave(sealSigned(this.node(party), querier, outputLabel(q.id, party), y));
    });
    job.state = "SUCCESS";
    job.reply = sealEnvelope(this.node("company"), { recipient: q.querier, kind: "mpc_reply", jobId: job.envelope.job_id,
      body: { kind: "mpc_reply", error: null, outputs, keys: {} } });
  }

  private answer(jobId: string): unknown {
    const job = this.jobs.get(jobId);
    if (job === undefined) throw Object.assign(new Error(`no job ${jobId} was sent`), { code: "not_found" });
    const answer = { state: job.state, reply: job.reply };
    return { ...(this.tamper ? this.tamper(jobId, answer) : answer), cancel_mark: this.marks.get(jobId) ?? null };
  }

  leave(data: Uint8Array): string {
    const key = `gridq:blob:${hex(crypto.getRandomValues(new Uint8Array(16)))}`;
    this.blobs.set(key, data);
    return key;
  }

  private take(key: string): Uint8Array {
    const data = this.blobs.get(key);
    if (data === undefined) throw Object.assign(new Error(`no blob ${key}`), { code: "not_found" });
    this.blobs.delete(key);
    return data;
  }

  private models(): Record<string, unknown> {
    const signature = hex(this.dana.sign(new TextEncoder().encode(cardDigest(this.card))));
    const text = pyDumps({ card: JSON.parse(canonicalCard(this.card)), signature }, true);
    return { "dana/risk": { card: text, signature: hex(this.node("company").sign(new TextEncoder().encode(text))) } };
  }
}

export function decodeValue(data: Uint8Array): Tensor {
  return decodeTensor(data);
}

function json(data: unknown, status = 200): Response {
  return new Response(JSON.stringify(data), { status, headers: { "content-type": "application/json" } });
}

function error(status: number, code: string, message: string): Response {
  return json({ error: { code, message } }, status);
}
