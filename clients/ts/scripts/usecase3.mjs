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
import { connect, failing, gridq, jsonInput, refusal, shown } from "./common.mjs";

const { Tensor } = gridq;
const fail = failing("usecase3");

const isRow = (v) => Array.isArray(v) && v.length > 0 && v.every((n) => typeof n === "number");
const isInput = (v) => isRow(v) || (Array.isArray(v) && v.length > 0 && v.every(isRow));

function input() {
  const args = jsonInput(fail, ["edge", "key", "gateway_key", "model"]);
  const inputs = args.inputs ?? (args.x === undefined ? undefined : [args.x]);
  if (!Array.isArray(inputs) || inputs.length === 0 || !inputs.every(isInput)) {
    fail('the input needs "x" (a row of numbers, or rows of them) or "inputs" (a list of such)');
  }
  const options = { dtype: "float32", timeout: 60, ...args, inputs };
  if (options.dtype !== "float32" && options.dtype !== "float64") fail('"dtype" is "float32" or "float64"');
  return options;
}

const args = input();
const grid = await connect(fail, args);

let models;
try {
  models = await grid.models();                                                      // grid.models()
} catch (exc) {
  fail(`the models listed through ${args.edge}: ${exc.name}: ${exc.message}`);
}
const slash = args.model.lastIndexOf("/");
const listed = models.find((c) => c.name === args.model.slice(slash + 1) && (slash < 0 || c.owner === args.model.slice(0, slash)));
const out = {
  identity: grid.identity.name,
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
