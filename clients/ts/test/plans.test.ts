/**
 * Plans: each expression below is the TypeScript spelling of one Python expression of
 * scripts/make_vectors.py `plan_cases()`, and must give the very RunJob body text Python sends.
 */
import { describe, expect, it } from "vitest";
import {
  cat,
  DataPointer,
  type Expression,
  float,
  InvalidRequest,
  pyDumps,
  slice,
  stack,
  Tensor,
  tensor,
} from "../src/index.js";
import type { DatasetMeta } from "../src/messages.js";
import { plans } from "./vectors.js";

const BIRTHS: DatasetMeta = {
  node: "hospital", name: "birth-records-feb", shape: [240, 2], dtype: "float32", columns: ["weight", "height"],
  description: "", tags: ["#birth-records"],
};
const OTHER: DatasetMeta = { ...BIRTHS, name: "births-mar", tags: [] };

function pointer(meta: DatasetMeta): DataPointer {
  return new DataPointer(null, meta.node, { kind: "dataset", name: meta.name }, { shape: meta.shape, dtype: meta.dtype }, meta);
}

function cases(): Record<string, Expression> {
  const b = pointer(BIRTHS);
  const o = pointer(OTHER);
  const w = b.col("weight");
  const h = b.col("height");
  const kept = new DataPointer(null, "hospital", { kind: "object", name: "obj-1" }, { shape: [240], dtype: "float32" });
  return {
    column_sum: b.index(":", 0).sum(),
    weight_mean: w.mean(),
    height_count: h.gt(52).count(),
    public_tensor: w.sub(Tensor.full([240], 3.5)).abs().mean(),
    clamp_sum: w.clamp(0, 7).sum(),
    ratio: w.sum().div(h.sum()),
    const_first: w.rsub(2),
    float_const: w.mul(float(2)),
    int_const: w.mul(2),
    keepdim: h.mean(0, true),
    spread: b.std(0).div(b.var([0], false, 0)),
    gram: b.T.matmul(b),
    shifted: b.index("1:", 0).mul(b.index(":-1", 0)),
    fancy_index: b.index("...", null).index("::2", 0, slice()),
    where: w.gt(float(4)).where(w, 0),
    cast_reshape: b.to("float64").reshape(480).max(),
    cat_stack: stack([cat([w, w.mul(2)], 0), cat([h, h], 0)], 1),
    self_twice: w.add(w),
    unary: b.exp().log().sqrt(),
    neg_abs: b.neg().abs(),
    int_index: b.index(0).add(b.index(-1, 1)),
    eq_ne: w.eq(3.5).to("int64").add(h.ne(0).to("int64")),
    pow_rdiv: b.pow(2).add(b.rdiv(1)),
    two_datasets: w.add(o.col("weight")),
    kept_object: kept.mul(float(3)).add(w),
    bool_const: w.mul(true),
    big_and_small: w.mul(1e-7).add(12345678901234).sub(1e300),
    scalar_tensor: w.mul(Tensor.of(2)),
    int_tensor: b.index(":", 0).add(Tensor.arange(240)),
    public_matrix: b.matmul(tensor([[1.0], [0.5]])),
    min_max: b.min(1).max(),
    count_dim: b.gt(1).count(0),
    clamp_one_side: w.clamp(null, 6.5).clamp(0.5).sum(),
    transpose_args: b.reshape(2, 120, 2).transpose(1, 2).sum([1, 2]),
    rsub_radd_rmul: w.rsub(1).add(w.radd(2)).add(w.rmul(3)).add(h.rsub(0.5)),
    le_ge_lt: w.le(3).to("float32").add(w.ge(2).to("float32")).add(w.lt(5).to("float32")),
  };
}

describe("plans built in TypeScript", () => {
  const built = cases();

  it("cover every case Python built", () => {
    expect(Object.keys(built).sort()).toEqual(Object.keys(plans.cases).sort());
  });

  for (const [name, expected] of Object.entries(plans.cases) as [string, { body: string }][]) {
    it(`${name}: the same RunJob body text as Python`, () => {
      const expr = built[name] as Expression;
      expect(pyDumps(expr.runJob({ door: "raw" }))).toBe(expected.body);
    });
  }

  it("release doors are written as Python writes them", () => {
    const mean = pointer(BIRTHS).col("weight").mean();
    expect(pyDumps(mean.runJob({ door: "keep" }))).toBe(plans.releases.keep);
    expect(pyDumps(mean.runJob({ door: "raw" }))).toBe(plans.releases.raw);
    expect(pyDumps(mean.runJob({ door: "dp", epsilon: 0.1, delta: 0 }))).toBe(plans.releases.dp);
    expect(pyDumps(mean.runJob({ door: "dp", epsilon: 1, delta: 1e-7 }))).toBe(plans.releases.dp_gauss);
  });
});

describe("building a plan refuses, before anything is sent", () => {
  const b = pointer(BIRTHS);

  it("a column that is not there, and a slice that is not one", () => {
    expect(() => b.col("age")).toThrow(/no column 'age'/);
    expect(() => b.index("weight")).toThrow(InvalidRequest);
    expect(() => b.index(1.5)).toThrow(/cannot index/);
  });

  it("data of two nodes in one plan", () => {
    const elsewhere = pointer({ ...BIRTHS, node: "clinic" });
    expect(() => b.add(elsewhere)).toThrow(/a plan runs at one node/);
  });

  it("constants that are not finite, too big, or too large a tensor", () => {
    expect(() => b.mul(NaN)).toThrow(/finite/);
    expect(() => b.mul(2n ** 63n)).toThrow(/int64/);
    expect(() => b.add(Tensor.full([65_537], 1))).toThrow(/at most 65536/);
    expect(() => b.add(Tensor.full([2], 1, "int8"))).toThrow(/cast it first/);
  });

  it("a delta without an epsilon, and an epsilon out of range", async () => {
    await expect(b.sum().get({ epsilon: undefined, delta: 1e-6 } as never)).rejects.toThrow(/needs an epsilon/);
    await expect(b.sum().get({ epsilon: 0 })).rejects.toThrow(/0 < epsilon/);
  });

  it("running an expression that belongs to no grid", async () => {
    await expect(b.sum().get()).rejects.toThrow(/no grid/);
  });
});
