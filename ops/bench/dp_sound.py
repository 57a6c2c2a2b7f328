"""What the sound DP path costs at the node, in this process (no broker), against the old
path's work measured in the same run.

    python -m ops.bench.dp_sound          # ~20 s on 2 cores

For each plan and table size, p50 over ``--n`` releases of:

* **old path's work** — what the node did before issue 14 once the sensitivity was known:
  validate the plan, run it with torch, add OpenDP's noise to the result;
* **sound path** — what it does now: analyse the plan (row provenance, bounds, OpenDP's
  stability map of each aggregate cell), run the row phase with torch, have OpenDP clamp
  and sum / average every aggregate cell over the rows, add the noise, post-process.

The old interval propagation itself is not re-created here (it is gone); its cost was the
``calibrate`` row of ``python -m ops.bench.dp`` (0.3–0.5 ms in ``ops/bench/RESULTS.md``).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from rich.console import Console
from rich.table import Table

from ops.bench.measure import p
from orchestrator.pointer import Expression
from protocol.dp import add_noise
from protocol.dp_release import run_release
from protocol.interpret import evaluate, validate
from protocol.messages import DatasetMeta, DPRelease
from protocol.plan import InputRef, Plan, TensorSpec
from workers.policy.release import calibrate_release


def table_of(rows: int, columns: int) -> tuple[Expression, torch.Tensor, DatasetMeta]:
    data = torch.rand(rows, columns, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 16
    spec = TensorSpec(shape=(rows, columns), dtype="float64")
    expr = Expression(None, "bench", [(InputRef(kind="dataset", name="t"), spec)])  # type: ignore[arg-type]
    return expr, data, DatasetMeta(node="bench", name="t", shape=(rows, columns), dtype="float64",
                                   bounds=[(0.0, 16.0)])


def cases() -> list[tuple[str, Callable[[Expression], Expression], int, int]]:
    return [
        ("mean of a column", lambda t: t[:, 0].mean(), 1_000, 2),
        ("mean of a column", lambda t: t[:, 0].mean(), 10_000, 2),
        ("mean of a column", lambda t: t[:, 0].mean(), 100_000, 2),
        ("histogram count (t > 8)", lambda t: (t[:, 0] > 8).count(), 10_000, 2),
        ("column sums, digits-sized", lambda t: t.sum(dim=0), 1_797, 65),
        ("mean difference, post-processed", lambda t: t[:, 0].mean() - t[:, 1].mean(), 10_000, 2),
    ]


def time_releases(plan: Plan, data: torch.Tensor, meta: DatasetMeta, n: int) -> tuple[float, float]:
    """p50 ms of the old path's work and of the sound path, for one plan on one table."""
    metas = [meta.model_dump(mode="json")]
    charge = calibrate_release(plan, DPRelease(epsilon=1.0), metas).charge

    def old() -> None:
        validate(plan, [TensorSpec(shape=tuple(data.shape), dtype="float64")])
        add_noise(evaluate(plan, [data]), charge)

    def sound() -> None:
        done = calibrate_release(plan, DPRelease(epsilon=1.0), metas)
        run_release(plan, [data], done.analysis, lambda v: add_noise(v, done.charge))

    timings = []
    for fn in (old, sound):
        for _ in range(3):
            fn()
        ms = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            ms.append((time.perf_counter() - t0) * 1000)
        timings.append(p(ms, 50))
    return timings[0], timings[1]


def measure(n: int) -> list[tuple[str, int, int, float, float]]:
    out = []
    for name, build, rows, columns in cases():
        expr, data, meta = table_of(rows, columns)
        out.append((name, rows, columns, *time_releases(build(expr).plan, data, meta, n)))
    return out


def table(results: list[tuple[str, int, int, float, float]]) -> Table:
    t = Table(title="the sound DP path against the old path's work (in-process, p50 ms)")
    for col in ("plan", "rows × columns", "old path's work", "sound path", "sound / old"):
        t.add_column(col, justify="left" if col == "plan" else "right")
    for name, rows, cols, old, sound in results:
        t.add_row(name, f"{rows:,} × {cols}", f"{old:.3f}", f"{sound:.3f}", f"{sound / old:.1f}×")
    return t


def markdown(results: list[tuple[str, int, int, float, float]], n: int) -> str:
    lines = ["| plan | rows × columns | old path's work p50 ms | sound path p50 ms | sound / old |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {name} | {rows:,} × {cols} | {old:.3f} | {sound:.3f} | {sound / old:.1f}× |"
              for name, rows, cols, old, sound in results]
    lines += ["", f"`python -m ops.bench.dp_sound --n {n}`: in-process, p50 of {n} releases each"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ops.bench.dp_sound", description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=30, help="timed releases of each kind and case")
    args = parser.parse_args(argv)
    results = measure(args.n)
    Console().print(table(results))
    print("\n## Results (markdown)\n")
    print(markdown(results, args.n))


if __name__ == "__main__":
    main()
