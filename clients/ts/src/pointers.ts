/**
 * Pointers and lazy expressions: the handle on data that stays at its node. Every operation
 * returns a new {@link Expression} and sends nothing; a chain of operations becomes one plan,
 * one job, one round trip when you `submit()` (keep the result at the node, get a ticket) or
 * `get()` (release the value, if the node's policy allows).
 *
 * The plan JSON is the one Python's `orchestrator/pointer.py` builds for the same expression,
 * byte for byte (test/plans.test.ts checks it against plans Python made):
 *
 *     births.col("weight").mean()                   # births["weight"].mean()
 *     births.index(":", 0).sum()                    # births[:, 0].sum()
 *     births.col("height").gt(52).count()           # (births["height"] > 52).count()
 *     births.col("weight").rsub(2)                  # 2 - births["weight"]
 *     births.col("weight").mul(float(2))            # births["weight"] * 2.0  (see pyjson.float)
 *
 * Shapes are checked by the node, which validates every plan on shape-only tensors before it
 * runs anything; this client does not infer them (an expression knows its inputs' specs only).
 */
import { InvalidRequest } from "./errors.js";
import type { DatasetMeta, Release } from "./messages.js";
import { dpRelease, releaseJson } from "./messages.js";
import { PyFloat, type PyJson } from "./pyjson.js";
import { isFloat, type Tensor } from "./tensor.js";
import type { JobTicket, PrivateValue } from "./ticket.js";

export const MAX_STEPS = 256;
export const MAX_TENSOR_CONST = 65_536;

export interface InputRef {
  readonly kind: "dataset" | "object";
  readonly name: string;
}

export interface TensorSpec {
  readonly shape: readonly number[];
  readonly dtype: string;
}

type Arg = { readonly ref: number } | { readonly const: PyJson } | TensorConstJson;
interface TensorConstJson {
  readonly shape: readonly number[];
  readonly dtype: string;
  readonly values: readonly PyJson[];
}

export interface Step {
  readonly op: string;
  readonly args: readonly Arg[];
  readonly params: { readonly [name: string]: PyJson };
}

export interface Plan {
  readonly inputs: readonly InputRef[];
  readonly steps: readonly Step[];
}

/** A public constant: a number (`float(2)` for the float 2.0), a boolean, a bigint, or a Tensor. */
export type Constant = number | PyFloat | boolean | bigint | Tensor;
export type Operand = Expression | Constant;
export type Dim = number | readonly number[];

/** A slice `start:stop:step` (null: left out), as Python's `slice`. */
export interface Slice {
  readonly start: number | null;
  readonly stop: number | null;
  readonly step: number | null;
}

/** An index item: an int, a slice (or its text, ":" "1:" "::2" ":-100"), "..." (Ellipsis), or null (newaxis). */
export type IndexItem = number | Slice | string | null;

export function slice(start: number | null = null, stop: number | null = null, step: number | null = null): Slice {
  return { start, stop, step };
}

/** What an expression needs of its grid to run: the Grid (absent when only plans are built). */
export interface Runner {
  submit(node: string, kind: string, body: PyJson): Promise<JobTicket>;
  readonly timeout: number;
}

interface Input {
  readonly ref: InputRef;
  readonly spec: TensorSpec;
}

export interface ReleaseOptions {
  epsilon?: number;
  delta?: number;
  /** Seconds to wait for the answer (default: the grid's timeout). */
  timeout?: number;
}

/** A lazy computation on one node's data; nothing runs until submit() or get(). */
export class Expression {
  readonly columns: readonly string[];

  constructor(
    protected readonly runner: Runner | null,
    readonly node: string,
    private readonly inputs: readonly Input[],
    private readonly steps: readonly Step[] = [],
    columns: readonly string[] = [],
  ) {
    if (steps.length > MAX_STEPS) throw new InvalidRequest(`a plan has at most ${MAX_STEPS} steps`);
    this.columns = columns;
  }

  get plan(): Plan {
    return { inputs: this.inputs.map((i) => i.ref), steps: this.steps };
  }

  /** The body of the job that runs this plan and releases its value by `release`. */
  runJob(release: Release = { door: "keep" }): PyJson {
    return { kind: "run", plan: planJson(this.plan), release: releaseJson(release) };
  }

  toString(): string {
    const chain = [this.inputs.map((i) => i.ref.name).join(", "), ...this.steps.map((s) => s.op)].join(" → ");
    return `<Expression on ${this.node}: ${chain}>`;
  }

  // --- running it -----------------------------------------------------------------------

  /** Run at the node and keep the result there; a ticket at once. With `epsilon`, the job
   * releases the value with DP instead: `ticket.privateValue()`. */
  async submit(options: { epsilon?: number; delta?: number } = {}): Promise<JobTicket> {
    const dp = dpRelease(options.epsilon, options.delta ?? 0);
    return this.requireRunner().submit(this.node, "run", this.runJob(dp ?? { door: "keep" }));
  }

  /** Run at the node and release the value: exactly (if policy lets you see it), or with
   * differential privacy when `epsilon` is given — Laplace for a pure ε, Gaussian with a
   * `delta` — charged to your budget on each dataset involved. */
  get(options?: { timeout?: number; epsilon?: undefined; delta?: undefined }): Promise<Tensor>;
  get(options: { epsilon: number; delta?: number; timeout?: number }): Promise<PrivateValue>;
  async get(options: ReleaseOptions = {}): Promise<Tensor | PrivateValue> {
    const dp = dpRelease(options.epsilon, options.delta ?? 0);
    const ticket = await this.requireRunner().submit(this.node, "run", this.runJob(dp ?? { door: "raw" }));
    return dp === undefined ? ticket.value(options.timeout) : ticket.privateValue(options.timeout);
  }

  private requireRunner(): Runner {
    if (this.runner === null) throw new InvalidRequest("this expression belongs to no grid: build it from grid.search()");
    return this.runner;
  }

  // --- building it (Python's Expression._apply, step for step) -----------------------------

  protected apply(op: string, others: readonly Operand[], params: readonly [string, PyJson | undefined][],
    constantFirst = false): Expression {
    const exprs: Expression[] = [this, ...others.filter((o): o is Expression => o instanceof Expression)];
    if (exprs.some((e) => e.node !== this.node)) {
      const nodes = [...new Set(exprs.map((e) => e.node))].sort();
      throw new InvalidRequest(`cannot combine data of nodes ${JSON.stringify(nodes)} in one plan: a plan runs at one node`);
    }
    const inputs: Input[] = [];
    for (const e of exprs) for (const i of e.inputs) if (indexOf(inputs, i) < 0) inputs.push(i);
    const steps: Step[] = [];
    const outs = new Map<Expression, number>();
    for (const e of exprs) {
      // an expression given twice (x + x) is laid out twice, as Python does: the plans stay equal
      const mapping = new Map<number, number>(e.inputs.map((item, i) => [i, indexOf(inputs, item)]));
      e.steps.forEach((step, j) => {
        mapping.set(e.inputs.length + j, inputs.length + steps.length);
        steps.push(remap(step, mapping));
      });
      outs.set(e, mapping.get(e.inputs.length + e.steps.length - 1) as number);
    }
    const args: Arg[] = [{ ref: outs.get(this) as number }];
    for (const o of others) args.push(o instanceof Expression ? { ref: outs.get(o) as number } : constant(o));
    if (constantFirst) [args[0], args[1]] = [args[1] as Arg, args[0] as Arg];
    const kept: { [name: string]: PyJson } = {};
    for (const [name, value] of params) if (value !== undefined && value !== null) kept[name] = value;
    steps.push({ op, args, params: kept });
    return new Expression(this.runner, this.node, inputs, steps);
  }

  /** `x[items]`: ints, slices (`slice(1)`, or text as ":" "1:" "::2"), "..." and null (newaxis). */
  index(...items: IndexItem[]): Expression {
    return this.apply("getitem", [], [["index", items.map(indexItem)]]);
  }

  /** A column of a table, by name (Python's `births["weight"]`). */
  col(name: string): Expression {
    const at = this.columns.indexOf(name);
    if (at < 0) throw new InvalidRequest(`no column '${name}'; columns are ${JSON.stringify(this.columns)}`);
    return this.index(slice(), at);
  }

  add(o: Operand): Expression { return this.apply("add", [o], []); }
  sub(o: Operand): Expression { return this.apply("sub", [o], []); }
  mul(o: Operand): Expression { return this.apply("mul", [o], []); }
  div(o: Operand): Expression { return this.apply("div", [o], []); }
  pow(o: Operand): Expression { return this.apply("pow", [o], []); }
  matmul(o: Operand): Expression { return this.apply("matmul", [o], []); }
  /** `c + x`: the constant first, as Python's `__radd__` keeps it. */
  radd(c: Constant): Expression { return this.apply("add", [c], [], true); }
  rsub(c: Constant): Expression { return this.apply("sub", [c], [], true); }
  rmul(c: Constant): Expression { return this.apply("mul", [c], [], true); }
  rdiv(c: Constant): Expression { return this.apply("div", [c], [], true); }
  neg(): Expression { return this.apply("neg", [], []); }
  abs(): Expression { return this.apply("abs", [], []); }
  exp(): Expression { return this.apply("exp", [], []); }
  log(): Expression { return this.apply("log", [], []); }
  sqrt(): Expression { return this.apply("sqrt", [], []); }
  lt(o: Operand): Expression { return this.apply("lt", [o], []); }
  le(o: Operand): Expression { return this.apply("le", [o], []); }
  gt(o: Operand): Expression { return this.apply("gt", [o], []); }
  ge(o: Operand): Expression { return this.apply("ge", [o], []); }
  eq(o: Operand): Expression { return this.apply("eq", [o], []); }
  ne(o: Operand): Expression { return this.apply("ne", [o], []); }

  sum(dim?: Dim, keepdim = false): Expression { return this.apply("sum", [], [["dim", dimJson(dim)], ["keepdim", keepdim]]); }
  mean(dim?: Dim, keepdim = false): Expression { return this.apply("mean", [], [["dim", dimJson(dim)], ["keepdim", keepdim]]); }
  min(dim?: Dim, keepdim = false): Expression { return this.apply("min", [], [["dim", dimJson(dim)], ["keepdim", keepdim]]); }
  max(dim?: Dim, keepdim = false): Expression { return this.apply("max", [], [["dim", dimJson(dim)], ["keepdim", keepdim]]); }
  std(dim?: Dim, keepdim = false, correction = 1): Expression {
    return this.apply("std", [], [["dim", dimJson(dim)], ["keepdim", keepdim], ["correction", correction]]);
  }
  var(dim?: Dim, keepdim = false, correction = 1): Expression {
    return this.apply("var", [], [["dim", dimJson(dim)], ["keepdim", keepdim], ["correction", correction]]);
  }
  /** Number of non-zero (true) elements: `x.gt(4).count()` counts rows above 4. */
  count(dim?: Dim): Expression { return this.apply("count", [], [["dim", dimJson(dim)]]); }
  /** `clamp(min, max)`; null or undefined leaves a side open. An int bound keeps an int tensor int. */
  clamp(min?: number | PyFloat | null, max?: number | PyFloat | null): Expression {
    return this.apply("clamp", [], [["min", min], ["max", max]]);
  }
  /** Elementwise `a if this else b`. */
  where(a: Operand, b: Operand): Expression { return this.apply("where", [a, b], []); }
  to(dtype: string): Expression { return this.apply("cast", [], [["dtype", dtype]]); }
  reshape(...shape: (number | readonly number[])[]): Expression {
    const dims = shape.length === 1 && Array.isArray(shape[0]) ? [...(shape[0] as readonly number[])] : (shape as number[]);
    return this.apply("reshape", [], [["shape", dims]]);
  }
  transpose(dim0 = 0, dim1 = 1): Expression { return this.apply("transpose", [], [["dim0", dim0], ["dim1", dim1]]); }
  get T(): Expression { return this.transpose(0, 1); }

  /** `cat`/`stack` of this and `others` (see {@link cat}). */
  join(op: "cat" | "stack", others: readonly Expression[], dim = 0): Expression {
    return this.apply(op, others, [["dim", dim]]);
  }
}

/** A dataset published at a node, or a result kept at a node: metadata here, values there. */
export class DataPointer extends Expression {
  readonly name: string;
  readonly kind: "dataset" | "object";
  readonly spec: TensorSpec;
  readonly description: string;
  readonly tags: readonly string[];

  constructor(runner: Runner | null, node: string, ref: InputRef, spec: TensorSpec, readonly meta?: DatasetMeta) {
    super(runner, node, [{ ref, spec }], [], meta?.columns ?? []);
    this.name = ref.name;
    this.kind = ref.kind;
    this.spec = spec;
    this.description = meta?.description ?? "";
    this.tags = meta?.tags ?? [];
  }

  get shape(): readonly number[] {
    return this.spec.shape;
  }

  get dtype(): string {
    return this.spec.dtype;
  }

  /** Ask the owner to make you an allowed user of this dataset; the ticket completes when the
   * owner approves (or throws RequestDenied with the owner's reason). */
  async requestAccess(reason: string): Promise<JobTicket> {
    if (this.kind !== "dataset") throw new InvalidRequest("access is granted to datasets; this pointer is a kept result");
    if (this.runner === null) throw new InvalidRequest("this pointer belongs to no grid");
    return this.runner.submit(this.node, "access", { kind: "access", dataset: this.name, reason });
  }

  override toString(): string {
    const tags = this.tags.join(" ");
    return `<DataPointer ${this.node}/${this.name} shape=[${this.shape.join(", ")}] ${this.dtype}${tags ? " " + tags : ""}>`;
  }
}

export function cat(exprs: readonly Expression[], dim = 0): Expression {
  return (exprs[0] as Expression).join("cat", exprs.slice(1), dim);
}

export function stack(exprs: readonly Expression[], dim = 0): Expression {
  return (exprs[0] as Expression).join("stack", exprs.slice(1), dim);
}

export function planJson(plan: Plan): PyJson {
  return {
    inputs: plan.inputs.map((i) => ({ kind: i.kind, name: i.name })),
    steps: plan.steps.map((s) => ({ op: s.op, args: s.args as PyJson, params: s.params })),
  };
}

function indexOf(inputs: readonly Input[], item: Input): number {
  // Python compares (InputRef, TensorSpec) pairs by value
  return inputs.findIndex((i) => i.ref.kind === item.ref.kind && i.ref.name === item.ref.name &&
    i.spec.dtype === item.spec.dtype && i.spec.shape.length === item.spec.shape.length &&
    i.spec.shape.every((d, k) => d === item.spec.shape[k]));
}

function remap(step: Step, mapping: ReadonlyMap<number, number>): Step {
  const args = step.args.map((a) => ("ref" in a ? { ref: mapping.get(a.ref) as number } : a));
  return { op: step.op, args, params: step.params };
}

function dimJson(dim: Dim | undefined): PyJson | undefined {
  return dim === undefined ? undefined : typeof dim === "number" ? dim : [...dim];
}

const INT64_MIN = -(2n ** 63n);
const INT64_MAX = 2n ** 63n - 1n;
const TENSOR_CONST_DTYPES: readonly string[] = ["float32", "float64", "int64", "int32", "bool"];

/** A public constant of a plan: a number, or a (small) tensor of numbers. */
function constant(value: Constant): Arg {
  if (value instanceof PyFloat || typeof value === "number") {
    if (!Number.isFinite(value.valueOf())) throw new InvalidRequest(`a plan's constants are finite numbers, not ${value.valueOf()}`);
    return { const: value };
  }
  if (typeof value === "bigint") {
    if (value < INT64_MIN || value > INT64_MAX) throw new InvalidRequest(`integer constant ${value} does not fit in int64`);
    return { const: value };
  }
  if (typeof value === "boolean") return { const: value };
  if (value.ndim === 0) return { const: scalarJson(value, 0) };
  if (!TENSOR_CONST_DTYPES.includes(value.dtype)) {
    throw new InvalidRequest(`a tensor constant is one of ${TENSOR_CONST_DTYPES.join(", ")}, not ${value.dtype}: cast it first`);
  }
  if (value.size > MAX_TENSOR_CONST) {
    throw new InvalidRequest(`a tensor constant has at most ${MAX_TENSOR_CONST} elements, not ${value.size}`);
  }
  return { shape: [...value.shape], dtype: value.dtype, values: Array.from({ length: value.size }, (_, i) => scalarJson(value, i)) };
}

/** One value of a tensor as Python's `tolist()` gives it: a float for float dtypes. */
function scalarJson(t: Tensor, i: number): PyJson {
  const v = t.data[i] as number | bigint;
  if (t.dtype === "bool") return v !== 0;
  if (typeof v === "bigint") return v;
  if (isFloat(t.dtype)) {
    if (!Number.isFinite(v)) throw new InvalidRequest(`a plan's constants are finite numbers, not ${v}`);
    return new PyFloat(v);
  }
  return v;
}

function indexItem(item: IndexItem): PyJson {
  if (item === null) return "newaxis";
  if (typeof item === "number") {
    if (!Number.isInteger(item)) throw new InvalidRequest(`cannot index a remote tensor with ${item}; use ints, slices or column names`);
    return item;
  }
  if (typeof item === "string") {
    if (item === "...") return "...";
    return indexItem(parseSlice(item));
  }
  return { start: item.start, stop: item.stop, step: item.step };
}

/** "1:10:2" → slice(1, 10, 2); parts left out are null. */
function parseSlice(text: string): Slice {
  const parts = text.split(":");
  if (parts.length < 2 || parts.length > 3 || parts.some((p) => p.trim() !== "" && !/^\s*-?\d+\s*$/.test(p))) {
    throw new InvalidRequest(`'${text}' is not a slice (use ":", "1:", ":-100", "::2"); a column is .col(name)`);
  }
  const [start, stop, step] = parts.map((p) => (p.trim() === "" ? null : Number(p)));
  return slice(start ?? null, stop ?? null, step ?? null);
}
