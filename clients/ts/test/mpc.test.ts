/** Fixed point and additive sharing over Z_2^64 (BigInt64Array), and the Tensor they travel in. */
import { describe, expect, it } from "vitest";
import { FixedPoint, reconstruct, share, Tensor, tensor } from "../src/index.js";
import { roundHalfEven } from "../src/mpc.js";

function randomValues(n: number, scale: number): number[] {
  return Array.from({ length: n }, () => (Math.random() - 0.5) * 2 * scale);
}

describe("fixed point", () => {
  it("round-trips within 2^-(f+1)", () => {
    for (const f of [8, 16, 24]) {
      const fp = new FixedPoint(f);
      const x = randomValues(1000, 1e4);
      const back = fp.decode(fp.encode(x));
      x.forEach((v, i) => expect(Math.abs((back[i] as number) - v)).toBeLessThanOrEqual(2 ** -(f + 1)));
    }
  });

  it("rounds ties to even, as torch.round", () => {
    expect([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 2.4999, 2.5001].map(roundHalfEven)).toEqual([0, 2, 2, 0, -2, -2, 2, 3]); // the sign of a zero is lost in the ring anyway
  });

  it("refuses NaN, infinities and values beyond the ring, and bad fractional bits", () => {
    const fp = new FixedPoint(16);
    expect(() => fp.encode([NaN])).toThrow(/do not fit/);
    expect(() => fp.encode([Infinity])).toThrow(/do not fit/);
    expect(() => fp.encode([2 ** 47])).toThrow(/do not fit/);
    expect(fp.encode([2 ** 46])[0]).toBe(2n ** 62n);
    expect(() => new FixedPoint(0)).toThrow(/frac_bits/);
    expect(() => new FixedPoint(31)).toThrow(/frac_bits/);
  });
});

describe("additive sharing", () => {
  it("reconstructs what was shared, for 2 to 5 parties, wrapping modulo 2^64", () => {
    const secret = BigInt64Array.from([0n, 1n, -1n, 2n ** 63n - 1n, -(2n ** 63n), 123456789n]);
    for (let n = 2; n <= 5; n++) {
      const shares = share(secret, n);
      expect(shares).toHaveLength(n);
      expect(Array.from(reconstruct(shares))).toEqual(Array.from(secret));
    }
  });

  it("gives n-1 shares that do not depend on the secret (fresh randomness each time)", () => {
    const zero = new BigInt64Array(64);
    const [a] = share(zero, 2);
    const [b] = share(zero, 2);
    expect(Array.from(a!)).not.toEqual(Array.from(b!));
    expect(Array.from(a!).some((v) => v !== 0n)).toBe(true);
    expect(() => share(zero, 1)).toThrow(/at least 2/);
  });
});

describe("tensors", () => {
  it("take their shape from nested arrays and give it back", () => {
    const t = tensor([[1, 2, 3], [4, 5, 6]], "float64");
    expect([t.shape, t.size, t.ndim]).toEqual([[2, 3], 6, 2]);
    expect(t.toArray()).toEqual([[1, 2, 3], [4, 5, 6]]);
    expect(Tensor.of(2.5).item()).toBe(2.5);
    expect(Tensor.of([true, false], "bool").values()).toEqual([true, false]);
    expect(Tensor.arange(3).values()).toEqual([0n, 1n, 2n]);
    expect(Tensor.of([0.1], "float16").numbers()[0]).toBe(0.0999755859375);
  });

  it("refuse ragged arrays, fractional int64 and shapes that do not hold their values", () => {
    expect(() => tensor([[1, 2], [3]])).toThrow(/one length per level/);
    expect(() => Tensor.of([1.5], "int64")).toThrow(/not an integer/);
    expect(() => new Tensor("float32", [3], new Float32Array(2))).toThrow(/holds 3 values/);
    expect(() => Tensor.of([1, 2]).item()).toThrow(/one value/);
  });
});
