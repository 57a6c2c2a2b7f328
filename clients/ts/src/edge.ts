/**
 * The HTTP edge (API v1): how a browser or Node process reaches a grid it cannot open a Redis
 * connection to. The edge is a relay — it enqueues signed envelopes and hands back signed
 * replies and sealed bytes — and is trusted with nothing: {@link Grid} verifies every reply
 * itself and opens every sealed value with its own key. This module only speaks HTTP (`fetch`,
 * in Node 20 and browsers alike) and turns the edge's errors into typed {@link GridError}s.
 *
 *     const edge = new Edge("https://grid.example.org/");
 *     const { public_key, listing } = await edge.gateway();
 */
import type { Envelope } from "./envelope.js";
import { errorFromWire, type GridError, InvalidRequest, MisdirectedReply, NodeUnavailable, NotFound } from "./errors.js";
import type { SearchQuery } from "./messages.js";

/** The longest a single long-poll may ask the edge to wait. */
export const MAX_WAIT_SECONDS = 30;

export type JobState = "PENDING" | "STARTED" | "PENDING_APPROVAL" | "SUCCESS";

export interface JobAnswer {
  readonly state: JobState | string;
  /** The node's signed reply envelope (unverified: the caller checks it), or null. */
  readonly reply: unknown;
  /** What the job's cancel key holds (`started`, a signed cancellation: unverified), or null;
   * undefined from an edge that predates it. */
  readonly cancelMark?: string | null;
}

/** What `POST /v1/jobs/{id}/cancel` did: put the cancellation (`cancelled`), or found `mark`
 * there first (`started`, a cancellation; null if the key expired in between). */
export interface CancelAnswer {
  readonly cancelled: boolean;
  readonly mark: string | null;
}

export interface EdgeOptions {
  /** The fetch to use (default: the global one). */
  fetch?: typeof fetch;
  /** Extra headers on every request (an API token the edge's operator requires, say). */
  headers?: Record<string, string>;
  /** Seconds an ordinary request may take (a long-poll gets its wait on top). */
  requestTimeout?: number;
}

export class Edge {
  readonly url: string;
  private readonly fetcher: typeof fetch;
  private readonly headers: Record<string, string>;
  private readonly requestTimeout: number;

  constructor(url: string, options: EdgeOptions = {}) {
    this.url = url.endsWith("/") ? url : `${url}/`;
    // bound to globalThis: a browser's fetch refuses to be called as another object's method
    this.fetcher = options.fetch ?? ((input, init) => globalThis.fetch(input, init));
    this.headers = options.headers ?? {};
    this.requestTimeout = options.requestTimeout ?? 30;
  }

  /** The gateway's public key text and its signed node listing (both unverified). */
  async gateway(): Promise<{ public_key: string; listing: string }> {
    const data = await this.json("GET", "v1/gateway");
    if (typeof data["public_key"] !== "string" || typeof data["listing"] !== "string") {
      throw new InvalidRequest(`the edge at ${this.url} answered /v1/gateway without a key and a listing`);
    }
    return { public_key: data["public_key"], listing: data["listing"] };
  }

  /** Run a search at the gateway as job `jobId` (the caller's fresh id, which the gateway signs
   * its reply for): the signed reply (unverified: the caller opens it for `jobId`). */
  async search(query: SearchQuery, jobId: string): Promise<{ job_id: string; reply: unknown }> {
    const data = await this.json("POST", `v1/search?job_id=${encodeURIComponent(jobId)}`, JSON.stringify(query), undefined, 60);
    if (data["job_id"] !== jobId) {
      throw new MisdirectedReply(`the edge at ${this.url} answered search ${jobId} as job ${String(data["job_id"])}: ` +
        "refused (an edge that predates ?job_id= on /v1/search, or an answer to another search)", { jobId });
    }
    return { job_id: jobId, reply: data["reply"] };
  }

  /** Hand a signed envelope to the edge, to be enqueued as `task`. */
  async sendJob(task: string, envelope: Envelope): Promise<{ job_id: string; queue: string }> {
    const data = await this.json("POST", "v1/jobs", JSON.stringify({ task, envelope }));
    if (data["job_id"] !== envelope.job_id) {
      throw new InvalidRequest(`the edge at ${this.url} took job ${envelope.job_id} as ${String(data["job_id"])}`);
    }
    return { job_id: envelope.job_id, queue: String(data["queue"] ?? "") };
  }

  /** A job's state and reply, waiting up to `wait` seconds (at most 30) for an answer. */
  async job(jobId: string, wait = 0): Promise<JobAnswer> {
    const seconds = Math.max(0, Math.min(MAX_WAIT_SECONDS, Math.ceil(wait)));
    const data = await this.json("GET", `v1/jobs/${encodeURIComponent(jobId)}?wait=${seconds}`, undefined, undefined,
      seconds + this.requestTimeout);
    if (typeof data["state"] !== "string") throw new InvalidRequest(`the edge at ${this.url} gave job ${jobId} no state`);
    const mark = data["cancel_mark"];
    const cancelMark = typeof mark === "string" ? mark : mark === null ? null : undefined;
    return { state: data["state"], reply: data["reply"] ?? null, cancelMark };
  }

  /** Put `cancellation` (the job's sender's signed cancellation of it, `cancel.ts`) under the
   * job's cancel key unless its node took the job up first: the edge checks the signature and
   * that the signer sent the job (401, 403), and sets the key with `SET NX`. */
  async cancel(jobId: string, cancellation: string): Promise<CancelAnswer> {
    const data = await this.json("POST", `v1/jobs/${encodeURIComponent(jobId)}/cancel`, JSON.stringify({ cancellation }));
    if (data["job_id"] !== jobId || typeof data["cancelled"] !== "boolean") {
      throw new InvalidRequest(`the edge at ${this.url} answered the cancellation of job ${jobId} with ${JSON.stringify(data)}`);
    }
    const mark = data["mark"];
    return { cancelled: data["cancelled"], mark: typeof mark === "string" ? mark : null };
  }

  /** Leave sealed bytes by claim-check; their key. */
  async putBlob(data: Uint8Array): Promise<string> {
    const answer = await this.json("POST", "v1/blobs", data, "application/octet-stream");
    if (typeof answer["key"] !== "string") throw new InvalidRequest(`the edge at ${this.url} kept a blob without saying its key`);
    return answer["key"];
  }

  /** Take (once) the sealed bytes left under a claim-check key. */
  async getBlob(key: string): Promise<Uint8Array> {
    const response = await this.request("GET", `v1/blobs/${encodeURIComponent(key)}`);
    return new Uint8Array(await response.arrayBuffer());
  }

  /** The MPC hosts' listing entries, `owner/name` → `{card, signature}` (unverified). */
  async models(): Promise<Record<string, unknown>> {
    const data = await this.json("GET", "v1/models");
    const models = data["models"];
    if (typeof models !== "object" || models === null || Array.isArray(models)) {
      throw new InvalidRequest(`the edge at ${this.url} answered /v1/models without models`);
    }
    return models as Record<string, unknown>;
  }

  private async json(method: string, path: string, body?: string | Uint8Array, type = "application/json",
    timeout?: number): Promise<Record<string, unknown>> {
    const response = await this.request(method, path, body, type, timeout);
    let data: unknown;
    try {
      data = await response.json();
    } catch {
      throw new InvalidRequest(`the edge at ${this.url} answered ${method} /${path.split("?")[0]} with something other than JSON`);
    }
    if (typeof data !== "object" || data === null || Array.isArray(data)) {
      throw new InvalidRequest(`the edge at ${this.url} answered ${method} /${path.split("?")[0]} with ${JSON.stringify(data)}`);
    }
    return data as Record<string, unknown>;
  }

  private async request(method: string, path: string, body?: string | Uint8Array, type = "application/json",
    timeout?: number): Promise<Response> {
    const headers: Record<string, string> = { accept: "application/json", ...this.headers };
    if (body !== undefined) headers["content-type"] = type;
    let response: Response;
    try {
      response = await this.fetcher(new URL(path, this.url), {
        method, headers, body: body as BodyInit | undefined,
        signal: AbortSignal.timeout(1000 * (timeout ?? this.requestTimeout)),
      });
    } catch (exc) {
      throw new NodeUnavailable(`the edge at ${this.url} cannot be reached (${method} /${path.split("?")[0]}): ` +
        `${(exc as Error).message}. Is it running, and is this its address?`);
    }
    if (!response.ok) throw await httpError(response, this.url);
    return response;
  }
}

/** The typed error of an edge's error answer: `{"error": {"code", "message"}}`, else by status. */
async function httpError(response: Response, url: string): Promise<GridError> {
  let data: unknown;
  try {
    data = await response.json();
  } catch {
    data = undefined;
  }
  const error = typeof data === "object" && data !== null ? (data as Record<string, unknown>)["error"] : undefined;
  if (typeof error === "object" && error !== null && typeof (error as Record<string, unknown>)["code"] === "string") {
    return errorFromWire(error);
  }
  const what = `the edge at ${url} answered HTTP ${response.status} ${response.statusText}`;
  if (response.status === 404) return new NotFound(what);
  if (response.status >= 500) return new NodeUnavailable(what);
  return new InvalidRequest(what);
}
