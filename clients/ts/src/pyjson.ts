/**
 * JSON text exactly as Python's `json.dumps(value, separators=(",", ":"))` writes it.
 *
 * Signatures in gridq cover JSON text that Python produces (an envelope's `signed_bytes`, a
 * model card's canonical form, a listing's signed part), so a client that signs or checks them
 * must write the same bytes. JavaScript's `JSON.stringify` differs in three ways that matter:
 *
 * - Python escapes every non-ASCII character as `\uXXXX` (`ensure_ascii`), including DEL (0x7f);
 * - Python writes a float with a `.0` (`1.0`, `1700000000.0`) and exponents as `1e-05`, `1e+16`;
 * - an int beyond 2^53 needs a `bigint` to be written exactly.
 *
 * JavaScript has one number type, so a float whose value is whole is marked with {@link float}
 * (`float(2)` writes `2.0`); an unmarked whole number up to 2^53 is written as an int, any other
 * number as a float — what Python writes for `2`, `2.5` and `1e300`. Exact ints beyond 2^53 are
 * `bigint`s.
 */

/** A number to be written as a Python float (`float(2)` → `2.0`). */
export class PyFloat {
  constructor(readonly value: number) {}
  valueOf(): number {
    return this.value;
  }
}

/** Mark `value` to be written as a Python float, as `2.0` rather than `2`. */
export function float(value: number): PyFloat {
  return new PyFloat(value);
}

export type PyJson =
  | null
  | boolean
  | number
  | bigint
  | string
  | PyFloat
  | readonly PyJson[]
  | { readonly [key: string]: PyJson | undefined };

/** Python's `repr(float)`: the shortest digits that round-trip (as JavaScript's), laid out as
 * CPython's `float_repr` does: fixed notation while -4 < exponent ≤ 16, else `d.ddde±XX`. */
export function pyFloatRepr(value: number): string {
  if (!Number.isFinite(value)) {
    throw new RangeError(`${value} has no JSON form here (gridq messages refuse NaN and infinities)`);
  }
  const sign = value < 0 || Object.is(value, -0) ? "-" : "";
  const [mantissa, exponent] = Math.abs(value).toExponential().split("e") as [string, string];
  const digits = mantissa.replace(".", "");
  const point = Number(exponent) + 1; // the decimal point's place after the first digit
  if (point > -4 && point <= 16) {
    if (point <= 0) return `${sign}0.${"0".repeat(-point)}${digits}`;
    if (point >= digits.length) return `${sign}${digits}${"0".repeat(point - digits.length)}.0`;
    return `${sign}${digits.slice(0, point)}.${digits.slice(point)}`;
  }
  const exp = point - 1;
  const expText = `${exp < 0 ? "-" : "+"}${String(Math.abs(exp)).padStart(2, "0")}`;
  const rest = digits.slice(1);
  return `${sign}${digits[0]}${rest ? "." + rest : ""}e${expText}`;
}

const SHORT_ESCAPES: Readonly<Record<string, string>> = {
  '"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b", "\f": "\\f",
};

/** A string as Python's `json.dumps` writes it (ensure_ascii): anything outside printable ASCII
 * becomes `\uXXXX`, UTF-16 code unit by code unit (so a surrogate pair is two escapes). */
export function pyString(text: string): string {
  let out = '"';
  for (let i = 0; i < text.length; i++) {
    const ch = text[i] as string;
    const code = text.charCodeAt(i);
    const short = SHORT_ESCAPES[ch];
    if (short !== undefined) out += short;
    else if (code < 0x20 || code > 0x7e) out += "\\u" + code.toString(16).padStart(4, "0");
    else out += ch;
  }
  return out + '"';
}

function compareCodePoints(a: string, b: string): number {
  // Python sorts str keys by code point; JavaScript's default sort compares UTF-16 code units
  const x = Array.from(a, (c) => c.codePointAt(0) as number);
  const y = Array.from(b, (c) => c.codePointAt(0) as number);
  for (let i = 0; i < Math.min(x.length, y.length); i++) {
    if (x[i] !== y[i]) return (x[i] as number) - (y[i] as number);
  }
  return x.length - y.length;
}

/**
 * `json.dumps(value, separators=(",", ":"), sort_keys=sortKeys)`, byte for byte.
 * Object keys keep their insertion order unless `sortKeys`; a key whose value is `undefined` is
 * left out (as an absent field).
 */
export function pyDumps(value: PyJson, sortKeys = false): string {
  if (value === null) return "null";
  if (value === true) return "true";
  if (value === false) return "false";
  if (typeof value === "string") return pyString(value);
  if (typeof value === "bigint") return value.toString();
  if (value instanceof PyFloat) return pyFloatRepr(value.value);
  if (typeof value === "number") {
    // a whole number beyond 2^53 is no exact int in JavaScript: it is written as the float it is
    if (Number.isSafeInteger(value) && !Object.is(value, -0)) return String(value);
    return pyFloatRepr(value);
  }
  if (Array.isArray(value)) return `[${value.map((v: PyJson) => pyDumps(v, sortKeys)).join(",")}]`;
  const record = value as { readonly [key: string]: PyJson | undefined };
  let keys = Object.keys(record).filter((k) => record[k] !== undefined);
  if (sortKeys) keys = keys.sort(compareCodePoints);
  return `{${keys.map((k) => `${pyString(k)}:${pyDumps(record[k] as PyJson, sortKeys)}`).join(",")}}`;
}

/** UTF-8 bytes of `text`. */
export function utf8(text: string): Uint8Array {
  return new TextEncoder().encode(text);
}
