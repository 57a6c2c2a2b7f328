/**
 * Message bodies this client sends and reads (Python's `protocol/messages.py` and
 * `protocol/mpc/wire.py`), as plain typed data. Bodies are read only from envelopes whose
 * signature checked out; the checks here keep a node of another version from crashing the client.
 */
import { isRecord } from "./envelope.js";
import { InvalidRequest } from "./errors.js";
import { isNodeInfo, type NodeInfo } from "./listing.js";
import { float, type PyJson } from "./pyjson.js";
import type { SealedValue } from "./seal.js";

export interface WireError {
  readonly code: string;
  readonly message: string;
  readonly job_id?: string | null;
}

/** What the grid may know about a dataset: never its values. */
export interface DatasetMeta {
  readonly node: string;
  readonly name: string;
  readonly shape: readonly number[];
  readonly dtype: string;
  readonly columns: readonly string[];
  readonly description: string;
  readonly tags: readonly string[];
  readonly bounds?: readonly (readonly [number, number])[] | null;
}

/** A reference to a result kept at its node. */
export interface PointerTicket {
  readonly node: string;
  readonly object_id: string;
  readonly job_id: string;
  readonly shape: readonly number[];
  readonly dtype: string;
  readonly sources: readonly string[];
}

/** How a DP release was made. */
export interface NoiseInfo {
  readonly mechanism: "laplace" | "gaussian";
  readonly epsilon: number;
  readonly delta: number;
  readonly scale: number;
  readonly sensitivity: number;
  readonly post_processed?: boolean;
}

/** A user's privacy budget on one dataset. */
export interface BudgetInfo {
  readonly node: string;
  readonly dataset: string;
  readonly user: string;
  readonly epsilon: number;
  readonly delta: number;
  readonly spent_epsilon: number;
  readonly spent_delta: number;
  readonly releases: number;
}

export type JobStatus = "done" | "failed" | "denied" | "pending_approval";

/** Where a request in a node's approval queue stands. */
export const REQUEST_STATUSES = ["pending", "approved", "denied", "expired", "cancelled"] as const;
export type RequestStatus = (typeof REQUEST_STATUSES)[number];

/** One of your own requests in a node's approval queue, as you may see it (Python's `RequestInfo`). */
export interface RequestInfo {
  /** Its job id: the id of the ticket that sent it. */
  readonly id: string;
  /** What it asks: `compute`, `raw_if_allowed`, `dp`, `train`, `raw`, `access`. */
  readonly kind: string;
  readonly datasets: readonly string[];
  /** The release asked for, as the node shows it. */
  readonly release: string;
  readonly status: RequestStatus;
  /** Unix time (seconds) it was sent, and decided (or closed); null while pending. */
  readonly created_at: number;
  readonly decided_at: number | null;
  /** A pending request's deadline (the node's `[approval] expire_after`); null: none, or not pending. */
  readonly expires_at: number | null;
  /** The owner's reason for a denial, or how it closed. */
  readonly decision: string;
}

/** A training's or an evaluation's figures, sealed to the requester (base64 of a sealed box). */
export interface SealedMetrics {
  readonly sealed: string;
}

export interface JobReply {
  readonly kind: "job_reply";
  readonly status: JobStatus;
  readonly ticket?: PointerTicket | null;
  readonly value?: SealedValue | null;
  readonly noise?: NoiseInfo | null;
  readonly budgets?: readonly BudgetInfo[];
  readonly metrics?: SealedMetrics | null;
  /** Secure aggregation: aggregation party → claim-check key of the share sealed to it. */
  readonly shares?: Readonly<Record<string, string>>;
  /** Your requests, in answer to `grid.requests()` and `grid.cancelRequest()` (else empty). */
  readonly requests?: readonly RequestInfo[];
  readonly error?: WireError | null;
}

export interface GatewayReply {
  readonly kind: "gateway_reply";
  readonly datasets: readonly DatasetMeta[];
  readonly nodes: readonly NodeInfo[];
  readonly error?: WireError | null;
}

export interface MpcReply {
  readonly kind: "mpc_reply";
  readonly error?: WireError | null;
  readonly outputs: Readonly<Record<string, string>>;
  readonly keys: Readonly<Record<string, string>>;
}

/** Which door of the release policy a job asks to leave by. */
export type Release = { door: "keep" } | { door: "raw" } | { door: "dp"; epsilon: number; delta: number };

export function releaseJson(release: Release): PyJson {
  // DPRelease's epsilon and delta are floats: Python writes 1.0 for epsilon=1
  return release.door === "dp"
    ? { door: "dp", epsilon: float(release.epsilon), delta: float(release.delta) }
    : { door: release.door };
}

/** The DP release asked for, or undefined for none. A delta without an epsilon is a mistake, not
 * a request for the exact value: it is refused, naming both fixes (Python's `dp_release`). */
export function dpRelease(epsilon: number | undefined, delta = 0): Release | undefined {
  if (epsilon === undefined) {
    if (delta) {
      throw new InvalidRequest(
        `delta=${delta} asks for a differentially private release, which needs an epsilon too: ` +
          `get({ epsilon: 0.2, delta: ${delta} }); or leave delta out for the exact value (released only if you may see it)`,
      );
    }
    return undefined;
  }
  if (!(epsilon > 0 && epsilon <= 100 && delta >= 0 && delta < 1)) {
    throw new InvalidRequest(`a DP release needs 0 < epsilon ≤ 100 and 0 ≤ delta < 1, not epsilon=${epsilon}, delta=${delta}`);
  }
  return { door: "dp", epsilon, delta };
}

const TAG = /^#[A-Za-z0-9_.-]+$/;
const NODE_NAME = /^[A-Za-z0-9_.#-]+$/;
const REQUEST_ID = /^[A-Za-z0-9_.:-]{1,80}$/;  // Python's messages.JobId

/** The body asking a node for your own requests in its approval queue, of one status or all
 * (Python's `checked(MyRequests, status=...)`). */
export function myRequests(status: RequestStatus | null = null): PyJson {
  if (status !== null && !(REQUEST_STATUSES as readonly string[]).includes(status)) {
    throw new InvalidRequest(`MyRequests: status = ${JSON.stringify(status)}: not one of ` +
      REQUEST_STATUSES.map((s) => `'${s}'`).join(", "));
  }
  return { kind: "requests", status };
}

/** The body withdrawing your pending request `request` (its job id) from a node's approval queue. */
export function cancelRequest(request: string): PyJson {
  if (typeof request !== "string" || !REQUEST_ID.test(request)) {
    throw new InvalidRequest(`CancelRequest: request = ${JSON.stringify(request)}: 1 to 80 letters, digits, '_', '.', ':' ` +
      "or '-' (a request's id, as ticket.id and grid.requests() show it)");
  }
  return { kind: "cancel", request };
}

export interface SearchQuery {
  readonly tags: readonly string[];
  readonly words: readonly string[];
  readonly node: string | null;
}

/** A search query, checked as Python's `checked(SearchQuery, ...)` would. */
export function searchQuery(tags: readonly string[], words: readonly string[] = [], node: string | null = null): SearchQuery {
  const bad = tags.filter((t) => t.length < 2 || t.length > 64 || !TAG.test(t));
  if (bad.length) {
    throw new InvalidRequest(`SearchQuery: tags ${JSON.stringify(bad)} are not tags (tags start with '#', e.g. '#birth-records')`);
  }
  if (tags.length > 16 || words.length > 16 || words.some((w) => w.length > 64)) {
    throw new InvalidRequest("SearchQuery: at most 16 tags and 16 words of 64 characters");
  }
  if (node !== null && (node.length > 128 || !NODE_NAME.test(node))) throw new InvalidRequest(`SearchQuery: bad node name '${node}'`);
  return { tags: [...tags], words: [...words], node };
}

/** Whether `meta` answers `query` as the gateway's registry decides (every tag, any case; every
 * word in its name or description, any case; the node asked). The gateway's signed answer is not
 * bound to the question, so the client checks it answers this one. */
export function matches(meta: DatasetMeta, query: SearchQuery): boolean {
  const tags = new Set(meta.tags.map((t) => t.toLowerCase()));
  const text = `${meta.name} ${meta.description}`.toLowerCase();
  return (query.node === null || meta.node === query.node) &&
    query.tags.every((t) => tags.has(t.toLowerCase())) &&
    query.words.every((w) => text.includes(w.toLowerCase()));
}

function fail(what: string, jobId?: string): never {
  throw new InvalidRequest(`malformed ${what} message`, { jobId });
}

const STATUSES: readonly string[] = ["done", "failed", "denied", "pending_approval"];

export function parseJobReply(data: unknown, jobId?: string): JobReply {
  if (!isRecord(data) || data["kind"] !== "job_reply") {
    throw new InvalidRequest(`expected a job_reply, got ${isRecord(data) ? String(data["kind"]) : "no message"}`, { jobId });
  }
  if (!STATUSES.includes(String(data["status"]))) fail("JobReply", jobId);
  checkError(data["error"], "JobReply", jobId);
  const value = data["value"];
  if (value != null && !(isRecord(value) && (typeof value["sealed"] === "string" || typeof value["claim_check"] === "string"))) {
    fail("JobReply (value)", jobId);
  }
  const ticket = data["ticket"];
  if (ticket != null && !(isRecord(ticket) && typeof ticket["object_id"] === "string" && Array.isArray(ticket["shape"]))) {
    fail("JobReply (ticket)", jobId);
  }
  if (data["budgets"] !== undefined && !Array.isArray(data["budgets"])) fail("JobReply (budgets)", jobId);
  const metrics = data["metrics"];
  if (metrics != null && !(isRecord(metrics) && typeof metrics["sealed"] === "string")) fail("JobReply (metrics)", jobId);
  const shares = data["shares"] ?? {};
  if (!isRecord(shares) || !Object.values(shares).every((k) => typeof k === "string")) fail("JobReply (shares)", jobId);
  const requests = data["requests"] ?? [];
  if (!Array.isArray(requests)) fail("JobReply (requests)", jobId);
  return { ...data, shares, requests: requests.map((r) => requestInfo(r, jobId)) } as unknown as JobReply;
}

const finite = (v: unknown): v is number => typeof v === "number" && Number.isFinite(v);

/** A `RequestInfo` as a node sends it (its optional fields filled in), or InvalidRequest. */
function requestInfo(value: unknown, jobId?: string): RequestInfo {
  if (!isRecord(value)) fail("JobReply (requests)", jobId);
  const { id, kind, datasets, release, status, created_at } = value;
  const decided = value["decided_at"] ?? null;
  const expires = value["expires_at"] ?? null;
  const decision = value["decision"] ?? "";
  if (typeof id !== "string" || !REQUEST_ID.test(id) || typeof kind !== "string" || typeof release !== "string" ||
    !Array.isArray(datasets) || !datasets.every((d) => typeof d === "string") ||
    !(REQUEST_STATUSES as readonly unknown[]).includes(status) || !finite(created_at) ||
    (decided !== null && !finite(decided)) || (expires !== null && !finite(expires)) || typeof decision !== "string") {
    fail("JobReply (requests)", jobId);
  }
  return { id, kind, datasets: [...datasets] as string[], release, status: status as RequestStatus, created_at,
    decided_at: decided as number | null, expires_at: expires as number | null, decision };
}

export function parseGatewayReply(data: unknown, jobId?: string): GatewayReply {
  if (!isRecord(data) || data["kind"] !== "gateway_reply") fail("GatewayReply", jobId);
  checkError(data["error"], "GatewayReply", jobId);
  const datasets = data["datasets"] ?? [];
  const nodes = data["nodes"] ?? [];
  if (!Array.isArray(datasets) || !datasets.every(isDatasetMeta) || !Array.isArray(nodes) || !nodes.every(isNodeInfo)) {
    fail("GatewayReply", jobId);
  }
  return { kind: "gateway_reply", datasets: datasets as DatasetMeta[], nodes: nodes as NodeInfo[], error: data["error"] as WireError | null };
}

export function parseMpcReply(data: unknown, jobId?: string): MpcReply {
  if (!isRecord(data) || data["kind"] !== "mpc_reply") fail("MpcReply", jobId);
  checkError(data["error"], "MpcReply", jobId);
  const outputs = data["outputs"] ?? {};
  const keys = data["keys"] ?? {};
  const strings = (v: unknown): boolean => isRecord(v) && Object.values(v).every((x) => typeof x === "string");
  if (!strings(outputs) || !strings(keys)) fail("MpcReply", jobId);
  return { kind: "mpc_reply", error: data["error"] as WireError | null, outputs: outputs as Record<string, string>, keys: keys as Record<string, string> };
}

function checkError(error: unknown, what: string, jobId?: string): void {
  if (error != null && !(isRecord(error) && typeof error["code"] === "string" && typeof error["message"] === "string")) {
    fail(what, jobId);
  }
}

function isDatasetMeta(value: unknown): value is DatasetMeta {
  if (!isRecord(value)) return false;
  const { node, name, shape, dtype } = value;
  const columns = value["columns"] ?? [];
  const tags = value["tags"] ?? [];
  const ok = typeof node === "string" && typeof name === "string" && typeof dtype === "string" && Array.isArray(shape) &&
    shape.every((d) => Number.isInteger(d) && d >= 0) && Array.isArray(columns) && Array.isArray(tags);
  if (ok) {
    value["columns"] = columns;
    value["tags"] = tags;
    value["description"] = typeof value["description"] === "string" ? value["description"] : "";
  }
  return ok;
}
