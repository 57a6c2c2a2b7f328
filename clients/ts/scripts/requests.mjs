#!/usr/bin/env node
// A scientist's own requests from TypeScript, in Node, through a live grid's HTTP edge: the built
// package (dist/), one key file, the gateway's key pinned, running the steps it is given in order.
// tests/integration/test_ts_requests.py runs it against the test grid and checks what it prints
// against what the Python client and the node's owner see.
//
//   echo '{"edge": "http://127.0.0.1:8750", "key": "'$GRIDQ_HOME'/keys/alice.key",
//          "gateway_key": "'$(cat $GRIDQ_HOME/keys/gateway.pub)'",
//          "steps": [{"op": "requests", "node": "hospital", "status": "pending"}]}' | node clients/ts/scripts/requests.mjs
//
// Steps ({"op", …}):
//   submit          {tags, node, column, reduce: "sum"|"mean"|"max", epsilon?}  the first dataset found
//                   there, births.col(column).<reduce>().submit({epsilon}); waits until it is no longer
//                   queued or running: {job_id, status}
//   send            {tags, node, column, reduce, raw?}  the same job (with raw: true, released exactly, as
//                   get() releases it), without waiting: {job_id, status}
//   requests        {node?, status?}       grid.requests(node, status): {requests: [RequestInfo…], missing:
//                                          {node: why} of the nodes that did not answer in time}
//   cancel_request  {id}                   grid.cancelRequest(id): {request: RequestInfo}
//   cancel          {job_id}               (await grid.ticket(job_id)).cancel(): {status} after it (a queued
//                                          job through POST /v1/jobs/{id}/cancel)
//   wait            {job_id, timeout?}     (await grid.ticket(job_id)).wait(timeout): {status}
//   status          {job_id}               (await grid.ticket(job_id)).status(): {status}
// Each step gives {"ok": true, …} or {"ok": false, "error": {"code", "name", "message"}}.
// Output, on stdout: {"identity", "results": [one per step]}. Exit 2 on a bad input or when the edge
// cannot be reached, said on stderr.
import { connect, failing, jsonInput, refusal } from "./common.mjs";

const fail = failing("requests");
const args = { timeout: 30, ...jsonInput(fail, ["edge", "key", "gateway_key"]) };
if (!Array.isArray(args.steps)) fail('the input needs "steps" (a list)');
const grid = await connect(fail, args);

const SETTLING = new Set(["queued", "running"]);
const REDUCE = new Set(["sum", "mean", "max", "min", "count"]);

async function expression(step) {
  const found = (await grid.search(...step.tags, { node: step.node }))[step.node] ?? [];
  if (found.length === 0) throw new Error(`no dataset tagged ${step.tags} at ${step.node}`);
  if (!REDUCE.has(step.reduce)) throw new Error(`${step.reduce} is not a reduction here`);
  return found[0].col(step.column)[step.reduce]();
}

async function send(step) {
  const expr = await expression(step);
  const ticket = step.raw ? await grid.submit(step.node, "run", expr.runJob({ door: "raw" }))
    : await expr.submit(step.epsilon === undefined ? {} : { epsilon: step.epsilon });
  return { job_id: ticket.id, status: await ticket.status() };
}

async function submit(step) {
  const ticket = await (await expression(step)).submit(step.epsilon === undefined ? {} : { epsilon: step.epsilon });
  const deadline = Date.now() + 1000 * args.timeout;
  let status = await ticket.status();
  while (SETTLING.has(status) && Date.now() < deadline) {
    await new Promise((resolve) => setTimeout(resolve, 50));
    status = await ticket.status();
  }
  return { job_id: ticket.id, status };
}

const OPS = {
  submit,
  send,
  requests: async (s) => {
    const found = await grid.requests(s.node, s.status);
    return { requests: [...found], missing: found.missing };
  },
  cancel_request: async (s) => ({ request: await grid.cancelRequest(s.id) }),
  cancel: async (s) => {
    const ticket = await grid.ticket(s.job_id);
    if ((await ticket.cancel()) !== ticket) throw new Error("cancel() did not give its ticket back");
    return { status: await ticket.status() };
  },
  wait: async (s) => {
    const ticket = await grid.ticket(s.job_id);
    await ticket.wait(s.timeout);
    return { status: await ticket.status() };
  },
  status: async (s) => ({ status: await (await grid.ticket(s.job_id)).status() }),
};

const results = [];
for (const step of args.steps) {
  const op = OPS[step.op];
  if (op === undefined) fail(`unknown step ${JSON.stringify(step.op)}`);
  try {
    results.push({ ok: true, ...(await op(step)) });
  } catch (exc) {
    results.push(refusal(exc));
  }
}
process.stdout.write(JSON.stringify({ identity: grid.identity.name, results }) + "\n");
