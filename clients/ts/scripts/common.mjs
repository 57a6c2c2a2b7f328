// What the use-case scripts (usecase1.mjs, usecase3.mjs) share: the built package, their JSON
// input, the connection through the edge with the gateway's key pinned, and how results print.
// A failure outside the use case itself (no build, bad input, the edge unreachable) exits 2,
// said on stderr; a refusal by the grid is a result.
import { existsSync, readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";

const dist = new URL("../dist/index.js", import.meta.url);
if (!existsSync(fileURLToPath(dist))) {
  process.stderr.write("clients/ts/dist is missing: build the client first (`make ts`, or `npm ci && npm run build` in clients/ts)\n");
  process.exit(2);
}
export const gridq = await import(dist.href);
const { readKey } = await import(new URL("../dist/node.js", import.meta.url).href);

/** Exit 2 with ``message``, said by ``script``. */
export function failing(script) {
  return (message) => {
    process.stderr.write(`${script}: ${message}\n`);
    process.exit(2);
  };
}

/** The JSON input (the one argument, else stdin), with ``fields`` as strings. */
export function jsonInput(fail, fields) {
  const text = process.argv[2] ?? readFileSync(0, "utf8");
  let args;
  try {
    args = JSON.parse(text);
  } catch (exc) {
    fail(`the input is not JSON: ${exc.message}`);
  }
  for (const field of fields) {
    if (typeof args?.[field] !== "string") fail(`the input needs "${field}" (a string)`);
  }
  return args;
}

/** The grid through ``args.edge``, as the owner of the key file ``args.key``, the gateway's key pinned. */
export async function connect(fail, args) {
  let identity;
  try {
    identity = await readKey(args.key);
  } catch (exc) {
    fail(`${exc.name}: ${exc.message}`);
  }
  try {
    return await gridq.Grid.connect(args.edge, identity, { gatewayKey: args.gateway_key, timeout: args.timeout });
  } catch (exc) {
    fail(`cannot connect through ${args.edge}: ${exc.name}: ${exc.message}`);
  }
}

/** A tensor as JSON: dtype, shape and row-major values (int64 as strings, non-finite floats as strings). */
export function shown(t) {
  return {
    dtype: t.dtype, shape: [...t.shape],
    values: t.values().map((v) => (typeof v === "bigint" ? v.toString() : typeof v === "number" && !Number.isFinite(v) ? String(v) : v)),
  };
}

/** The grid's typed refusal as a result; anything else is a bug here: it propagates (exit non-zero, with its stack). */
export function refusal(exc) {
  if (!(exc instanceof gridq.GridError)) throw exc;
  return { ok: false, error: { code: exc.code, name: exc.name, message: exc.message } };
}
