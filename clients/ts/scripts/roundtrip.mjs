#!/usr/bin/env node
// The built TypeScript client (dist/) answering requests from the Python side's interop tests
// (tests/unit/test_ts_interop.py): reads {"requests": [{"op": ..., ...}, ...]} as JSON on stdin,
// prints {"results": [...]} — one result per request, or {"error": {"code", "message"}}.
//
//   echo '{"requests": [{"op": "seal", "public_key": "gridq1:…", "plaintext_b64": "aGk="}]}' \
//     | node clients/ts/scripts/roundtrip.mjs
//
// Byte strings travel as standard base64, int64 values as decimal strings.
import { existsSync, readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";

const dist = new URL("../dist/index.js", import.meta.url);
if (!existsSync(fileURLToPath(dist))) {
  process.stderr.write("clients/ts/dist is missing: build the client first (`make ts`, or `npm ci && npm run build` in clients/ts)\n");
  process.exit(2);
}
const gridq = await import(dist.href);
const messages = await import(new URL("../dist/messages.js", import.meta.url).href); // the reply parsers, the request bodies
await gridq.ready();

const bytes = (text) => new Uint8Array(Buffer.from(text, "base64"));
const text64 = (data) => Buffer.from(data).toString("base64");
const hex = (data) => Buffer.from(data).toString("hex");

// an explicit table, not whatever name the request holds
const PLAN_METHODS = new Set(["col", "index", "add", "sub", "mul", "div", "pow", "radd", "rsub", "rmul", "rdiv", "neg", "abs",
  "exp", "log", "sqrt", "lt", "le", "gt", "ge", "eq", "ne", "sum", "mean", "min", "max", "std", "var", "count", "clamp", "to",
  "reshape", "transpose"]);

const OPS = {
  /** Sign an envelope as the client sends it to the edge. */
  sign_envelope: (r) => gridq.sealEnvelope(gridq.Identity.fromJson(r.key_file), {
    recipient: r.recipient, kind: r.kind, jobId: r.job_id, body: r.body, now: r.now, ttl: r.ttl,
  }),
  /** Verify an envelope (a Python-signed reply) as the client verifies replies. */
  open_envelope: (r) => {
    const keyring = new Map(Object.entries(r.keyring).map(([name, key]) => [name, gridq.PublicIdentity.parse(name, key)]));
    const env = gridq.openEnvelope(r.envelope, {
      recipient: r.recipient, keyring, nonces: new gridq.MemoryNonceStore(), deliveryId: r.job_id, jobId: r.job_id, now: r.now,
    });
    return { body: gridq.bodyJson(env) };
  },
  /** Verify a Python-signed reply, then read its body as the client reads that kind (job_reply,
   * gateway_reply, mpc_reply): what the client makes of it. */
  parse_reply: (r) => {
    const keyring = new Map(Object.entries(r.keyring).map(([name, key]) => [name, gridq.PublicIdentity.parse(name, key)]));
    const env = gridq.openEnvelope(r.envelope, {
      recipient: r.recipient, keyring, nonces: new gridq.MemoryNonceStore(), deliveryId: r.job_id, jobId: r.job_id, now: r.now,
    });
    const parse = { job_reply: messages.parseJobReply, gateway_reply: messages.parseGatewayReply, mpc_reply: messages.parseMpcReply };
    if (!(r.parser in parse)) throw new Error(`no parser ${r.parser}`);
    return { parsed: parse[r.parser](gridq.bodyJson(env), r.job_id) };
  },
  /** The body text of MyRequests / CancelRequest as the client sends it. */
  my_requests: (r) => ({ body: gridq.pyDumps(messages.myRequests(r.status ?? null)) }),
  cancel_request: (r) => ({ body: gridq.pyDumps(messages.cancelRequest(r.request)) }),
  /** A signed cancellation of a job (protocol/cancel.py's mark), and the check of one. */
  cancellation: (r) => ({ mark: gridq.cancellation(gridq.Identity.fromJson(r.key_file), r.job_id) }),
  cancelled_by: (r) => ({ ok: gridq.cancelledBy(r.mark, gridq.PublicIdentity.parse(r.name, r.public_key), r.job_id) }),
  /** The client's error classes: wire code → class name, parent's code, retryable. */
  errors: () => ({
    errors: Object.fromEntries([...gridq.ERRORS_BY_CODE].map(([code, cls]) => {
      const parent = Object.getPrototypeOf(cls);
      return [code, { class: cls.name, parent: parent === Error ? null : parent.code, retryable: cls.retryable }];
    })),
  }),
  seal: (r) => ({ sealed_b64: text64(gridq.PublicIdentity.parse("recipient", r.public_key).seal(bytes(r.plaintext_b64))) }),
  open: (r) => ({ plaintext_b64: text64(gridq.Identity.fromJson(r.key_file).unseal(bytes(r.sealed_b64))) }),
  /** An MPC input share: packed {"x": int64}, sealed to the party and signed for the label. */
  seal_signed_share: (r) => {
    const x = gridq.Tensor.fromFlat(r.values.map(BigInt), r.shape, "int64");
    const blob = gridq.sealSigned(gridq.Identity.fromJson(r.key_file), gridq.PublicIdentity.parse(r.party, r.party_key), r.label,
      gridq.pack({ x }));
    return { blob_b64: text64(blob) };
  },
  sign_query: (r) => ({ signature: hex(gridq.Identity.fromJson(r.key_file).sign(gridq.queryDigest(r.query))) }),
  card_digest: (r) => ({ digest: gridq.cardDigest(r.card) }),
  encode_tensor: (r) => ({
    bytes_b64: text64(gridq.encodeTensor(gridq.Tensor.fromFlat(r.dtype === "int64" ? r.values.map(BigInt) : r.values, r.shape, r.dtype))),
  }),
  decode_tensor: (r) => {
    const t = gridq.decodeTensor(bytes(r.bytes_b64));
    return { dtype: t.dtype, shape: t.shape, values: t.values().map((v) => (typeof v === "bigint" ? v.toString() : v)) };
  },
  fixed_encode: (r) => ({ encoded: Array.from(new gridq.FixedPoint(r.frac_bits).encode(r.values), String) }),
  /** The RunJob body text of a plan built from a list of method calls on a dataset pointer. */
  plan: (r) => {
    let expr = new gridq.DataPointer(null, r.node, { kind: "dataset", name: r.name }, { shape: r.shape, dtype: r.dtype },
      { node: r.node, name: r.name, shape: r.shape, dtype: r.dtype, columns: r.columns, description: "", tags: [] });
    for (const [method, ...args] of r.calls) {
      if (!PLAN_METHODS.has(method)) throw new Error(`${method} is not an expression method`);
      expr = expr[method](...args);
    }
    return { body: gridq.pyDumps(expr.runJob(r.release ?? { door: "raw" })) };
  },
};

const { requests } = JSON.parse(readFileSync(0, "utf8"));
const results = requests.map((request) => {
  try {
    const op = OPS[request.op];
    if (op === undefined) throw new Error(`unknown op ${request.op}`);
    return op(request);
  } catch (exc) {
    return { error: { code: exc.code ?? "error", message: String(exc.message ?? exc) } };
  }
});
process.stdout.write(JSON.stringify({ results }) + "\n");
