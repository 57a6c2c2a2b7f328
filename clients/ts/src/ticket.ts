/**
 * Job tickets: the handle on a job while it runs at a node (Python's `orchestrator/ticket.py`).
 * A ticket comes back at once from `expr.submit()`; its status moves through
 * `queued → pending_approval → running → done | failed | denied`, or `→ cancelled`, and only the
 * node's signed word makes it `done`, `failed`, `denied`, `cancelled` or `pending_approval`
 * (`cancelled` also on your own signed cancellation, which came before the node took the job up).
 * `cancel()` withdraws a job its node has not started, or one waiting for its owner's approval.
 * `grid.ticket(id)` picks a ticket up again, from any process.
 */
import { cancellation, cancelledBy, signer, STARTED } from "./cancel.js";
import { decodeTensor } from "./codec.js";
import { type Envelope, bodyJson } from "./envelope.js";
import type { JobAnswer } from "./edge.js";
import { ApprovalRequired, CannotCancel, errorFromWire, InvalidRequest, JobCancelled, JobFailed, NodeUnavailable } from "./errors.js";
import type { Identity } from "./identity.js";
import { type JobReply, type NoiseInfo, parseJobReply, type RequestInfo } from "./messages.js";
import { DataPointer, type Runner } from "./pointers.js";
import { openSealedValue } from "./seal.js";
import type { Tensor } from "./tensor.js";

export const PUBLIC = "public";

/** What a ticket needs of its grid. */
export interface TicketHost extends Runner {
  readonly identity: Identity;
  /** The job's state and (unverified) reply, waiting up to `wait` seconds. */
  poll(jobId: string, wait: number): Promise<JobAnswer>;
  /** `node`'s signed reply to `jobId`, verified (sender key, recipient, job, expiry, nonce). */
  verifyReply(raw: unknown, node: string, jobId: string): Promise<Envelope>;
  /** The bytes left under a claim-check key. */
  claim(key: string): Promise<Uint8Array>;
  /** Withdraw your pending request `requestId` from its node's approval queue: the request, as it now stands. */
  cancelRequest(requestId: string): Promise<RequestInfo>;
  /** Put `mark` (this identity's signed cancellation of `jobId`) under the job's cancel key unless its
   * node took the job up first: null if it was put, else what is there ("" if nothing any more). */
  cancelJob(jobId: string, mark: string): Promise<string | null>;
}

/** One look at a job: the node's final answer if there is one, its state, its cancel key's mark. */
interface Look {
  readonly body?: JobReply;
  readonly state: string;
  readonly mark?: string | null;
}

const STATES: Readonly<Record<string, string>> = {
  PENDING: "queued", RECEIVED: "queued", RETRY: "queued", STARTED: "running", PENDING_APPROVAL: "pending_approval",
  // final states nothing signed: not an answer, the job may yet run again (redelivered)
  FAILURE: "running", REVOKED: "running",
};

/** A differentially private release: the noisy value, and how it was made. */
export class PrivateValue {
  constructor(readonly value: Tensor, readonly noise: NoiseInfo) {}

  item(): number {
    return Number(this.value.item());
  }

  toString(): string {
    const n = this.noise;
    const shown = this.value.size === 1 ? this.item().toPrecision(6) : `tensor of shape [${this.value.shape.join(", ")}]`;
    const privacy = `ε=${n.epsilon}` + (n.delta ? `, δ=${n.delta}` : "");
    const after = n.post_processed ? " on its aggregates, then post-processed" : "";
    return `PrivateValue(${shown}; ${n.mechanism} noise of scale ${n.scale.toPrecision(4)}${after}, ${privacy})`;
  }
}

export class JobTicket {
  readonly node: string;
  private answered: JobReply | undefined;
  /** Your cancellation came before the node took the job up, or this ticket withdrew the job from its
   * owner's approval queue (the node's answer may be on its way). */
  private cancelled = false;

  constructor(private readonly host: TicketHost, readonly id: string) {
    this.node = id.split(":", 1)[0] as string;
  }

  toString(): string {
    return `<JobTicket ${this.id}>`;
  }

  /** queued → pending_approval → running → done | failed | denied, or cancelled (one look, no waiting). */
  async status(): Promise<string> {
    if (this.answered === undefined) {
      const answer = await this.host.poll(this.id, 0);
      if (answer.state === "SUCCESS") {
        const body = await this.open(answer.reply);
        if (body.status !== "pending_approval") this.answered = body;
        else if (!this.cancelled) return body.status;
      } else if (this.cancelled || this.mine(answer.cancelMark)) {
        this.cancelled = true; // yours, signed: the node will not run it (it answers so when it reaches it)
        return "cancelled";
      } else {
        const state = STATES[answer.state] ?? "queued";
        if (state === "pending_approval") return (await this.parked(answer)) ? state : "queued";
        return state;
      }
    }
    if (this.answered === undefined) return "cancelled"; // withdrawn here; the node's word is on its way
    return wasCancelled(this.answered) ? "cancelled" : this.answered.status;
  }

  /** Wait until the job ends (`timeout` seconds, default the grid's); throw its typed error if it
   * failed, was denied or cancelled, ApprovalRequired if it still waits for the owner. */
  async wait(timeout?: number): Promise<JobTicket> {
    if (this.answered === undefined && this.cancelled) {
      // withdrawn from here: the node's answer (JobCancelled) is normally there already; no waiting for it
      const answer = await this.host.poll(this.id, 0);
      const body = answer.state === "SUCCESS" ? await this.open(answer.reply) : undefined;
      if (body === undefined || body.status === "pending_approval") throw this.cancelledError();
      this.answered = body;
    }
    if (this.answered === undefined) this.answered = await this.await(timeout ?? this.host.timeout);
    const error = this.answered.error;
    if (error != null) throw errorFromWire({ ...error, job_id: error.job_id ?? this.id });
    return this;
  }

  /**
   * Cancel the job if its node has not started it, as Python's `ticket.cancel()` does: your signed
   * cancellation goes under the job's cancel key (`POST /v1/jobs/{id}/cancel`; the edge checks your
   * signature and that you sent the job) unless the node took the job up first. The job then never
   * runs — nothing is read, charged or kept — `status()` says `cancelled` at once and `wait()`
   * throws JobCancelled, even while the node is busy with other jobs; the node answers so when it
   * reaches the job. A job waiting for its owner's approval is withdrawn from the owner's queue
   * (`grid.cancelRequest`). Cancelling a cancelled job again does nothing. CannotCancel if the node
   * has started the job (a running job is not stopped halfway) or answered it (done, failed,
   * denied), or the owner decided it meanwhile, saying which; NotFound for a job never sent.
   */
  async cancel(): Promise<JobTicket> {
    let seen: Look = { state: "queued" };
    if (this.answered === undefined && !this.cancelled) {
      seen = await this.look(); // NotFound if it was never sent (or is long gone)
      if (seen.body !== undefined) this.answered = seen.body;
    }
    if (this.answered !== undefined) return this.finishedAlready();
    if (this.cancelled || this.mine(seen.mark)) {
      this.cancelled = true;
      return this;
    }
    if (seen.state === "pending_approval") return this.withdraw();
    const first = await this.host.cancelJob(this.id, cancellation(this.host.identity, this.id));
    if (first === null || this.mine(first)) {
      this.cancelled = true;
      return this;
    }
    const again = await this.look(); // answered, or parked for its owner, in the meantime?
    if (again.body !== undefined) {
      this.answered = again.body;
      return this.finishedAlready();
    }
    if (first === STARTED && again.state === "pending_approval") return this.withdraw();
    if (first === STARTED) {
      throw new CannotCancel(`job ${this.id} has already started at '${this.node}'; a running job is not stopped ` +
        "halfway. Wait for it (ticket.wait()) or ignore its result", { jobId: this.id });
    }
    if (!first) { // the key expired between the two commands
      throw new CannotCancel(`job ${this.id} is past the time a job may wait in a queue: its node will not run it ` +
        "now", { jobId: this.id });
    }
    const who = signer(first);
    throw new CannotCancel(`job ${this.id} has a mark on the broker that is not yours ` +
      `(${who ? `a cancellation signed as '${who}'` : "not a cancellation"}): someone who knows its id wrote there ` +
      "first. The node ignores it and runs the job: wait for it, or ignore its result", { jobId: this.id });
  }

  /** The job as it stands (one look, no waiting): the node's final answer, if any, opened. */
  private async look(): Promise<Look> {
    const answer = await this.host.poll(this.id, 0);
    if (answer.state === "SUCCESS") {
      const body = await this.open(answer.reply);
      return body.status === "pending_approval" ? { state: body.status, mark: answer.cancelMark }
        : { body, state: body.status, mark: answer.cancelMark };
    }
    let state = STATES[answer.state] ?? "queued";
    if (state === "pending_approval" && !(await this.parked(answer))) state = "queued"; // only on the node's word
    return { state, mark: answer.cancelMark };
  }

  /** Whether `mark` (what the job's cancel key holds) is this identity's signed cancellation of this job. */
  private mine(mark: string | null | undefined): boolean {
    return mark != null && cancelledBy(mark, this.host.identity.public, this.id);
  }

  /** cancel() of a job parked for its owner's approval: its request is withdrawn from the
   * owner's queue, unless the owner decided it meanwhile. */
  private async withdraw(): Promise<JobTicket> {
    let info: RequestInfo;
    try {
      info = await this.host.cancelRequest(this.id);
    } catch (exc) {
      if (!(exc instanceof InvalidRequest)) throw exc;
      const answer = await this.host.poll(this.id, 0); // decided (or expired) in the meantime
      if (answer.state === "SUCCESS") {
        const body = await this.open(answer.reply);
        if (body.status !== "pending_approval") {
          this.answered = body;
          return this.finishedAlready();
        }
      }
      throw new CannotCancel(`job ${this.id} waited for the approval of '${this.node}''s owner, who has decided it ` +
        `since: ${exc.message}`, { jobId: this.id });
    }
    if (info.status !== "cancelled") {
      throw new CannotCancel(`job ${this.id}'s request at '${this.node}' is ${info.status}: there is nothing left to cancel`,
        { jobId: this.id });
    }
    this.cancelled = true;
    return this;
  }

  /** cancel() of a job that has its node's answer: nothing to do if it was a cancellation. */
  private finishedAlready(): JobTicket {
    const reply = this.answered as JobReply;
    if (wasCancelled(reply)) return this;
    const hint = reply.status === "done" ? "its result is there (ticket.result(), .value())" : "ticket.wait() throws its error";
    throw new CannotCancel(`job ${this.id} has already finished at '${this.node}' (${reply.status}): there is nothing ` +
      `left to cancel; ${hint}`, { jobId: this.id });
  }

  private cancelledError(): JobCancelled {
    return new JobCancelled(`you cancelled job ${this.id} before '${this.node}' ran it: it did not run`, { jobId: this.id });
  }

  /** A pointer to the result kept at the node. */
  async result(timeout?: number): Promise<DataPointer> {
    const reply = await this.reply(timeout);
    if (reply.ticket == null) throw new JobFailed(`job ${this.id} released a value; it kept no result at the node`, { jobId: this.id });
    const t = reply.ticket;
    return new DataPointer(this.host, t.node, { kind: "object", name: t.object_id }, { shape: t.shape, dtype: t.dtype });
  }

  /** The released value, opened with the requester's key. */
  async value(timeout?: number): Promise<Tensor> {
    const reply = await this.reply(timeout);
    if (reply.value == null) throw new JobFailed(`job ${this.id} kept its result at the node; use .result()`, { jobId: this.id });
    const plain = await openSealedValue(reply.value, this.host.identity, (key) => this.host.claim(key), this.id);
    return decodeTensor(plain);
  }

  /** A DP release: the noisy value with its mechanism, ε, δ and noise scale. */
  async privateValue(timeout?: number): Promise<PrivateValue> {
    const reply = await this.reply(timeout);
    if (reply.noise == null) throw new JobFailed(`job ${this.id} was not a differentially private release`, { jobId: this.id });
    return new PrivateValue(await this.value(timeout), reply.noise);
  }

  /** The node's whole (verified) reply. */
  async reply(timeout?: number): Promise<JobReply> {
    await this.wait(timeout);
    return this.answered as JobReply;
  }

  private async await(timeout: number): Promise<JobReply> {
    const deadline = Date.now() + timeout * 1000;
    let parked = false;
    let state = "queued";
    let pause = 250;
    for (;;) {
      const started = Date.now();
      const answer = await this.host.poll(this.id, Math.max(0, Math.min(30, (deadline - started) / 1000)));
      if (answer.state === "SUCCESS") {
        // a 'waiting' word is not the job's end, whatever state the relay files it under
        const body = await this.open(answer.reply);
        if (body.status !== "pending_approval") return body;
        parked = true;
        state = "pending_approval";
      } else if (this.mine(answer.cancelMark)) {
        this.cancelled = true; // yours came first: the node will not run it, and answers so only when it gets there
        throw this.cancelledError();
      } else {
        state = STATES[answer.state] ?? "queued";
        if (state === "pending_approval") parked = (await this.parked(answer)) || parked;
      }
      if (Date.now() >= deadline) break;
      // the edge answers a parked job at once (and an edge may not long-poll): no tight loop
      if (Date.now() - started < 200) pause = await backoff(pause, deadline);
    }
    if (parked) {
      throw new ApprovalRequired(
        `job ${this.id} waits for the approval of '${this.node}''s owner; wait longer, or pick it up later with ` +
          `grid.ticket('${this.id}')`, { jobId: this.id },
      );
    }
    const shown = state === "pending_approval" ? "queued" : state;
    const hint = shown === "queued" ? "no worker of this node took it: is the node running?" : "it is still running";
    throw new NodeUnavailable(
      `job ${this.id} on '${this.node}' is ${shown} after ${timeout.toFixed(0)} s; ${hint}. Pick it up later with ` +
        `grid.ticket('${this.id}').`, { jobId: this.id },
    );
  }

  /** Whether the node's signed answer says it parked this job for its owner. */
  private async parked(answer: JobAnswer): Promise<boolean> {
    if (answer.reply == null) return false;
    return (await this.open(answer.reply)).status === "pending_approval";
  }

  /** The node's signed reply to this job (an answer, or word that it is parked). */
  private async open(raw: unknown): Promise<JobReply> {
    const env = await this.host.verifyReply(raw, this.node, this.id);
    const body = parseJobReply(bodyJson(env), this.id);
    if (env.recipient === PUBLIC && body.error == null) {
      throw new JobFailed(`node '${this.node}' answered job ${this.id} with an unaddressed ${body.kind}`, { jobId: this.id });
    }
    return body;
  }
}

/** Whether the node answered that the job's requester cancelled it before it ran. */
function wasCancelled(reply: JobReply): boolean {
  return reply.error != null && reply.error.code === JobCancelled.code;
}

/** Sleep `pause` ms (not past `deadline`); the next, longer pause (up to 5 s). */
export async function backoff(pause: number, deadline: number): Promise<number> {
  const ms = Math.max(0, Math.min(pause, deadline - Date.now()));
  await new Promise((resolve) => setTimeout(resolve, ms));
  return Math.min(pause * 2, 5000);
}
