/**
 * Tensors on the wire: safetensors bytes, as Python's `protocol/codec.py` (one tensor named "t")
 * and `protocol/mpc/wire.py` (`pack`/`unpack`: named tensors, optional string metadata). Never
 * pickle; only allow-listed dtypes; element counts capped before anything is allocated.
 *
 * Layout: 8 bytes little-endian header length N, N bytes of JSON header padded with spaces to a
 * multiple of 8, then the tensors' little-endian bytes back to back.
 */
import { InvalidRequest, LimitExceeded } from "./errors.js";
import { allocate, checkDtype, type DType, numel, Tensor, type TensorData } from "./tensor.js";

export const MAX_ELEMENTS = 64 * 1024 * 1024;
const MAX_HEADER = 64 * 1024;
const KEY = "t";

const CODES: Readonly<Record<DType, string>> = {
  float32: "F32", float64: "F64", float16: "F16", bfloat16: "BF16", int64: "I64", int32: "I32", int16: "I16",
  int8: "I8", uint8: "U8", bool: "BOOL",
};
const RANK: Readonly<Record<DType, number>> = {
  bool: 0, uint8: 1, int8: 2, int16: 3, float16: 4, bfloat16: 5, int32: 6, float32: 7, float64: 8, int64: 9,
};
const BY_CODE = new Map(Object.entries(CODES).map(([dtype, code]) => [code, dtype as DType]));
const SIZES: Readonly<Record<DType, number>> = {
  float32: 4, float64: 8, float16: 2, bfloat16: 2, int64: 8, int32: 4, int16: 2, int8: 1, uint8: 1, bool: 1,
};

export function checkSize(shape: readonly number[], limit = MAX_ELEMENTS): number {
  const count = numel(shape);
  if (count > limit) {
    throw new LimitExceeded(`tensor of shape [${shape.join(", ")}] has ${count} elements; the limit is ${limit}`);
  }
  return count;
}

/** One tensor as Python's `encode_tensor` writes it (byte for byte). */
export function encodeTensor(tensor: Tensor, limit = MAX_ELEMENTS): Uint8Array {
  checkSize(tensor.shape, limit);
  return pack({ [KEY]: tensor });
}

/** The one tensor of Python's `encode_tensor` bytes. */
export function decodeTensor(data: Uint8Array, limit = MAX_ELEMENTS): Tensor {
  const { tensors } = unpack(data, limit);
  const names = Object.keys(tensors);
  if (names.length !== 1 || names[0] !== KEY) throw new InvalidRequest("a tensor message must hold exactly one tensor");
  return tensors[KEY] as Tensor;
}

/** Named tensors (and string metadata) as safetensors bytes: Python's `protocol.mpc.wire.pack`. */
export function pack(tensors: Readonly<Record<string, Tensor>>, meta?: Readonly<Record<string, string>>): Uint8Array {
  // safetensors lays tensors out by dtype (its enum order, largest first), then by name
  const names = Object.keys(tensors).sort((a, b) => {
    const byDtype = RANK[(tensors[b] as Tensor).dtype] - RANK[(tensors[a] as Tensor).dtype];
    return byDtype || (a < b ? -1 : a > b ? 1 : 0);
  });
  const header: Record<string, unknown> = meta === undefined ? {} : { __metadata__: meta };
  let offset = 0;
  for (const name of names) {
    const t = tensors[name] as Tensor;
    const size = t.size * SIZES[t.dtype];
    header[name] = { dtype: CODES[t.dtype], shape: t.shape, data_offsets: [offset, offset + size] };
    offset += size;
  }
  let json = new TextEncoder().encode(JSON.stringify(header));
  const padded = Math.ceil(json.length / 8) * 8;
  const head = new Uint8Array(8 + padded).fill(0x20, 8);
  new DataView(head.buffer).setBigUint64(0, BigInt(padded), true);
  head.set(json, 8);
  json = new Uint8Array(0);
  const out = new Uint8Array(head.length + offset);
  out.set(head);
  let at = head.length;
  for (const name of names) {
    const bytes = toBytes(tensors[name] as Tensor);
    out.set(bytes, at);
    at += bytes.length;
  }
  return out;
}

/** Tensors and metadata of safetensors bytes, checked before anything is allocated. */
export function unpack(data: Uint8Array, limit = MAX_ELEMENTS): { tensors: Record<string, Tensor>; meta: Record<string, string> } {
  if (data.length < 8) throw new InvalidRequest("not a safetensors tensor: too short");
  const view = new DataView(data.buffer, data.byteOffset, data.byteLength);
  const size = Number(view.getBigUint64(0, true));
  if (size > MAX_HEADER || size + 8 > data.length) throw new InvalidRequest("not a safetensors tensor: bad header length");
  let header: unknown;
  try {
    header = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(data.subarray(8, 8 + size)));
  } catch (exc) {
    throw new InvalidRequest(`not a safetensors tensor: bad header: ${String(exc)}`);
  }
  if (typeof header !== "object" || header === null || Array.isArray(header)) {
    throw new InvalidRequest("not a safetensors tensor: bad header");
  }
  const body = data.subarray(8 + size);
  const entries = Object.entries(header as Record<string, unknown>).filter(([k]) => k !== "__metadata__");
  const spans: [number, number][] = [];
  const tensors: Record<string, Tensor> = {};
  for (const [name, raw] of entries) {
    const info = raw as { dtype?: unknown; shape?: unknown; data_offsets?: unknown };
    const shape = info.shape;
    const offsets = info.data_offsets;
    if (!Array.isArray(shape) || !shape.every((d) => Number.isInteger(d) && d >= 0) || !Array.isArray(offsets) ||
      offsets.length !== 2 || !offsets.every((d) => Number.isInteger(d) && d >= 0) || typeof info.dtype !== "string") {
      throw new InvalidRequest(`not a safetensors tensor: bad entry '${name}'`);
    }
    checkSize(shape as number[], limit);
    const dtype = BY_CODE.get(info.dtype);
    if (dtype === undefined) throw new InvalidRequest(`dtype ${info.dtype} is not allowed`);
    const [begin, end] = offsets as [number, number];
    if (end - begin !== numel(shape as number[]) * SIZES[dtype] || end > body.length) {
      throw new InvalidRequest(`not a safetensors tensor: offsets of '${name}' do not match its shape`);
    }
    spans.push([begin, end]);
    tensors[name] = fromBytes(checkDtype(dtype), shape as number[], body.subarray(begin, end));
  }
  spans.sort((a, b) => a[0] - b[0]);
  let expected = 0;
  for (const [begin, end] of spans) {
    if (begin !== expected) throw new InvalidRequest("not a safetensors tensor: data has gaps or overlaps");
    expected = end;
  }
  if (expected !== body.length) throw new InvalidRequest("not a safetensors tensor: data does not end where the header says");
  const rawMeta = (header as Record<string, unknown>)["__metadata__"];
  const meta: Record<string, string> = {};
  if (typeof rawMeta === "object" && rawMeta !== null) {
    for (const [k, v] of Object.entries(rawMeta)) if (typeof v === "string") meta[k] = v;
  }
  return { tensors, meta };
}

function toBytes(t: Tensor): Uint8Array {
  const out = new Uint8Array(t.size * SIZES[t.dtype]);
  const view = new DataView(out.buffer);
  const d = t.data;
  for (let i = 0; i < t.size; i++) {
    const v = d[i] as number;
    switch (t.dtype) {
      case "float64": view.setFloat64(i * 8, v, true); break;
      case "float32": view.setFloat32(i * 4, v, true); break;
      case "float16": view.setUint16(i * 2, halfBits(v), true); break;
      case "bfloat16": view.setUint16(i * 2, bfloatBits(v), true); break;
      case "int64": view.setBigInt64(i * 8, (d as BigInt64Array)[i] as bigint, true); break;
      case "int32": view.setInt32(i * 4, v, true); break;
      case "int16": view.setInt16(i * 2, v, true); break;
      case "int8": view.setInt8(i, v); break;
      case "uint8": case "bool": view.setUint8(i, v); break;
    }
  }
  return out;
}

function fromBytes(dtype: DType, shape: number[], bytes: Uint8Array): Tensor {
  const count = numel(shape);
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const data: TensorData = allocate(dtype, count);
  for (let i = 0; i < count; i++) {
    switch (dtype) {
      case "float64": data[i] = view.getFloat64(i * 8, true); break;
      case "float32": data[i] = view.getFloat32(i * 4, true); break;
      case "float16": data[i] = halfValue(view.getUint16(i * 2, true)); break;
      case "bfloat16": data[i] = bfloatValue(view.getUint16(i * 2, true)); break;
      case "int64": (data as BigInt64Array)[i] = view.getBigInt64(i * 8, true); break;
      case "int32": data[i] = view.getInt32(i * 4, true); break;
      case "int16": data[i] = view.getInt16(i * 2, true); break;
      case "int8": data[i] = view.getInt8(i); break;
      case "uint8": data[i] = view.getUint8(i); break;
      case "bool": data[i] = view.getUint8(i) !== 0 ? 1 : 0; break;
    }
  }
  return new Tensor(dtype, shape, data);
}

function halfValue(bits: number): number {
  const sign = bits & 0x8000 ? -1 : 1;
  const exp = (bits >> 10) & 0x1f;
  const mant = bits & 0x3ff;
  if (exp === 0) return sign * mant * 2 ** -24;
  if (exp === 31) return mant ? NaN : sign * Infinity;
  return sign * (1024 + mant) * 2 ** (exp - 25);
}

function halfBits(value: number): number {
  // the value is a float16 already (Tensor rounds on the way in): this only lays out its bits
  const sign = value < 0 || Object.is(value, -0) ? 0x8000 : 0;
  const a = Math.abs(value);
  if (Number.isNaN(value)) return 0x7e00;
  if (a === Infinity) return sign | 0x7c00;
  if (a < 2 ** -14) return sign | Math.round(a / 2 ** -24);
  const e = Math.floor(Math.log2(a));
  const exp = 2 ** e > a ? e - 1 : 2 ** (e + 1) <= a ? e + 1 : e;
  return sign | ((exp + 15) << 10) | Math.round(a / 2 ** (exp - 10) - 1024);
}

const scratch = new DataView(new ArrayBuffer(4));

function bfloatValue(bits: number): number {
  scratch.setUint32(0, bits << 16, false);
  return scratch.getFloat32(0, false);
}

function bfloatBits(value: number): number {
  scratch.setFloat32(0, value, false); // exact: a bfloat16 value is a float32 with 16 zero low bits
  return scratch.getUint32(0, false) >>> 16;
}
