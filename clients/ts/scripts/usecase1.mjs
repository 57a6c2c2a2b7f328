#!/usr/bin/env node
// Use case 1 (README.md, "Use case 1 — private statistical analysis") from TypeScript, in Node,
// through a live grid's HTTP edge: the built package (dist/), one scientist's key file, the
// gateway's key pinned. tests/integration/test_ts_edge.py runs it against the test grid and
// compares what it prints with what the Python client gets for the same expressions.
//
//   echo '{"edge": "http://127.0.0.1:8750", "key": "'$GRIDQ_HOME'/keys/alice.key",
//          "gateway_key": "'$(cat $GRIDQ_HOME/keys/gateway.pub)'", "tags": ["#birth-records", "#february"]}' \
//     | node clients/ts/scripts/usecase1.mjs
//   node clients/ts/scripts/usecase1.mjs '{"edge": …}'          # or the same JSON as the one argument
//
// Input: edge (URL), key (the scientist's key file), gateway_key (gridq1:… text), tags; optional:
// node ("hospital": whose first dataset found is used), dp (true: the DP releases too), timeout
// (seconds a job may take, 60), pending ({"tags", "node"}: a dataset whose jobs wait for its owner;
// one job is sent there and its status read).
//
// Output, on stdout, one JSON object: the search's metadata; then for each step of the use case
// ("raw": values released exactly, "dp": private values, "kept": the submitted job) either
// {"ok": true, "value": {"dtype", "shape", "values"}, …} or {"ok": false, "error": {"code",
// "name", "message"}}, with the ids of the jobs the step sent; the budget before and after.
// Values: float values as JSON numbers (NaN and ±Infinity as strings), int64 as decimal strings.
// Exit status 0 whenever the steps ran (a refusal is a result); 2 on a bad input or a failure
// outside the steps (the edge unreachable, the search refused), said on stderr.
import { connect, failing, gridq, jsonInput, refusal, shown } from "./common.mjs";

const { Tensor, float } = gridq;
const fail = failing("usecase1");

function input() {
  const args = jsonInput(fail, ["edge", "key", "gateway_key"]);
  if (!Array.isArray(args.tags) || !args.tags.every((t) => typeof t === "string")) fail('the input needs "tags" (strings)');
  return { node: "hospital", dp: true, timeout: 60, pending: null, ...args };
}

const args = input();
const grid = await connect(fail, args);

// the ids of the jobs each step sends: every job goes out through grid.submit
let sent = [];
const submit = grid.submit.bind(grid);
grid.submit = async (...a) => {
  const ticket = await submit(...a);
  sent.push(ticket.id);
  return ticket;
};

/** Run one step: its result (or its typed refusal) and the jobs it sent (a step within a step
 * counts its own; the outer one all of them). */
async function step(run) {
  const outer = sent;
  sent = [];
  let result;
  try {
    result = { ok: true, ...(await run()) };
  } catch (exc) {
    result = refusal(exc);
  }
  const jobs = sent;
  sent = [...outer, ...jobs];
  return { ...result, jobs };
}

const budget = async () => (await grid.budget(args.node, births.name)).map((b) => ({ ...b }));

let found;
try {
  found = await grid.search(...args.tags);
} catch (exc) {
  fail(`search ${args.tags.join(" ")}: ${exc.name}: ${exc.message}`);
}
const births = found[args.node]?.[0];
if (births === undefined) fail(`no dataset of ${args.node} carries ${args.tags.join(" ")}`);
const out = {
  identity: grid.identity.name,
  edge: grid.edge.url,
  found: Object.fromEntries(Object.entries(found).map(([node, ptrs]) => [node, ptrs.map((p) => ({
    name: p.name, shape: [...p.shape], dtype: p.dtype, columns: [...p.columns], description: p.description, tags: [...p.tags],
  }))])),
  dataset: births.name,
  budget_before: await budget(),
};

// raw releases: exact values, where the node's policy lets this scientist see them
const value = async (expr) => ({ value: shown(await expr.get()) });
out.raw = {
  weight_mean: await step(() => value(births.col("weight").mean())),                // births["weight"].mean().get()
  height_over_52: await step(() => value(births.col("height").gt(52).count())),     // (births["height"] > 52).count().get()
  weight_abs_dev: await step(() => value(births.col("weight").sub(Tensor.full([240], 3.5)).abs().mean())),
  table: await step(() => value(births)),                                            // births.get(): raw access
};

// submit(): one job, a ticket at once; the result stays at the node; the ticket picked up again
out.kept = await step(async () => {
  const ticket = await births.index(":", 0).sum().submit();                          // births[:, 0].sum().submit()
  await ticket.wait();                                                               // ticket.wait().status
  const status = await ticket.status();
  const ptr = await ticket.result();
  const again = await grid.ticket(ticket.id);                                        // grid.ticket(ticket.id)
  const result = { job_id: ticket.id, status, again: await again.status(),
    pointer: { node: ptr.node, kind: ptr.kind, shape: [...ptr.shape], dtype: ptr.dtype } };
  const released = await step(() => value(ptr));                                     // ptr.get()
  return { ...result, released };
});
out.kept_again_unknown = await step(async () => {                                    // an id never sent: NotFound at once
  await grid.ticket(`${args.node}:${"0".repeat(32)}`);
  return {};
});

// differential privacy (README "Differential privacy and budgets"), charged to the budget
if (args.dp) {
  const noisy = async (expr, options) => {
    const v = await expr.get(options);
    return { value: shown(v.value), noise: { ...v.noise } };
  };
  out.dp = {
    weight_mean: await step(() => noisy(births.col("weight").mean(), { epsilon: 0.1 })),
    height_mean: await step(() => noisy(births.col("height").mean(), { epsilon: 0.2, delta: 1e-7 })),
    weight_over_4: await step(() => noisy(births.col("weight").gt(float(4)).count(), { epsilon: 0.1 })),
    clamped_sum: await step(async () => {                                            // .submit(epsilon=0.1).private_value()
      const ticket = await births.col("weight").clamp(0, 7).sum().submit({ epsilon: 0.1 });
      const v = await ticket.privateValue();
      return { job_id: ticket.id, value: shown(v.value), noise: { ...v.noise } };
    }),
    per_row: await step(() => noisy(births.col("weight"), { epsilon: 0.5 })),       // one value per row: refused, free
  };
}
out.budget_after = await budget();

// a dataset whose jobs wait for the owner's approval
if (args.pending !== null) {
  out.pending = await step(async () => {
    const there = (await grid.search(...args.pending.tags))[args.pending.node]?.[0];
    if (there === undefined) throw new gridq.NotFound(`no dataset of ${args.pending.node} carries ${args.pending.tags.join(" ")}`);
    const ticket = await there.col("weight").mean().submit();
    const deadline = Date.now() + 1000 * args.timeout;
    let status = await ticket.status();
    while ((status === "queued" || status === "running") && Date.now() < deadline) {  // until the node has decided
      await new Promise((resolve) => setTimeout(resolve, 100));
      status = await ticket.status();
    }
    return { job_id: ticket.id, status };
  });
}

process.stdout.write(`${JSON.stringify(out)}\n`);
