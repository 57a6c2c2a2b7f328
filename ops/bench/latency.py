"""Latency of gridq against a bare Celery round trip on the same broker.

    python -m ops.bench.latency                     # ~30 s on 2 cores (+ up to 60 s waiting for a quiet CPU)
    python -m ops.bench.latency --n 1000            # more samples

One run, one :class:`~ops.local.LocalGrid` in a temp dir (its own redis-server on a free
port, a gateway and the ``hospital`` node), plus a bare Celery worker
(:mod:`ops.bench.bare_worker`) on the same Redis, with the same Celery settings and pool
options as a gridq node. Measured, all sequential, one request in flight:

a. **bare round trip**: ``send_task("add", (1, 2)).get()`` through the bare worker.
b. **gridq job**: ``ptr.mean().get()`` on a 1M-element float32 dataset, as ``alice``: one
   signed job (the client builds and validates the plan and signs an envelope; the node
   verifies it, records nonce and job, authorizes, validates, runs, seals the value for
   alice, signs the reply and records it; the client verifies and unseals).
c. **10 MiB download**: ``ptr.get()`` of a 10 MiB float32 dataset (the sealed bytes travel by
   claim-check: a Redis key in the reply) against the same 10 MiB as a Celery task argument
   to the bare worker (which answers its size), and against a raw Redis SET + GET.

Then, to see where the time goes: Celery's own run time of each task in the workers (from
their logs), the client's steps during more ``ptr.mean().get()`` calls, and the node's
``JobRunner.answer`` run in this process on the same store (no broker), by phase. The
machine may be shared: the CPU other processes used during each measurement is printed
beside it (``other load``, in cores).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from ops.bench.bare_worker import ADD, ECHO_SIZE, QUEUE
from ops.bench.measure import Row, WorkerLog, p, phases, timed, wait_quiet
from ops.demo import prepare
from ops.local import NODE_CONFIGS, LocalGrid
from orchestrator.app import make_celery
from orchestrator.grid import Grid
from orchestrator.pointer import DataPointer
from orchestrator.transport import redis_client
from protocol.contract import Tasks
from protocol.envelope import seal_envelope
from protocol.messages import RawRelease, RunJob
from workers.config import load_config
from workers.node import Node

SMALL = "bench-1m"  # 1M float32 (4 MiB at the node; the job's answer is one scalar)
BIG = "bench-10mib"  # 10 MiB float32: 2,621,440 elements
BIG_ELEMENTS = 10 * 1024 * 1024 // 4
TAG = "#bench"
console = Console(stderr=True)
Breakdown = list[tuple[str, float]]


def start(lg: LocalGrid, home: Path) -> None:
    """Redis, the bench datasets in the hospital's store, the bare worker, the gateway and the node."""
    prepare(home)  # keys of every demo participant + demo data
    url = lg.start_redis()
    os.environ.update(GRIDQ_HOME=str(home), GRIDQ_BROKER=url)  # as LocalGrid.env(): load_config expands them
    lg.enrol("hospital")  # its broker URL file, and the gateway's admission
    # Published before the node starts: the data goes into the node's store, and the node's
    # registration at start-up carries the metadata of every stored dataset to the gateway.
    gen = torch.Generator().manual_seed(0)
    node = Node(load_config(NODE_CONFIGS / "hospital.toml"))
    for name, size in ((SMALL, 1_000_000), (BIG, BIG_ELEMENTS)):
        node.publish(name, torch.rand(size, generator=gen), description=f"{size} float32 for the benchmark",
                     tags=[TAG], allowed_users=["alice"], notify=False)
    node.close()
    lg._spawn("bare", [sys.executable, "-m", "celery", "-A", "ops.bench.bare_worker", "worker", "--queues", QUEUE,
                       "--hostname", "bare@%h", "--loglevel", "INFO",
                       # the pool options of a gridq node (workers/worker.py)
                       "--pool", "prefork", "--concurrency", "1", "--without-mingle", "--without-gossip",
                       "--task-events"])
    lg.start([NODE_CONFIGS / "hospital.toml"])


# --- where the time goes ------------------------------------------------------------------------


def client_breakdown(grid: Grid, ptr: DataPointer, n: int) -> Breakdown:
    """The client's steps during ``n`` more ``ptr.mean().get()`` calls, p50 of each."""
    import celery.result

    import orchestrator.plans
    import orchestrator.pointer
    import orchestrator.transport
    from protocol.identity import Identity

    total: list[float] = []
    with phases((orchestrator.plans, "run_step", "client: build plan + check each step on meta tensors"),
                (orchestrator.transport, "seal_envelope", "client: sign job envelope"),
                (grid.app, "send_task", "client: send_task (publish to Redis)"),
                (celery.result.AsyncResult, "get", "client: wait for the reply (queue → node → backend)"),
                (grid.transport, "verify", "client: verify reply envelope"),
                (Identity, "unseal", "client: unseal value"),
                (orchestrator.pointer, "decode_tensor", "client: decode tensor")) as found:
        for _ in range(n):
            t0 = time.perf_counter()
            ptr.mean().get()
            total.append((time.perf_counter() - t0) * 1000)
    return [(label, p(ms, 50)) for label, ms in found.items()] + [("client: ptr.mean().get() total", p(total, 50))]


def node_breakdown(grid: Grid, ptr: DataPointer, n: int) -> Breakdown:
    """The node's ``JobRunner.answer`` in this process on the same store, p50 of each phase."""
    import protocol.serving as serving
    import workers.jobs.compute as compute
    import workers.jobs.context as context

    node = Node(load_config(NODE_CONFIGS / "hospital.toml"))
    runner = node.runner()
    body = RunJob(plan=ptr.mean().plan, release=RawRelease()).model_dump(mode="json")

    def one() -> None:
        job_id = f"hospital:bench-{time.perf_counter_ns()}"
        env = seal_envelope(grid.identity, recipient="hospital", kind="run", job_id=job_id, body=body, now=time.time())
        reply = runner.answer(Tasks.RUN_JOB, env.model_dump(mode="json"), job_id).signed
        assert reply["kind"] == "job_reply", reply

    for _ in range(10):
        one()
    with phases((serving, "open_envelope", "node: verify envelope (incl. nonce row)"),
                (runner.store, "remember", "node:   of which nonce INSERT + commit"),
                (runner.store, "begin_job", "node: job row SELECT + INSERT + commit"),
                (runner.store, "job_input", "node: dataset row + who may see it, one SELECT each (tensor cached)"),
                (context, "authorize", "node: authorize"),
                (context, "validate", "node: validate plan on meta tensors"),
                (compute, "evaluate", "node: run plan (mean of 1M)"),
                (runner.node, "seal", "node: seal value for requester"),
                (runner.server, "sign", "node: sign reply envelope"),
                (runner.store, "finish_job", "node: job row UPDATE + commit (reply)"),
                (runner, "answer", "node: JobRunner.answer total (in-process)")) as found:
        for _ in range(n):
            one()
    node.close()
    return [(label, p(ms, 50)) for label, ms in found.items()]


# --- the run ------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> tuple[list[Row], Breakdown, float]:
    n, warmup, big_runs = args.n, args.warmup, args.big_runs
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gridq-bench-") as tmp, LocalGrid(Path(tmp)) as lg:
        console.print("starting redis, the bare worker, the gateway and the hospital node …")
        start(lg, Path(tmp))
        client = make_celery(lg.url, "gridq-bench-client")  # the client settings of orchestrator.Grid
        client.send_task(ADD, args=[1, 2], queue=QUEUE).get(timeout=60)  # the bare worker is up
        payload = os.urandom(BIG_ELEMENTS * 4)
        r = redis_client(lg.url)

        def bare_add() -> None:
            assert client.send_task(ADD, args=[1, 2], queue=QUEUE).get(timeout=30, interval=0.05) == 3

        def bare_10mib() -> None:
            size = client.send_task(ECHO_SIZE, args=[payload], queue=QUEUE).get(timeout=60, interval=0.05)
            assert size == len(payload)

        def raw_claim_check() -> None:  # the floor of a claim-check: SET, then GET + DEL of the bytes
            r.set("bench:blob", payload, ex=60)
            pipe = r.pipeline()
            pipe.get("bench:blob")
            pipe.delete("bench:blob")
            assert len(pipe.execute()[0]) == len(payload)

        console.print(f"(a) bare Celery round trip × {n} …")
        with WorkerLog(lg.logs / "bare.log", ADD) as bare_log:
            bare = Row("bare Celery round trip: send_task(add).get()", timed(bare_add, n, warmup))
        with lg.connect("alice") as grid:
            ptrs = {ptr.name: ptr for ptr in grid.search(TAG)["hospital"]}
            small, big = ptrs[SMALL], ptrs[BIG]
            console.print(f"(b) gridq ptr.mean().get() on 1M float32 × {n} …")
            with WorkerLog(lg.logs / "hospital.log", Tasks.RUN_JOB) as node_log:
                gq = Row("gridq job: ptr.mean().get() on 1M float32", timed(lambda: small.mean().get(), n, warmup),
                         bare)
            console.print(f"(c) 10 MiB: bare task argument, raw claim-check, gridq .get() × {big_runs} each …")
            bare_big = Row("bare Celery: 10 MiB bytes as task argument", timed(bare_10mib, big_runs, 2))
            raw_cc = Row("raw Redis SET + GET/DEL of 10 MiB (claim-check floor)", timed(raw_claim_check, big_runs, 2),
                         bare_big)
            got = big.get()
            assert got.shape == (BIG_ELEMENTS,) and got.dtype == torch.float32
            gq_big = Row("gridq: ptr.get() of 10 MiB float32 (claim-check)", timed(big.get, big_runs, 2), bare_big)
            console.print("where the time goes: the workers' logs, the client's steps, the node's phases …")
            breakdown = [("bare worker: add, Celery's run time in the worker", p(bare_log.ms, 50)),
                         ("node worker: run_job, Celery's run time in the worker", p(node_log.ms, 50))]
            breakdown += client_breakdown(grid, small, max(50, n // 3))
            breakdown += node_breakdown(grid, small, max(50, n // 3))
        r.close()
        client.close()
    return [bare, gq, bare_big, raw_cc, gq_big], breakdown, time.perf_counter() - t_start


# --- the report ---------------------------------------------------------------------------------


def table(rows: list[Row], breakdown: Breakdown) -> tuple[Table, Table]:
    t = Table(title="gridq latency vs bare Celery (same Redis, same settings, sequential)")
    for col in ("measurement", "n", "p50 ms", "p99 ms", "vs baseline (p50)", "other load"):
        t.add_column(col, justify="left" if col == "measurement" else "right")
    for row in rows:
        t.add_row(row.what, str(len(row.samples)), f"{row.p50:.2f}", f"{row.p99:.2f}", row.ratio,
                  f"{row.other_load:.2f}")
    b = Table(title="where the time goes (p50 of each step)")
    b.add_column("step")
    b.add_column("p50 ms", justify="right")
    for label, ms in breakdown:
        b.add_row(label, f"{ms:.3f}")
    return t, b


def markdown(rows: list[Row], breakdown: Breakdown, seconds: float, args: argparse.Namespace) -> str:
    lines = ["| measurement | n | p50 ms | p99 ms | vs baseline (p50) | baseline | other load (cores) |",
             "|---|---:|---:|---:|---:|---|---:|"]
    lines += [f"| {row.what} | {len(row.samples)} | {row.p50:.2f} | {row.p99:.2f} | {row.ratio} | "
              f"{row.baseline.what if row.baseline else '—'} | {row.other_load:.2f} |" for row in rows]
    lines += ["", "Where the time goes (p50 of each step):", "", "| step | p50 ms |", "|---|---:|"]
    lines += [f"| {label} | {ms:.3f} |" for label, ms in breakdown]
    lines += ["", f"`{' '.join(['python -m ops.bench.latency', *args.argv])}`: n={args.n} (after {args.warmup} "
              f"warm-up), 10 MiB runs={args.big_runs} (after 2 warm-up); total {seconds:.0f} s; Python "
              f"{platform.python_version()}, torch {torch.__version__}, {os.cpu_count()} CPUs, "
              f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ops.bench.latency", description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300, help="timed round trips for (a) and (b)")
    parser.add_argument("--warmup", type=int, default=30, help="unrecorded round trips before each of (a), (b)")
    parser.add_argument("--big-runs", type=int, default=10, help="timed 10 MiB transfers for each of (c)")
    parser.add_argument("--wait-quiet", type=float, default=60.0, metavar="SECONDS",
                        help="first wait up to this long for other processes to leave the CPU idle (0: don't)")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.wait_quiet > 0:
        wait_quiet(args.wait_quiet, console.print)
    rows, breakdown, seconds = run(args)
    out = Console()
    for t in table(rows, breakdown):
        out.print(t)
    ratio = rows[1].p50 / rows[0].p50
    out.print(f"gridq p50 / bare p50 = {ratio:.2f} (target ≤ 1.5: {'met' if ratio <= 1.5 else 'NOT met'}); "
              f"10 MiB gridq / bare = {rows[4].p50 / rows[2].p50:.2f}; total {seconds:.0f} s")
    busiest = max(row.other_load for row in rows)
    if busiest > 0.2:
        out.print(f"[yellow]note: other processes used up to {busiest:.2f} cores during the measurements: "
                  "these figures are inflated and noisy[/]")
    print("\n## Results (markdown)\n")
    print(markdown(rows, breakdown, seconds, args))


if __name__ == "__main__":
    main()
