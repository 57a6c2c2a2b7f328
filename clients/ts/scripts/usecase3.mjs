#!/usr/bin/env node
// Use case 3 (README.md, "Use case 3 — encrypted ML-as-a-service") from TypeScript, in Node,
// through a live grid's HTTP edge: the built package (dist/), the querier's key file, the
// gateway's key pinned. The querier's input is split into additive shares sealed to the parties
// here, and the parties' output shares are opened and added up here: the edge, the host and the
// broker see neither. tests/integration/test_ts_mpc.py runs it against a live MPC pool and
// compares what it prints with the plaintext model and the Python client's grid.query.
//
//   echo '{"edge": "http://127.0.0.1:8750", "key": "'$GRIDQ_HOME'/keys/bob.key",
//          "gateway_key": "'$(cat $GRIDQ_HOME/keys/gateway.pub)'", "model": "dana/seed-linear",
//          "x": [[1.0, 2.0, -0.5, 3.0], [-1.5, 0.25, 4.0, -2.0]]}' \
//     | node clients/ts/scripts/usecase3.mjs
//   node clients/ts/scripts/usecase3.mjs '{"edge": …}'          # or the same JSON as the one argument
//
// Input: edge (URL), key (the querier's key file), gateway_key (gridq1:… text), model
// ("owner/name", or "name" if one owner serves it), and either x (one input: a row of numbers,
// or a batch of rows) or inputs (several, queried one after the other); optional: dtype of the
// inputs ("float32", as torch's default, or "float64"), timeout (seconds a query may take, 60).
//
// Output, on stdout, one JSON object: identity, edge, the model's card as listed (or null if
// the grid lists no such model), and "outputs": for each input, in order, either {"ok": true,
// "value": {"dtype", "shape", "values"}} (row-major; non-finite floats as strings) or {"ok":
// false, "error": {"code", "name", "message"}}. Exit status 0 whenever the queries ran (a
// refusal is a result); 2 on a bad input or a failure outside them (the edge unreachable), said
// on stderr.
import { existsSync, readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";

const dist = new URL("../dist/index.js", import.meta.url);
if (!existsSync(fileURLToPath(dist))) {
  process.stderr.write("clients/ts/dist is missing: build the client first (`make ts`, or `npm ci && npm run build` in clients/ts)\n");
  process.exit(2);
}
const { Grid, GridError, Tensor } = await import(dist.href);
const { readKey } = await import(new URL("../dist/node.js", import.meta.url).href);

function fail(message) {
  process.stderr.write(`usecase3: ${message}\n`);
  process.exit(2);
}

const isRow = (v) => Array.isArray(v) && v.length > 0 && v.every((n) => typeof n === "number");
const isInput = (v) => isRow(v) || (Array.isArray(v) && v.length > 0 && v.every(isRow));

function input() {
  const text = process.argv[2] ?? readFileSync(0, "utf8");
  let args;
  try {
    args = JSON.parse(text);
  } catch (exc) {
    fail(`the input is not JSON: ${exc.message}`);
  }
  for (const field of ["edge", "key", "gateway_key", "model"]) {
    if (typeof args?.[field] !== "string") fail(`the input needs "${field}" (a string)`);
  }
  const inputs = args.inputs ?? (args.x === undefined ? undefined : [args.x]);
  if (!Array.isArray(inputs) || inputs.length === 0 || !inputs.every(isInput)) {
    fail('the input needs "x" (a row of numbers, or rows of them) or "inputs" (a list of such)');
  }
  const options = { dtype: "float32", timeout: 60, ...args, inputs };
  if (options.dtype !== "float32" && options.dtype !== "float64") fail('"dtype" is "float32" or "float64"');
  return options;
}

/** A tensor as JSON: dtype, shape and row-major values (non-finite floats as strings). */
function shown(t) {
  return {
    dtype: t.dtype, shape: [...t.shape],
    values: t.values().map((v) => (typeof v === "number" && !Number.isFinite(v) ? String(v) : v)),
  };
}

function refusal(exc) {
  if (!(exc instanceof GridError)) throw exc;  // a bug here, not the grid's answer: exit non-zero, with its stack
  return { ok: false, error: { code: exc.code, name: exc.name, message: exc.message } };
}

const args = input();
let identity;
try {
  identity = await readKey(args.key);
} catch (exc) {
  fail(`${exc.name}: ${exc.message}`);
}
let grid;
try {
  grid = await Grid.connect(args.edge, identity, { gatewayKey: args.gateway_key, timeout: args.timeout });
} catch (exc) {
  fail(`cannot connect through ${args.edge}: ${exc.name}: ${exc.message}`);
}

let models;
try {
  models = await grid.models();                                                      // grid.models()
} catch (exc) {
  fail(`the models listed through ${args.edge}: ${exc.name}: ${exc.message}`);
}
const slash = args.model.lastIndexOf("/");
const listed = models.find((c) => c.name === args.model.slice(slash + 1) && (slash < 0 || c.owner === args.model.slice(0, slash)));
const out = {
  identity: identity.name,
  edge: grid.edge.url,
  model: listed === undefined ? null : {
    name: listed.name, owner: listed.owner, host: listed.host, parties: [...listed.parties], provider: listed.provider,
    queriers: Object.keys(listed.queriers).sort(), layers: listed.plan.layers.map((l) => ({ ...l })), frac_bits: listed.plan.frac_bits,
  },
  outputs: [],
};
for (const x of args.inputs) {
  try {
    const y = await grid.query(args.model, Tensor.of(x, args.dtype));                // grid.query("owner/name", x)
    out.outputs.push({ ok: true, value: shown(y) });
  } catch (exc) {
    out.outputs.push(refusal(exc));
  }
}
process.stdout.write(`${JSON.stringify(out)}\n`);
