"""DP releases against raw releases, with the node's ledger on SQLite and on PostgreSQL.

    python -m ops.bench.dp                # ~65 s on 2 cores (+ up to 60 s waiting for a quiet CPU)
    python -m ops.bench.dp --n 500        # more latency samples
    python -m ops.bench.dp --no-c2        # skip the second pair of throughput figures

One run, one :class:`~ops.local.LocalGrid` in a temp dir (its own redis-server on a free port,
the gateway) and two nodes from configs written into the grid's home: ``dpsqlite`` (the
default SQLite node database) and ``dppg`` (``database =`` a PostgreSQL started in the run
with ``pgserver`` and stopped at the end). Both publish the same seeded 10 000 × 2 float32
table (columns ``a``, ``b``, declared bounds) to the same users, with
``[budget] default_epsilon = 1e9`` so no budget is ever exhausted. The query is
``ptr["a"].mean()``: a DP release is ``.get(epsilon=0.01)`` (one signed job; the node checks
the budget, computes, adds OpenDP Laplace noise and charges the user × dataset ledger in the
same transaction that records the reply); the baseline, measured in the same run on the same
node, is the same query released raw (``.get()``, as an allowed user). Measured per node:

1. **latency**, sequential, one job in flight: p50/p99 of ``--n`` raw releases, then of
   ``--n`` DP releases (both after ``--warmup``), as ``alice`` (worker concurrency 1).
   Then ``--history-n`` DP releases by a user whose ledger already holds ``--history``
   charges on the dataset (written straight into the node DB): the ledger is read on
   every release.
2. **throughput**: ``--burst`` jobs submitted at once from one client, then collected, in
   queries/s; DP (``expr.submit(epsilon=…)`` → ``ticket.private_value()``) against raw
   (``grid.submit(node, RunJob(plan, RawRelease()))`` → ``ticket.value()``), ``--rounds``
   rounds each, median shown. Each DP round is by a user with an empty ledger. Then again
   with each node restarted with ``[worker] concurrency = 2`` (``--no-c2`` skips it).
3. **where the time goes**: the node's ``JobRunner.answer`` run in this process on the same
   node database (no broker), raw and DP, by phase; and Celery's own run time of the node's
   ``run_job`` from its log during (1).
4. **the sound path against the old path's work** (:mod:`ops.bench.dp_sound`): in-process,
   for a few plans and table sizes, the analysis + OpenDP aggregates + noise the node does
   now, against validate + torch + noise, the work the node did before issue 14.

``other load`` is the CPU used by processes outside the benchmark meanwhile, in cores (the
PostgreSQL server is not a child of this process: its CPU is counted as the benchmark's).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from ops.bench import dp_sound
from ops.bench.dp_breakdown import node_breakdown
from ops.bench.measure import Load, Row, WorkerLog, p, timed, tree_ticks, wait_quiet
from ops.local import LocalGrid
from orchestrator.grid import Grid
from orchestrator.pointer import DataPointer, Expression
from orchestrator.ticket import PrivateValue
from protocol.contract import Tasks
from protocol.messages import RawRelease, RunJob
from workers.config import load_config
from workers.node import Node
from workers.storage.tables import ChargeRow

TAG = "#dpbench"
DATASET = "dp-table"
ROWS = 10_000
EPSILON = 0.01
SQLITE, PG = "dpsqlite", "dppg"
NODES = (SQLITE, PG)
LATENCY_USER, HISTORY_USER, INPROC_USER = "alice", "hist", "inproc"
console = Console(stderr=True)
Breakdown = dict[str, dict[str, float]]  # step → column ("dpsqlite raw", …) → p50 ms

CONFIG = """\
[node]
id = "{node}"
broker = "${{GRIDQ_BROKER}}"
store = "${{GRIDQ_HOME}}/{node}"
identity = "${{GRIDQ_HOME}}/keys/{node}.key"
{database}
{users}
[worker]
concurrency = {concurrency}

[budget]
default_epsilon = 1e9                # nothing is ever exhausted in the benchmark

[[datasets]]
name = "{dataset}"
path = "${{GRIDQ_HOME}}/data/dp-table.npy"
description = "{rows} seeded rows of two float32 columns, for the DP benchmark"
tags = ["{tag}"]
columns = ["a", "b"]
allowed_users = [{allowed}]
bounds = {{ a = [0.0, 7.0], b = [20.0, 65.0] }}
"""


def users(args: argparse.Namespace) -> list[str]:
    """Every identity the nodes know: one per measurement that charges a ledger, so each
    starts from an empty one (the ledger is read on every release)."""
    rounds = [f"tp{c}r{i}" for c in (1, 2) for i in range(args.rounds)]
    return [LATENCY_USER, HISTORY_USER, INPROC_USER, *rounds]


def write_config(home: Path, node: str, database: str | None, names: list[str], concurrency: int) -> Path:
    path = home / f"{node}.toml"
    path.write_text(CONFIG.format(
        node=node, database=f'database = "{database}"' if database else "# database: SQLite in the store",
        users="".join(f'\n[users.{u}]\npublic_key_file = "${{GRIDQ_HOME}}/keys/{u}.pub"\n' for u in names),
        concurrency=concurrency, dataset=DATASET, rows=ROWS, tag=TAG,
        allowed=", ".join(f'"{u}"' for u in names)))
    return path


def write_data(home: Path) -> None:
    rng = np.random.default_rng(0)
    table = np.stack([np.clip(rng.normal(3.4, 0.6, ROWS), 0.0, 7.0),
                      rng.uniform(20.0, 65.0, ROWS)], axis=1).astype(np.float32)
    (home / "data").mkdir(parents=True, exist_ok=True)
    np.save(home / "data" / "dp-table.npy", table)


# --- CPU of the PostgreSQL server (a daemon: not a child of this process) ----------------------


def _tree_ticks(root: int | None) -> int:
    """CPU ticks of process ``root`` and its descendants (0 without one)."""
    return 0 if root is None else tree_ticks(root)


class PgLoad:
    """Cores the PostgreSQL server used while the block ran."""

    root: int | None = None  # the postmaster, once started
    cores = 0.0

    def __enter__(self) -> PgLoad:
        self.t0, self.ticks0 = time.perf_counter(), _tree_ticks(PgLoad.root)
        return self

    def __exit__(self, *exc: object) -> None:
        seconds = time.perf_counter() - self.t0
        self.cores = (_tree_ticks(PgLoad.root) - self.ticks0) / os.sysconf("SC_CLK_TCK") / seconds


def sequential(fn: Callable[[], Any], n: int, warmup: int) -> tuple[list[float], float]:
    """:func:`~ops.bench.measure.timed`, with the PostgreSQL server's CPU not counted as other load."""
    for _ in range(warmup):
        fn()
    with PgLoad() as pg:
        samples, other = timed(fn, n, 0)
    return samples, max(0.0, other - pg.cores)


# --- throughput -------------------------------------------------------------------------------


@dataclass
class Rate:
    what: str
    rates: list[float]  # queries/s, one per round
    other_load: float
    baseline: Rate | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.rates)

    @property
    def ratio(self) -> str:
        return f"{self.median / self.baseline.median:.2f}×" if self.baseline else "1 (baseline)"


def burst(rounds: list[Callable[[], int]]) -> tuple[list[float], float]:
    """Run each round (it submits jobs, collects them and answers how many); queries/s of
    each, and the most other load seen in any."""
    rates, loads = [], []
    for go in rounds:
        with PgLoad() as pg, Load() as load:
            t0 = time.perf_counter()
            n = go()
            seconds = time.perf_counter() - t0
        rates.append(n / seconds)
        loads.append(max(0.0, load.cores - pg.cores))
    return rates, max(loads)


def dp_round(expr: Expression, n: int) -> int:
    tickets = [expr.submit(epsilon=EPSILON) for _ in range(n)]
    values = [t.private_value() for t in tickets]
    assert all(abs(v.noise.epsilon - EPSILON) < 1e-9 for v in values)  # OpenDP rounds ε up by an ulp
    return n


def raw_round(grid: Grid, expr: Expression, n: int) -> int:
    tickets = [grid.submit(expr.node, RunJob(plan=expr.plan, release=RawRelease())) for _ in range(n)]
    values = [t.value() for t in tickets]
    assert all(v.numel() == 1 for v in values)
    return n


def throughput(lg: LocalGrid, grid: Grid, node: str, concurrency: int, args: argparse.Namespace) -> list[Rate]:
    """Raw rounds as the latency user; each DP round as a user of its own, whose ledger is empty."""
    expr = pointer(grid, node)["a"].mean()
    raw_round(grid, expr, 20)  # warm-up (a restarted node's workers: their first jobs)
    raw = Rate(f"{node}, concurrency {concurrency}: raw",
               *burst([partial(raw_round, grid, expr, args.burst)] * args.rounds))
    grids = [lg.connect(f"tp{concurrency}r{i}") for i in range(args.rounds)]
    try:
        exprs = [pointer(g, node)["a"].mean() for g in grids]
        for e in exprs:
            e.get(epsilon=EPSILON)  # each connection's first job: node keys, the result backend
        dp = Rate(f"{node}, concurrency {concurrency}: DP ε={EPSILON}",
                  *burst([partial(dp_round, e, args.burst) for e in exprs]), raw)
    finally:
        for g in grids:
            g.close()
    return [raw, dp]


# --- the run ----------------------------------------------------------------------------------


def pointer(grid: Grid, node: str) -> DataPointer:
    return grid.search(TAG)[node][0]


@contextmanager
def postgres(folder: Path) -> Iterator[str]:
    """A PostgreSQL server of this run (pgserver), stopped on exit; yields its SQLAlchemy URL."""
    import pgserver

    server = pgserver.get_server(folder, cleanup_mode="stop")
    try:
        PgLoad.root = server.get_pid()
        yield server.get_uri().replace("postgresql://", "postgresql+psycopg://")
    finally:
        PgLoad.root = None
        server.cleanup()


def write_history(config: Path, user: str, releases: int) -> None:
    """``releases`` past ε=0.01 charges of ``user`` on the dataset, straight into the node's ledger."""
    node = Node(load_config(config))
    with node.store.session() as s:
        s.add_all([ChargeRow(job_id=f"history-{i}", dataset=DATASET, user=user, mechanism="laplace",
                             epsilon=EPSILON, delta=0.0, rho=0.0, scale=7.0 / ROWS / EPSILON, created_at=time.time())
                   for i in range(releases)])
    node.ledger.rebuild_totals()  # the running totals a node keeps with each charge
    node.close()


@dataclass
class Results:
    latency: list[Row]
    rates: list[Rate]
    breakdown: Breakdown
    ledger: dict[str, int]  # node → releases charged to the latency user (a check that DP charged)
    drift: dict[str, tuple[float, float, int]] = field(default_factory=dict)  # node → DP p50 first/last k, k
    sound: list[tuple[str, int, int, float, float]] = field(default_factory=list)  # (4): ops.bench.dp_sound
    seconds: float = 0.0


def restart(lg: LocalGrid, configs: dict[str, Path], home: Path, database: dict[str, str | None],
            names: list[str], concurrency: int) -> None:
    import signal

    for node in NODES:
        lg.kill(node, signal.SIGTERM)
        configs[node] = write_config(home, node, database[node], names, concurrency)
        lg.start_node(configs[node], node)
    lg.wait_ready(list(NODES))


def run(args: argparse.Namespace) -> Results:
    t_start = time.perf_counter()
    names = users(args)
    res = Results([], [], {}, {})
    with tempfile.TemporaryDirectory(prefix="gridq-bench-dp-") as tmp, LocalGrid(Path(tmp)) as lg:
        home = Path(tmp)
        console.print("starting redis, PostgreSQL (pgserver), the gateway and the nodes dpsqlite, dppg …")
        url = lg.start_redis()
        os.environ.update(GRIDQ_HOME=str(home), GRIDQ_BROKER=url)  # as LocalGrid.env(): load_config expands them
        lg.ensure_keys(*names, *NODES)
        write_data(home)
        with postgres(home / "pg") as pg_url:
            database: dict[str, str | None] = {SQLITE: None, PG: pg_url}
            configs = {node: write_config(home, node, database[node], names, 1) for node in NODES}
            lg.start_gateway()
            for node in NODES:
                lg.start_node(configs[node], node)
            lg.wait_ready(list(NODES))
            try:
                measure_all(lg, home, configs, database, names, args, res)
            finally:
                lg.stop()  # the nodes let go of PostgreSQL before it stops
    console.print("the sound DP path against the old path's work, in this process …")
    res.sound = dp_sound.measure(args.sound_n)
    res.seconds = time.perf_counter() - t_start
    return res


def measure_all(lg: LocalGrid, home: Path, configs: dict[str, Path], database: dict[str, str | None],
                names: list[str], args: argparse.Namespace, res: Results) -> None:
    n, warmup = args.n, args.warmup
    in_worker: dict[str, dict[str, float]] = {}
    with lg.connect(LATENCY_USER) as grid:
        for node in NODES:
            ptr = pointer(grid, node)
            console.print(f"{node}: latency, raw then DP (ε={EPSILON}) × {n} after {warmup} warm-up …")

            def raw(ptr: DataPointer = ptr) -> None:
                assert ptr["a"].mean().get().numel() == 1

            def dp(ptr: DataPointer = ptr) -> None:
                assert isinstance(ptr["a"].mean().get(epsilon=EPSILON), PrivateValue)

            log = lg.logs / f"{node}.log"
            with WorkerLog(log, Tasks.RUN_JOB) as raw_log:
                base = Row(f"{node}: raw release, ptr['a'].mean().get()", sequential(raw, n, warmup))
            with WorkerLog(log, Tasks.RUN_JOB) as dp_log:
                res.latency += [base, Row(f"{node}: DP release, .get(epsilon={EPSILON}) (ledger {warmup}→{warmup + n})",
                                          sequential(dp, n, warmup), base)]
            in_worker[node] = {"raw": p(raw_log.ms, 50), "dp": p(dp_log.ms, 50)}
            quarter = max(1, n // 4)
            samples = res.latency[-1].samples
            res.drift[node] = (p(samples[:quarter], 50), p(samples[-quarter:], 50), quarter)
            (info,) = grid.budget(node, DATASET)
            res.ledger[node] = info.releases

            console.print(f"{node}: DP × {args.history_n} by a user with {args.history} past releases …")
            write_history(configs[node], HISTORY_USER, args.history)
            with lg.connect(HISTORY_USER) as hist_grid:
                hist = pointer(hist_grid, node)

                def dp_hist(hist: DataPointer = hist) -> None:
                    assert isinstance(hist["a"].mean().get(epsilon=EPSILON), PrivateValue)

                res.latency.append(Row(f"{node}: DP release, user with {args.history:,} past releases on the dataset",
                                       sequential(dp_hist, args.history_n, 5), base))

        for concurrency in (1, 2) if args.c2 else (1,):
            if concurrency == 2:
                console.print("restarting both nodes with \\[worker] concurrency = 2 …")
                restart(lg, configs, home, database, names, 2)
            for node in NODES:
                console.print(f"{node}: throughput, {args.burst} submitted at once, raw then DP, "
                              f"× {args.rounds} rounds (concurrency {concurrency}) …")
                res.rates += throughput(lg, grid, node, concurrency, args)

        plans = {node: pointer(grid, node)["a"].mean().plan for node in NODES}
    console.print("where the time goes: the nodes' JobRunner.answer in this process, by phase …")
    steps: Breakdown = {}
    for node in NODES:
        for kind in ("raw", "dp"):
            steps.setdefault("worker: run_job, Celery's run time (its log, during 1)", {})[f"{node} {kind}"] = \
                in_worker[node][kind]
        found = node_breakdown(configs[node], lg.keys / f"{INPROC_USER}.key", plans[node], args.breakdown_n,
                               dataset=DATASET, rows=ROWS, epsilon=EPSILON, history_user=HISTORY_USER)
        for kind, by_step in found.items():
            for step, ms in by_step.items():
                steps.setdefault(step, {})[f"{node} {kind}"] = ms
    res.breakdown = steps


# --- the report -------------------------------------------------------------------------------

COLUMNS = [f"{node} {kind}" for node in NODES for kind in ("raw", "dp")]


def dp_ratio(res: Results) -> float:
    """SQLite / PostgreSQL, p50 of the DP latency rows."""
    by = {row.what.split(":")[0]: row for row in res.latency if "DP release, .get" in row.what}
    return by[SQLITE].p50 / by[PG].p50


def drift(res: Results, args: argparse.Namespace) -> str:
    """The DP series' p50 over its first and its last samples: the ledger grows meanwhile."""
    k = next(iter(res.drift.values()))[2]
    first, last = f"{args.warmup}→{args.warmup + k}", f"{args.warmup + args.n - k}→{args.warmup + args.n}"
    figures = ", ".join(f"{node} {a:.2f} / {b:.2f} ms" for node, (a, b, _) in res.drift.items())
    return f"DP p50 over the first / last {k} releases of (1) (ledger {first} / {last}): {figures}."


def _ms(cols: dict[str, float], col: str) -> str:
    return "—" if math.isnan(cols.get(col, math.nan)) else f"{cols[col]:.3f}"


def tables(res: Results) -> list[Table]:
    t = Table(title="latency: DP release vs raw release of ptr['a'].mean() (same node, sequential)")
    for col in ("measurement", "n", "p50 ms", "p99 ms", "vs raw (p50)", "other load"):
        t.add_column(col, justify="left" if col == "measurement" else "right")
    for row in res.latency:
        t.add_row(row.what, str(len(row.samples)), f"{row.p50:.2f}", f"{row.p99:.2f}", row.ratio,
                  f"{row.other_load:.2f}")
    r = Table(title="throughput: jobs submitted at once from one client, then collected")
    for col in ("measurement", "rounds", "queries/s (median)", "min–max", "vs raw", "other load"):
        r.add_column(col, justify="left" if col == "measurement" else "right")
    for rate in res.rates:
        r.add_row(rate.what, str(len(rate.rates)), f"{rate.median:.0f}",
                  f"{min(rate.rates):.0f}–{max(rate.rates):.0f}", rate.ratio, f"{rate.other_load:.2f}")
    b = Table(title="where the time goes (p50 ms of each step, per call)")
    b.add_column("step")
    for col in COLUMNS:
        b.add_column(col, justify="right")
    for step, cols in res.breakdown.items():
        b.add_row(step, *[_ms(cols, c) for c in COLUMNS])
    return [t, r, b]


def markdown(res: Results, args: argparse.Namespace) -> str:
    lines = ["| measurement | n | p50 ms | p99 ms | vs raw (p50) | other load (cores) |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {row.what} | {len(row.samples)} | {row.p50:.2f} | {row.p99:.2f} | {row.ratio} | "
              f"{row.other_load:.2f} |" for row in res.latency]
    lines += ["", f"DP latency p50, SQLite / PostgreSQL: {dp_ratio(res):.2f}. Releases charged to "
              f"{LATENCY_USER} by the end of (1): " + ", ".join(f"{k} {v}" for k, v in res.ledger.items()) + ". "
              + drift(res, args),
              "", f"Throughput, {args.burst} jobs submitted at once from one client, then collected:", "",
              "| measurement | rounds | queries/s (median) | min–max | vs raw | other load (cores) |",
              "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {rate.what} | {len(rate.rates)} | {rate.median:.0f} | {min(rate.rates):.0f}–{max(rate.rates):.0f}"
              f" | {rate.ratio} | {rate.other_load:.2f} |" for rate in res.rates]
    lines += ["", "Where the time goes (p50 ms of each step, per call; node phases in-process, "
              f"{args.breakdown_n} jobs of each kind):", "",
              "| step | " + " | ".join(COLUMNS) + " |", "|---|" + "---:|" * len(COLUMNS)]
    lines += [f"| {step} | " + " | ".join(_ms(cols, c) for c in COLUMNS) + " |"
              for step, cols in res.breakdown.items()]
    lines += ["", f"`{' '.join(['python -m ops.bench.dp', *args.argv])}`: n={args.n} (after {args.warmup} warm-up), "
              f"history {args.history:,} × {args.history_n}, bursts of {args.burst} × {args.rounds} rounds; total "
              f"{res.seconds:.0f} s; Python {platform.python_version()}, torch {torch.__version__}, "
              f"{os.cpu_count()} CPUs", "", "The sound DP path against the old path's work:", "",
              dp_sound.markdown(res.sound, args.sound_n)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ops.bench.dp", description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="timed sequential releases of each kind, per node")
    parser.add_argument("--warmup", type=int, default=20, help="unrecorded releases before each latency series")
    parser.add_argument("--history", type=int, default=1000, help="past releases of the user of the history row")
    parser.add_argument("--history-n", type=int, default=50, help="timed DP releases of that user, per node")
    parser.add_argument("--burst", type=int, default=200, help="jobs submitted at once in a throughput round")
    parser.add_argument("--rounds", type=int, default=3, help="throughput rounds of each kind")
    parser.add_argument("--c2", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure throughput with the nodes restarted with [worker] concurrency = 2")
    parser.add_argument("--breakdown-n", type=int, default=100, help="in-process jobs of each kind, per node")
    parser.add_argument("--sound-n", type=int, default=30, help="in-process releases of each kind and plan in (4)")
    parser.add_argument("--wait-quiet", type=float, default=60.0, metavar="SECONDS",
                        help="first wait up to this long for other processes to leave the CPU idle (0: don't)")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.wait_quiet > 0:
        wait_quiet(args.wait_quiet, console.print)
    res = run(args)
    out = Console()
    for t in tables(res):
        out.print(t)
    out.print(dp_sound.table(res.sound))
    dp_rows = [row for row in res.latency if "DP release, .get" in row.what]
    out.print("DP / raw p50: " + ", ".join(f"{row.what.split(':')[0]} {row.ratio}" for row in dp_rows)
              + f"; DP p50 SQLite / PostgreSQL = {dp_ratio(res):.2f}; total {res.seconds:.0f} s")
    out.print(drift(res, args))
    busiest = max([row.other_load for row in res.latency] + [rate.other_load for rate in res.rates])
    if busiest > 0.2:
        out.print(f"[yellow]note: other processes used up to {busiest:.2f} cores during the measurements: "
                  "these figures are inflated and noisy[/]")
    print("\n## Results (markdown)\n")
    print(markdown(res, args))


if __name__ == "__main__":
    main()
