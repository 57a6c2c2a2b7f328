/**
 * A small dense tensor: a dtype, a shape and row-major values in a typed array. It is what a
 * released value decodes to and what public constants and MPC inputs are made of; arithmetic on
 * it is the caller's business (gridq computes where the data is).
 *
 *     const w = tensor([[1.0], [0.5]]);             // float32, shape [2, 1]
 *     const ids = Tensor.arange(240);                // int64
 *     (await births.col("weight").mean().get()).item()
 */
import { InvalidRequest } from "./errors.js";

/** The dtypes that travel (Python's `protocol.codec.ALLOWED_DTYPES`). */
export const DTYPES = ["float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool"] as const;
export type DType = (typeof DTYPES)[number];
export type TensorData = Float64Array | Float32Array | BigInt64Array | Int32Array | Int16Array | Int8Array | Uint8Array;
export type Scalar = number | bigint | boolean;
export type Nested = Scalar | readonly Nested[];

/** float16 and bfloat16 are held widened in a Float32Array (every value of theirs is a float32). */
export function isFloat(dtype: DType): boolean {
  return dtype === "float32" || dtype === "float64" || dtype === "float16" || dtype === "bfloat16";
}

export function allocate(dtype: DType, count: number): TensorData {
  switch (dtype) {
    case "float64": return new Float64Array(count);
    case "float32": case "float16": case "bfloat16": return new Float32Array(count);
    case "int64": return new BigInt64Array(count);
    case "int32": return new Int32Array(count);
    case "int16": return new Int16Array(count);
    case "int8": return new Int8Array(count);
    case "uint8": case "bool": return new Uint8Array(count);
  }
}

export function checkDtype(name: string): DType {
  if (!(DTYPES as readonly string[]).includes(name)) {
    throw new InvalidRequest(`dtype '${name}' is not allowed; use one of ${[...DTYPES].sort().join(", ")}`);
  }
  return name as DType;
}

export class Tensor {
  readonly shape: readonly number[];

  constructor(readonly dtype: DType, shape: readonly number[], readonly data: TensorData) {
    this.shape = Object.freeze([...shape]);
    if (shape.some((d) => !Number.isInteger(d) || d < 0)) throw new InvalidRequest(`bad shape [${shape.join(", ")}]`);
    if (numel(shape) !== data.length) {
      throw new InvalidRequest(`shape [${shape.join(", ")}] holds ${numel(shape)} values, not ${data.length}`);
    }
  }

  /** A tensor of `values` (nested arrays give the shape), stored as `dtype`. */
  static of(values: Nested, dtype: DType = "float32"): Tensor {
    const shape: number[] = [];
    for (let v: Nested = values; Array.isArray(v); v = (v as readonly Nested[])[0] as Nested) {
      shape.push((v as readonly Nested[]).length);
      if ((v as readonly Nested[]).length === 0) break;
    }
    const flat: Scalar[] = [];
    const walk = (v: Nested, dim: number): void => {
      if (dim === shape.length) {
        if (Array.isArray(v)) throw new InvalidRequest("a tensor's nested arrays must all be as deep");
        flat.push(v as Scalar);
        return;
      }
      if (!Array.isArray(v) || v.length !== shape[dim]) {
        throw new InvalidRequest("a tensor's nested arrays must all have one length per level");
      }
      for (const item of v as readonly Nested[]) walk(item, dim + 1);
    };
    walk(values, 0);
    return Tensor.fromFlat(flat, shape, dtype);
  }

  static fromFlat(values: readonly Scalar[], shape: readonly number[], dtype: DType): Tensor {
    const data = allocate(dtype, values.length);
    values.forEach((v, i) => store(data, dtype, i, v));
    return new Tensor(dtype, shape, data);
  }

  static full(shape: readonly number[], value: Scalar, dtype: DType = "float32"): Tensor {
    return Tensor.fromFlat(new Array<Scalar>(numel(shape)).fill(value), shape, dtype);
  }

  /** 0, 1, …, n-1 (int64 by default, as torch.arange of an int). */
  static arange(n: number, dtype: DType = "int64"): Tensor {
    return Tensor.fromFlat(Array.from({ length: n }, (_, i) => i), [n], dtype);
  }

  get size(): number {
    return this.data.length;
  }

  get ndim(): number {
    return this.shape.length;
  }

  /** Row-major values: numbers (int64 as bigint, exact) or booleans. */
  values(): Scalar[] {
    return Array.from({ length: this.data.length }, (_, i) => this.at(i));
  }

  /** Row-major values as numbers (int64 converted, exact up to 2^53; booleans as 0 and 1). */
  numbers(): number[] {
    return Array.from(this.data as ArrayLike<number | bigint>, (v) => Number(v));
  }

  /** The one value of a one-element tensor, as a number (a boolean for a bool tensor). */
  item(): number | boolean {
    if (this.data.length !== 1) throw new InvalidRequest(`item() needs one value; this tensor has ${this.data.length}`);
    const v = this.at(0);
    return typeof v === "bigint" ? Number(v) : v;
  }

  /** Nested arrays of numbers (or booleans), as torch's `tolist()`. */
  toArray(): Nested {
    const flat = this.values().map((v) => (typeof v === "bigint" ? Number(v) : v));
    const build = (dim: number, offset: number): Nested => {
      if (dim === this.shape.length) return flat[offset] as Scalar;
      const stride = numel(this.shape.slice(dim + 1));
      return Array.from({ length: this.shape[dim] as number }, (_, i) => build(dim + 1, offset + i * stride));
    };
    return build(0, 0);
  }

  reshape(shape: readonly number[]): Tensor {
    return new Tensor(this.dtype, shape, this.data);
  }

  private at(i: number): Scalar {
    const v = this.data[i] as number | bigint;
    return this.dtype === "bool" ? v !== 0 : v;
  }

  toString(): string {
    return `tensor(${JSON.stringify(this.toArray())}, dtype=${this.dtype})`;
  }
}

/** `tensor([[1, 2], [3, 4]], "float64")`: shorthand for {@link Tensor.of}. */
export function tensor(values: Nested, dtype: DType = "float32"): Tensor {
  return Tensor.of(values, dtype);
}

export function numel(shape: readonly number[]): number {
  return shape.reduce((a, b) => a * b, 1);
}

function store(data: TensorData, dtype: DType, i: number, v: Scalar): void {
  if (dtype === "int64") {
    if (typeof v === "number" && !Number.isInteger(v)) throw new InvalidRequest(`${v} is not an integer (int64)`);
    (data as BigInt64Array)[i] = BigInt.asIntN(64, typeof v === "boolean" ? BigInt(v ? 1 : 0) : BigInt(v));
    return;
  }
  const n = typeof v === "bigint" ? Number(v) : typeof v === "boolean" ? (v ? 1 : 0) : v;
  if (dtype === "bool") (data as Uint8Array)[i] = n !== 0 ? 1 : 0;
  else if (dtype === "float16") (data as Float32Array)[i] = roundToFloat(n, 10, -14, 15);
  else if (dtype === "bfloat16") (data as Float32Array)[i] = roundToFloat(n, 7, -126, 127);
  else (data as Float32Array)[i] = n;
}

/**
 * `value` rounded (to nearest, ties to even) to a binary float format of `mantissa` stored bits
 * and exponents `minExp`..`maxExp` — float16 and bfloat16, which JavaScript has no array for.
 * Scaling by powers of two is exact in float64, so only the one rounding happens.
 */
export function roundToFloat(value: number, mantissa: number, minExp: number, maxExp: number): number {
  if (!Number.isFinite(value) || value === 0) return value;
  const a = Math.abs(value);
  let e = Math.max(Math.floor(Math.log2(a)), minExp);
  if (2 ** e > a && e > minExp) e -= 1; // log2 rounding near powers of two
  if (2 ** (e + 1) <= a) e += 1;
  const quantum = 2 ** (e - mantissa);
  const scaled = a / quantum;
  let q = Math.floor(scaled);
  const rest = scaled - q;
  if (rest > 0.5 || (rest === 0.5 && q % 2 === 1)) q += 1;
  const rounded = q * quantum;
  const largest = (2 - 2 ** -mantissa) * 2 ** maxExp;
  return Math.sign(value) * (rounded > largest ? Infinity : rounded);
}
