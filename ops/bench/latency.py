"""Latency of gridq against a bare Celery round trip on the same broker.

    python -m ops.bench.latency            # ~1 min on 2 cores
    python -m ops.bench.latency --n 1000   # more samples

One run, one :class:`~ops.local.LocalGrid` in a temp dir (its own redis-server on a free
port, a gateway and the ``hospital`` node), plus a bare Celery worker
(:mod:`ops.bench.bare_worker`) on the same Redis, with the same Celery settings and pool
options as a gridq node. Measured, all sequential, one request in flight:

a. **bare round trip**: ``send_task("add", (1, 2)).get()`` through the bare worker.
b. **gridq job**: ``ptr.mean().get()`` on a 1M-element float32 dataset, as ``alice``: one
   signed job (client builds and validates the plan, seals a signed envelope; the node
   verifies it, records nonce and job, authorizes, validates, runs, seals the value for
   alice, signs the reply, records it; the client verifies and unseals).
c. **10 MiB download**: ``ptr.get()`` of a 10 MiB float32 dataset (sealed bytes travel by
   claim-check: Redis key in the reply) against the same 10 MiB as a Celery task
   argument to the bare worker (which answers its size).

Then, for the record, where the node's time goes: the node's own ``JobRunner.handle`` run
in this process on the same store (no broker), by phase.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import redis
import torch
from rich.console import Console
from rich.table import Table

from ops.bench.bare_worker import ADD, ECHO_SIZE, QUEUE
from ops.demo import prepare
from ops.local import NODE_CONFIGS, LocalGrid
from orchestrator.app import make_celery
from protocol.envelope import seal_envelope
from protocol.messages import RawRelease, RunJob
from workers.config import load_config
from workers.node import Node

SMALL = "bench-1m"  # 1M float32 (4 MiB at the node; the job's answer is one scalar)
BIG = "bench-10mib"  # 10 MiB float32: 2,621,440 elements
BIG_ELEMENTS = 10 * 1024 * 1024 // 4
TAG = "#bench"
console = Console(stderr=True)


# --- measuring -------------------------------------------------------------------------------


def timed(fn: Callable[[], Any], n: int, warmup: int) -> list[float]:
    """Milliseconds of ``n`` sequential calls, after ``warmup`` unrecorded ones."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def p(samples: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(samples), q))


class Row:
    def __init__(self, what: str, samples: list[float], baseline: Row | None = None, note: str = "") -> None:
        self.what, self.samples, self.baseline, self.note = what, samples, baseline, note
        self.p50, self.p99 = p(samples, 50), p(samples, 99)

    @property
    def ratio(self) -> str:
        return f"{self.p50 / self.baseline.p50:.2f}×" if self.baseline else "1 (baseline)"


# --- the grid ---------------------------------------------------------------------------------


def start(lg: LocalGrid, home: Path) -> None:
    prepare(home)  # keys of every demo participant + demo data
    url = lg.start_redis()
    # load_config expands ${GRIDQ_HOME}/${GRIDQ_BROKER}, as in the node processes (LocalGrid.env())
    os.environ.update(GRIDQ_HOME=str(home), GRIDQ_BROKER=url)
    # Publish before the node starts: the data goes into the node's store, and the node's
    # registration at start-up carries the metadata of every stored dataset to the gateway.
    gen = torch.Generator().manual_seed(0)
    node = Node(load_config(NODE_CONFIGS / "hospital.toml"))
    node.publish(SMALL, torch.rand(1_000_000, generator=gen), description="1M float32 for the benchmark",
                 tags=[TAG], allowed_users=["alice"], notify=False)
    node.publish(BIG, torch.rand(BIG_ELEMENTS, generator=gen), description="10 MiB float32 for the benchmark",
                 tags=[TAG], allowed_users=["alice"], notify=False)
    node.close()
    lg._spawn("bare", [sys.executable, "-m", "celery", "-A", "ops.bench.bare_worker", "worker",
                       "--queues", QUEUE, "--hostname", "bare@%h",
                       "--pool", "prefork", "--concurrency", "1",  # as a gridq node (workers/worker.py)
                       "--without-mingle", "--without-gossip", "--task-events", "--loglevel", "INFO"])
    lg.start([NODE_CONFIGS / "hospital.toml"])


# --- where the node's time goes (in this process, no broker) -------------------------------------


@contextlib.contextmanager
def phases(runner: Any) -> Iterator[dict[str, list[float]]]:
    """Wrap the steps of JobRunner.handle (in this process only) and collect their times."""
    import workers.jobs as jobs

    found: dict[str, list[float]] = {}
    saved: list[tuple[Any, str, Any]] = []

    def wrap(owner: Any, attr: str, label: str) -> None:
        original = getattr(owner, attr)

        def timed_call(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return original(*a, **k)
            finally:
                found.setdefault(label, []).append((time.perf_counter() - t0) * 1000)

        saved.append((owner, attr, original))
        setattr(owner, attr, timed_call)

    wrap(jobs, "open_envelope", "verify envelope (sig + nonce row in SQL)")
    wrap(runner.store, "remember", "  of which: nonce INSERT + commit")
    wrap(runner.store, "begin_job", "job row INSERT + commit")
    wrap(runner.store, "dataset", "dataset lookup (SQL SELECT, cached tensor)")
    wrap(jobs, "authorize", "authorize")
    wrap(jobs, "validate", "validate plan (meta tensors)")
    wrap(jobs, "evaluate", "run plan (mean of 1M)")
    wrap(runner, "_seal", "seal value for requester")
    wrap(runner, "_sign", "sign reply envelope")
    wrap(runner.store, "finish_job", "job row UPDATE + commit (reply)")
    wrap(runner, "handle", "JobRunner.handle total")
    try:
        yield found
    finally:
        for owner, attr, original in reversed(saved):
            if owner is runner or owner is runner.store:
                delattr(owner, attr)
            else:
                setattr(owner, attr, original)


def node_breakdown(grid: Any, n: int) -> list[tuple[str, float]]:
    node = Node(load_config(NODE_CONFIGS / "hospital.toml"))
    runner = node.runner()
    plan = next(ptr for ptr in grid.search(TAG)["hospital"] if ptr.name == SMALL).mean().plan
    body = RunJob(plan=plan, release=RawRelease()).model_dump(mode="json")

    def one() -> None:
        job_id = f"hospital:bench-{time.perf_counter_ns()}"
        env = seal_envelope(grid.identity, recipient="hospital", kind="run_job", job_id=job_id, body=body,
                            now=time.time())
        reply = runner.handle(env.model_dump(mode="json"), delivery_id=job_id)
        assert reply["kind"] == "job_reply", reply

    for _ in range(10):
        one()
    with phases(runner) as found:
        for _ in range(n):
            one()
    node.close()
    return [(label, p(ms, 50)) for label, ms in found.items()]


# --- main ---------------------------------------------------------------------------------------


def run(n: int, warmup: int, big_runs: int) -> tuple[list[Row], list[tuple[str, float]], float]:
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gridq-bench-") as tmp, LocalGrid(Path(tmp)) as lg:
        home = Path(tmp)
        console.print("starting redis, the bare worker, the gateway and the hospital node …")
        start(lg, home)
        client = make_celery(lg.url, "gridq-bench-client")  # the same client settings as orchestrator.Grid
        client.send_task(ADD, args=[1, 2], queue=QUEUE).get(timeout=60)  # the bare worker is up

        def bare_add() -> None:
            assert client.send_task(ADD, args=[1, 2], queue=QUEUE).get(timeout=30, interval=0.05) == 3

        payload = os.urandom(BIG_ELEMENTS * 4)

        def bare_10mib() -> None:
            r = client.send_task(ECHO_SIZE, args=[payload], queue=QUEUE).get(timeout=60, interval=0.05)
            assert r == len(payload)

        r = redis.Redis.from_url(lg.url)

        def raw_claim_check() -> None:  # the floor of a claim-check: SET then GET+DEL of the bytes
            r.set("bench:blob", payload, ex=60)
            pipe = r.pipeline()
            pipe.get("bench:blob")
            pipe.delete("bench:blob")
            assert len(pipe.execute()[0]) == len(payload)

        console.print(f"(a) bare Celery round trip × {n} …")
        bare = Row("bare Celery round trip: send_task(add).get()", timed(bare_add, n, warmup))

        with lg.connect("alice") as grid:
            ptrs = {ptr.name: ptr for ptr in grid.search(TAG)["hospital"]}
            small, big = ptrs[SMALL], ptrs[BIG]
            console.print(f"(b) gridq ptr.mean().get() on 1M float32 × {n} …")
            gq = Row("gridq job: ptr.mean().get() on 1M float32", timed(lambda: small.mean().get(), n, warmup),
                     bare, "signed job: verify, authorize, validate, run, seal, reply")
            console.print(f"(c) 10 MiB: bare task argument, raw claim-check, gridq .get() × {big_runs} each …")
            bare_big = Row("bare Celery: 10 MiB bytes as task argument", timed(bare_10mib, big_runs, 2))
            raw_cc = Row("raw Redis SET + GET/DEL of 10 MiB (claim-check floor)",
                         timed(raw_claim_check, big_runs, 2), bare_big)
            got = big.get()
            assert got.shape == (BIG_ELEMENTS,) and got.dtype == torch.float32
            gq_big = Row("gridq: ptr.get() of 10 MiB float32 (claim-check)", timed(big.get, big_runs, 2),
                         bare_big, "sealed bytes by claim-check, key in the signed reply")
            console.print("node-side breakdown (JobRunner.handle in this process, same store) …")
            breakdown = node_breakdown(grid, max(50, n // 2))
        r.close()
        client.close()
    return [bare, gq, bare_big, raw_cc, gq_big], breakdown, time.perf_counter() - t_start


def table(rows: list[Row]) -> Table:
    t = Table(title="gridq latency vs bare Celery (same Redis, same settings, sequential)")
    for col in ("measurement", "n", "p50 ms", "p99 ms", "vs baseline (p50)"):
        t.add_column(col, justify="left" if col == "measurement" else "right")
    for row in rows:
        t.add_row(row.what, str(len(row.samples)), f"{row.p50:.2f}", f"{row.p99:.2f}", row.ratio)
    return t


def markdown(rows: list[Row], breakdown: list[tuple[str, float]], seconds: float, args: argparse.Namespace) -> str:
    lines = ["| measurement | n | p50 ms | p99 ms | vs baseline (p50) | baseline |",
             "|---|---:|---:|---:|---:|---|"]
    for row in rows:
        base = row.baseline.what if row.baseline else "—"
        lines.append(f"| {row.what} | {len(row.samples)} | {row.p50:.2f} | {row.p99:.2f} | {row.ratio} | {base} |")
    lines += ["", "Node side, `JobRunner.handle` of the same `mean()` job in-process (no broker), p50 per phase:",
              "", "| phase | p50 ms |", "|---|---:|"]
    lines += [f"| {label.strip()} | {ms:.3f} |" for label, ms in breakdown]
    lines += ["", f"n={args.n} (after {args.warmup} warm-up), 10 MiB runs={args.big_runs} (after 2 warm-up); "
              f"total {seconds:.0f} s; Python {platform.python_version()}, torch {torch.__version__}, "
              f"{os.cpu_count()} CPUs"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ops.bench.latency", description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300, help="timed round trips for (a) and (b)")
    parser.add_argument("--warmup", type=int, default=30, help="unrecorded round trips before each of (a), (b)")
    parser.add_argument("--big-runs", type=int, default=10, help="timed 10 MiB transfers for each of (c)")
    args = parser.parse_args(argv)
    rows, breakdown, seconds = run(args.n, args.warmup, args.big_runs)
    out = Console()
    out.print(table(rows))
    bt = Table(title="node side: JobRunner.handle in-process (no broker), p50 per phase")
    bt.add_column("phase")
    bt.add_column("p50 ms", justify="right")
    for label, ms in breakdown:
        bt.add_row(label, f"{ms:.3f}")
    out.print(bt)
    ratio = rows[1].p50 / rows[0].p50
    out.print(f"gridq p50 / bare p50 = {ratio:.2f} (target ≤ 1.5: {'met' if ratio <= 1.5 else 'NOT met'}); "
              f"10 MiB gridq / bare = {rows[4].p50 / rows[2].p50:.2f}; total {seconds:.0f} s\n")
    print("## Results (markdown)\n")
    print(markdown(rows, breakdown, seconds, args))


if __name__ == "__main__":
    main()
