/**
 * The entry point: connect to a grid through its HTTP edge, as one identity; find data; compute
 * on it remotely; query models served under MPC.
 *
 *     import { Grid, Identity, ready } from "@gridq/client";
 *     await ready();
 *     const grid = await Grid.connect("http://127.0.0.1:8750", Identity.fromJson(keyFile), { gatewayKey });
 *     const births = (await grid.search("#birth-records", "#february"))["hospital"][0];
 *     await births.col("weight").mean().get();                   // Tensor
 *     await births.col("weight").mean().get({ epsilon: 0.1 });   // PrivateValue
 *
 * Trust: the edge relays and is trusted with nothing. The gateway's key is pinned by the caller
 * (`gatewayKey`, from the grid's operator) or trusted on first use (`pins`); the gateway's signed
 * node listing gives each node's key; every reply is checked here — signed by the node asked,
 * addressed to this identity, for this job, unexpired, its nonce unseen — and every released
 * value is opened here with this identity's key.
 */
import { randomHex, unhex } from "./bytes.js";
import { unpack } from "./codec.js";
import { Edge, type EdgeOptions, type JobAnswer } from "./edge.js";
import { bodyJson, type Envelope, MemoryNonceStore, now, openEnvelope, sealEnvelope } from "./envelope.js";
import {
  BadSignature, BrokerUnavailable, errorFromWire, GatewayKeyChanged, GridError, InvalidRequest, JobFailed, NodeUnavailable, NotFound,
} from "./errors.js";
import { PublicIdentity, type Identity } from "./identity.js";
import { type NodeInfo, nodeKeys, openListing } from "./listing.js";
import {
  type BudgetInfo, cancelRequest, type DatasetMeta, matches, type MpcReply, myRequests, parseGatewayReply, parseMpcReply,
  type RequestInfo, type RequestStatus, searchQuery,
} from "./messages.js";
import { inFeatures, type ModelCard, outputLabel, prepareQuery, qualified, queryInput, reconstruct, verifySignedCard } from "./mpc.js";
import { fingerprint, type GatewayPins, MemoryPins } from "./pins.js";
import { DataPointer } from "./pointers.js";
import { type PyJson, utf8 } from "./pyjson.js";
import { isBlobKey, openSigned } from "./seal.js";
import { ready } from "./sodium.js";
import { Tensor } from "./tensor.js";
import { backoff, JobTicket, PUBLIC, type TicketHost } from "./ticket.js";

export const GATEWAY = "gateway";
/** Task names (Python's `protocol.contract.Tasks`): the edge enqueues by them. */
export const Tasks = { RUN_JOB: "gridq.node.run_job", MPC_QUERY: "gridq.mpc.query" } as const;
const JOB_ID = /^[A-Za-z0-9_.-]{1,128}:[0-9a-f]{32}$/;
/** How long `grid.requests()` asked of every node waits for their answers (at most the grid's
 * timeout): an idle node answers in milliseconds, and one that has not by then is named, not waited
 * for (Python's `orchestrator.grid.REQUESTS_WAIT_SECONDS`). */
export const REQUESTS_WAIT_SECONDS = 5;
/** A worker killed without a word still counts as up this long (Python's `protocol.contract.ALIVE_TTL_SECONDS`). */
const ALIVE_TTL_SECONDS = 20;
/** A ticket's status while its node has not answered. */
const SILENT = new Set(["queued", "running"]);

/** Your requests as `grid.requests()` lists them — an array, oldest first — and `missing`: the nodes
 * asked that did not answer in time (node → why), whose requests are not in it. */
export type RequestList = RequestInfo[] & { readonly missing: Readonly<Record<string, string>> };

function requestList(found: RequestInfo[], missing: Record<string, string>): RequestList {
  found.sort((a, b) => a.created_at - b.created_at || cmp(a.id, b.id));
  // not enumerable: the list still equals (deep-equals, serialises as) the plain array of its requests
  return Object.defineProperty(found, "missing", { value: Object.freeze(missing), enumerable: false }) as RequestList;
}

export interface ConnectOptions extends EdgeOptions {
  /** The gateway's public key (`gridq1:…`, from the grid's operator). Without it, the key the
   * edge presents is trusted on first use and pinned in `pins`. */
  gatewayKey?: string;
  pins?: GatewayPins;
  /** Seconds to wait for a job's answer (default 60). */
  timeout?: number;
  /** Owners' keys known out of band: a served model's card must carry its owner's key if known. */
  trusted?: readonly PublicIdentity[];
}

export interface SearchOptions {
  words?: readonly string[];
  node?: string;
}

export class Grid implements TicketHost {
  private readonly nonces = new MemoryNonceStore();
  private readonly keys = new Map<string, PublicIdentity>();
  private listingIssuedAt = 0;

  private constructor(
    readonly edge: Edge,
    readonly identity: Identity,
    readonly gateway: PublicIdentity,
    readonly timeout: number,
    private readonly trusted: readonly PublicIdentity[],
  ) {}

  /** Connect through the edge at `edgeUrl` as `identity`; learns the nodes' keys from the
   * gateway's signed listing. */
  static async connect(edgeUrl: string, identity: Identity, options: ConnectOptions = {}): Promise<Grid> {
    await ready();
    const edge = new Edge(edgeUrl, options);
    const posted = await edge.gateway();
    let key = options.gatewayKey;
    if (key === undefined) {
      const pins = options.pins ?? new MemoryPins();
      PublicIdentity.parse(GATEWAY, posted.public_key); // a key at all, before it is pinned
      key = await pins.pin(edge.url, posted.public_key);
      if (key !== posted.public_key) {
        throw new GatewayKeyChanged(
          `the gateway key the edge ${edge.url} presents (${fingerprint(posted.public_key)}) is not the one pinned for it ` +
            `in ${pins.where} (${fingerprint(key)}). Either the edge (or what is behind it) poses as the gateway, or the ` +
            "operator rotated the key: ask them for the new key's fingerprint, and pass the key as gatewayKey.",
        );
      }
    }
    const grid = new Grid(edge, identity, PublicIdentity.parse(GATEWAY, key), options.timeout ?? 60, options.trusted ?? []);
    grid.acceptListing(posted.listing);
    return grid;
  }

  // --- the registry ------------------------------------------------------------------------

  /** Datasets carrying every tag ("#february") — and every word of `{words}`, at `{node}` — by node. */
  async search(...args: (string | SearchOptions)[]): Promise<Record<string, DataPointer[]>> {
    const tags = args.filter((a): a is string => typeof a === "string");
    const options = (args.find((a) => typeof a !== "string") ?? {}) as SearchOptions;
    const query = searchQuery(tags, options.words ?? [], options.node ?? null);
    // a fresh id of our own: the gateway signs its answer for it, so no other search's answer passes as this one's
    const jobId = randomHex(16);
    const { reply } = await this.edge.search(query, jobId);
    const env = openEnvelope(reply, { recipient: PUBLIC, keyring: new Map([[GATEWAY, this.gateway]]), nonces: this.nonces,
      deliveryId: jobId, jobId });
    const body = parseGatewayReply(bodyJson(env), jobId);
    if (body.error != null) throw errorFromWire(body.error);
    this.learn(body.nodes);
    const found: Record<string, DataPointer[]> = {};
    for (const meta of body.datasets) {
      if (!matches(meta, query)) {
        // signed for this job id, so for this question: a dataset that does not fit it is a gateway's error
        throw new BadSignature(`the search answer lists ${meta.node}/${meta.name}, which does not match this search: ` +
          "refused (an answer to another search?)", { jobId });
      }
      (found[meta.node] ??= []).push(this.pointer(meta));
    }
    return found;
  }

  async datasets(): Promise<DataPointer[]> {
    return Object.values(await this.search()).flat();
  }

  /** The nodes the gateway lists (from its signed listing, read again now). */
  async nodes(): Promise<NodeInfo[]> {
    return this.refreshListing();
  }

  /** Your privacy budget at `node`: on one dataset, or on each one it publishes. */
  async budget(node: string, dataset?: string): Promise<BudgetInfo[]> {
    const ticket = await this.submit(node, "budget", { kind: "budget", dataset: dataset ?? null });
    return [...((await ticket.reply()).budgets ?? [])];
  }

  // --- your requests in the nodes' approval queues ----------------------------------------------

  /** Your own requests in the approval queue of `node` (null or undefined: of every node whose
   * worker is up), of one `status` — `pending`, `approved`, `denied`, `expired`, `cancelled` — or
   * all, oldest first: each with its id (its ticket's), kind, datasets, release, status, when it
   * was sent and decided, and when a pending one expires (the node's `[approval] expire_after`).
   * Nobody else's requests are ever shown.
   *
   * Asked of every node, they are asked at once and waited for `REQUESTS_WAIT_SECONDS` (at most the
   * grid's timeout): a node that says nothing by then — its worker killed since it last said it was
   * up, or busy — is left out and named in the list's `missing` (node → why), as Python's
   * `grid.requests()` names it. Asked of one `node`, it is waited for up to the timeout, and one
   * that does not answer throws NodeUnavailable. */
  async requests(node?: string | null, status?: RequestStatus | null): Promise<RequestList> {
    const query = myRequests(status ?? null);
    if (node != null) {
      const reply = await (await this.submit(node, "requests", query)).reply();
      return requestList([...(reply.requests ?? [])], {});
    }
    const nodes = (await this.nodes()).map((info) => info.node);
    const tickets = await Promise.all(nodes.map(async (n) => {
      try {
        return await this.submit(n, "requests", query);
      } catch (exc) {
        // the edge refuses a job for a node no worker serves (an MPC-only node, one that is down):
        // that node has no queue to list
        if (exc instanceof NodeUnavailable && !(exc instanceof BrokerUnavailable)) return undefined;
        throw exc;
      }
    }));
    const wait = Math.min(this.timeout, REQUESTS_WAIT_SECONDS);
    const missing = new Map<string, string>();
    const replies = await Promise.all(tickets.map(async (ticket) => {
      if (ticket === undefined) return undefined;
      try {
        return await ticket.reply(wait);
      } catch (exc) {
        if (!(exc instanceof NodeUnavailable) || exc instanceof BrokerUnavailable) throw exc;
        // the node's own answer (an error it signed, or one just in) is its answer; nothing yet is a silence
        if (!SILENT.has(await ticket.status())) return ticket.reply(0);
        missing.set(ticket.node, `no answer within ${wait} s: its worker may have stopped in the last ` +
          `${ALIVE_TTL_SECONDS} s (it still counts as up), or be busy; asked alone, it is waited for up to ${this.timeout} s`);
        return undefined;
      }
    }));
    const found = replies.flatMap((reply) => [...(reply?.requests ?? [])]);
    return requestList(found, Object.fromEntries([...missing].sort(([a], [b]) => cmp(a, b))));
  }

  /** Withdraw your pending request `requestId` (its ticket's id) from its node's approval queue: it
   * never runs, its owner no longer sees it waiting, and its ticket throws JobCancelled.
   * PermissionDenied if it is another user's request, InvalidRequest if it was decided or expired
   * already (cancelling it twice is no error), NotFound if the node has no such request.
   * `requestId` may be a unique prefix of one of yours (`node:` and some hex digits). The request,
   * as it now stands. */
  async cancelRequest(requestId: string): Promise<RequestInfo> {
    const colon = requestId.indexOf(":");
    const node = colon < 0 ? requestId : requestId.slice(0, colon);
    const digits = colon < 0 ? "" : requestId.slice(colon + 1);
    if (!JOB_ID.test(requestId)) {
      if (!digits || !JOB_ID.test(`${node}:${digits.padEnd(32, "0")}`)) {
        throw new InvalidRequest(`'${requestId}' is not a request id: they read '<node>:<32 hex digits>' (or a prefix of ` +
          "one of yours), as ticket.id and grid.requests() show them");
      }
      const mine = (await this.requests(node)).map((r) => r.id).filter((id) => id.startsWith(requestId));
      if (mine.length !== 1) {
        const message = `'${requestId}' names ${mine.length} of your requests at '${node}'` +
          (mine.length ? ` (${mine.join(", ")}): give more of the id` : "; grid.requests() lists yours");
        throw mine.length ? new InvalidRequest(message) : new NotFound(message);
      }
      requestId = mine[0] as string;
    }
    const reply = await (await this.submit(node, "cancel", cancelRequest(requestId))).reply();
    const info = reply.requests?.[0];
    if (info === undefined || info.id !== requestId) {
      throw new JobFailed(`'${node}' answered the cancellation of ${requestId} without that request`, { jobId: requestId });
    }
    return info;
  }

  /** A dataset's mock twin (synthetic rows, same schema: public). */
  async mock(node: string, dataset: string): Promise<Tensor> {
    return (await this.submit(node, "mock", { kind: "mock", dataset })).value();
  }

  // --- jobs ----------------------------------------------------------------------------------

  /** Send one job to `node` (pointers build them): its ticket, at once. */
  async submit(node: string, kind: string, body: PyJson): Promise<JobTicket> {
    await this.nodeKey(node); // an unknown node fails now, not after a timeout
    const jobId = `${node}:${randomHex(16)}`;
    await this.send(Tasks.RUN_JOB, node, kind, body, jobId);
    return new JobTicket(this, jobId);
  }

  /** Pick up a job submitted earlier (by this process or another one). */
  async ticket(jobId: string): Promise<JobTicket> {
    if (!JOB_ID.test(jobId)) {
      throw new InvalidRequest(`'${jobId}' is not a job id: they read '<node>:<32 hex digits>', as ticket.id prints them`);
    }
    await this.nodeKey(jobId.split(":")[0] as string);
    await this.edge.job(jobId, 0); // NotFound for an id never sent (or expired)
    return new JobTicket(this, jobId);
  }

  private async send(task: string, node: string, kind: string, body: PyJson, jobId: string): Promise<Envelope> {
    const envelope = sealEnvelope(this.identity, { recipient: node, kind, jobId, body });
    await this.edge.sendJob(task, envelope);
    return envelope;
  }

  // --- what tickets need (TicketHost) ---------------------------------------------------------

  poll(jobId: string, wait: number): Promise<JobAnswer> {
    return this.edge.job(jobId, wait);
  }

  /** As Python's `Transport.cancel`, through the edge's `POST /v1/jobs/{id}/cancel`. */
  async cancelJob(jobId: string, mark: string): Promise<string | null> {
    const answer = await this.edge.cancel(jobId, mark);
    return answer.cancelled ? null : (answer.mark ?? "");
  }

  /** `node`'s signed reply to `jobId`, verified as Python's `Transport.verify`. */
  async verifyReply(raw: unknown, node: string, jobId: string): Promise<Envelope> {
    const key = await this.nodeKey(node);
    // a refusal of a message that named no sender is addressed to anyone; it carries no value
    const addressed = typeof raw === "object" && raw !== null && (raw as Record<string, unknown>)["recipient"] === PUBLIC;
    return openEnvelope(raw, { recipient: addressed ? PUBLIC : this.identity.name, keyring: new Map([[node, key]]),
      nonces: this.nonces, deliveryId: jobId, jobId });
  }

  claim(key: string): Promise<Uint8Array> {
    return this.edge.getBlob(key);
  }

  // --- node keys ------------------------------------------------------------------------------

  /** A node's key as the gateway lists it; NotFound for a node it does not list. */
  async nodeKey(node: string): Promise<PublicIdentity> {
    if (!this.keys.has(node)) await this.refreshListing();
    const key = this.keys.get(node);
    if (key === undefined) {
      const known = [...this.keys.keys()].sort().join(", ") || "none";
      throw new NotFound(`node '${node}' is not registered at the gateway; registered: ${known}`);
    }
    return key;
  }

  private async refreshListing(): Promise<NodeInfo[]> {
    return this.acceptListing((await this.edge.gateway()).listing);
  }

  private acceptListing(posted: string): NodeInfo[] {
    let listing;
    try {
      listing = openListing(posted, this.gateway, { now: now(), newerThan: this.listingIssuedAt });
    } catch (exc) {
      if (exc instanceof BadSignature) {
        throw new BadSignature(`${exc.message}: the node listing the edge ${this.edge.url} gave is not signed by the ` +
          `gateway key ${fingerprint(this.gateway.text())}`);
      }
      throw exc;
    }
    this.listingIssuedAt = listing.issued_at;
    this.learn(listing.nodes);
    return [...listing.nodes];
  }

  private learn(nodes: readonly NodeInfo[]): void {
    for (const [name, key] of nodeKeys(nodes)) this.keys.set(name, key);
  }

  private pointer(meta: DatasetMeta): DataPointer {
    return new DataPointer(this, meta.node, { kind: "dataset", name: meta.name }, { shape: meta.shape, dtype: meta.dtype }, meta);
  }

  // --- encrypted ML-as-a-service ---------------------------------------------------------------

  /** The models served encrypted on this grid: cards their owner signed and their host
   * countersigned; one per `owner/name` (the newest). */
  async models(): Promise<ModelCard[]> {
    const cards = new Map<string, ModelCard>();
    for (const entry of Object.values(await this.edge.models())) {
      let card: ModelCard;
      try {
        card = await this.listedCard(entry);
      } catch (exc) {
        if (exc instanceof GridError) continue; // not its owner's (and host's) card: not a model of this grid
        throw exc;
      }
      const known = cards.get(qualified(card));
      if (known === undefined || known.issued_at < card.issued_at) cards.set(qualified(card), card);
    }
    return [...cards.values()].sort((a, b) => (a.name === b.name ? cmp(a.owner, b.owner) : cmp(a.name, b.name)));
  }

  private async listedCard(entry: unknown): Promise<ModelCard> {
    const record = (typeof entry === "object" && entry !== null ? entry : {}) as Record<string, unknown>;
    const text = record["card"];
    const signature = record["signature"];
    if (typeof text !== "string" || typeof signature !== "string") throw new InvalidRequest("malformed model listing");
    let signed: unknown;
    try {
      signed = JSON.parse(text);
    } catch {
      throw new InvalidRequest("malformed model listing");
    }
    const owner = (signed as { card?: { owner?: unknown } } | null)?.card?.owner;
    const card = verifySignedCard(signed, typeof owner === "string" ? this.knownKey(owner) : undefined);
    (await this.nodeKey(card.host)).verify(utf8(text), unhex(signature, "host signature"));
    return card;
  }

  private knownKey(name: string): PublicIdentity | undefined {
    if (name === this.identity.name) return this.identity.public;
    return this.trusted.find((k) => k.name === name);
  }

  /** The served model's output on `x` (one row, or a batch of rows), computed on shares: nobody
   * but you sees `x` or the result. `name` is `owner/model`, or `model` if one owner serves it. */
  async query(name: string, x: Tensor | readonly number[] | readonly (readonly number[])[]): Promise<Tensor> {
    const card = await this.find(name);
    const input = queryInput(x, inFeatures(card), name);
    const partyKeys = new Map<string, PublicIdentity>();
    for (const p of card.parties) partyKeys.set(p, await this.nodeKey(p));
    await this.nodeKey(card.host);
    const prepared = prepareQuery(this.identity, card, partyKeys, input.values, input.rows, now());
    const inputs: Record<string, string> = {};
    for (const [party, blob] of prepared.blobs) inputs[party] = await this.edge.putBlob(blob);
    const jobId = randomHex(16);
    await this.send(Tasks.MPC_QUERY, card.host, "mpc_query", { kind: "mpc_query", query: prepared.signed, inputs }, jobId);
    const reply = await this.mpcAnswer(card.host, jobId);
    const outputs: BigInt64Array[] = [];
    for (const party of card.parties) {
      const key = reply.outputs[party];
      if (key === undefined || !isBlobKey(key)) throw new JobFailed(`the host gave no output share of party '${party}'`, { jobId });
      const sealed = await this.edge.getBlob(key);  // signed by the party, for this query
      const { tensors } = unpack(openSigned(this.identity, partyKeys.get(party) as PublicIdentity,
        outputLabel(prepared.query.id, party), sealed));
      const y = tensors["y"];
      if (y === undefined || y.dtype !== "int64" || y.ndim !== 2 || y.shape[0] !== input.rows ||
        (outputs[0] !== undefined && outputs[0].length !== y.size)) {
        throw new JobFailed(`party '${party}''s output share is not a batch of ${input.rows} rows`, { jobId });
      }
      outputs.push(y.data as BigInt64Array);
    }
    const width = (outputs[0] as BigInt64Array).length / input.rows;
    const decoded = Array.from(prepared.fixed.decode(reconstruct(outputs)));
    return Tensor.fromFlat(decoded, input.single ? [width] : [input.rows, width], input.dtype);
  }

  private async find(name: string): Promise<ModelCard> {
    const slash = name.lastIndexOf("/");
    const owner = slash < 0 ? "" : name.slice(0, slash);
    const model = name.slice(slash + 1);
    const found = (await this.models()).filter((c) => c.name === model && (owner === "" || c.owner === owner));
    if (found.length === 0) throw new NotFound(`no served model '${name}'; grid.models() lists them`);
    if (found.length > 1) {
      throw new InvalidRequest(`${found.length} owners serve a model '${model}'; name the one you mean: ` +
        found.map((c) => `'${qualified(c)}'`).join(" or "));
    }
    return found[0] as ModelCard;
  }

  /** The host's verified answer to an MPC request; its typed error if it carries one. */
  private async mpcAnswer(host: string, jobId: string): Promise<MpcReply> {
    const deadline = Date.now() + this.timeout * 1000;
    let pause = 250;
    for (;;) {
      const started = Date.now();
      const answer = await this.edge.job(jobId, Math.max(0, Math.min(30, (deadline - started) / 1000)));
      if (answer.state === "SUCCESS") {
        const reply = parseMpcReply(bodyJson(await this.verifyReply(answer.reply, host, jobId)), jobId);
        if (reply.error != null) throw errorFromWire({ ...reply.error, job_id: reply.error.job_id ?? jobId });
        return reply;
      }
      if (Date.now() >= deadline) break;
      if (Date.now() - started < 200) pause = await backoff(pause, deadline); // an edge that does not long-poll
    }
    throw new NodeUnavailable(`'${host}' did not answer in ${this.timeout} s; is its \`gridq mpc start\` running?`, { jobId });
  }
}

function cmp(a: string, b: string): number {
  return a < b ? -1 : a > b ? 1 : 0;
}
