"""Latency of gridq against a bare Celery round trip on the same broker.

    python -m ops.bench.latency                     # ~30 s on 2 cores
    python -m ops.bench.latency --n 1000            # more samples
    python -m ops.bench.latency --torch-threads 1   # experiment: OMP_NUM_THREADS=1 everywhere

One run, one :class:`~ops.local.LocalGrid` in a temp dir (its own redis-server on a free
port, a gateway and the ``hospital`` node), plus a bare Celery worker
(:mod:`ops.bench.bare_worker`) on the same Redis, with the same Celery settings and pool
options as a gridq node. Measured, all sequential, one request in flight:

a. **bare round trip**: ``send_task("add", (1, 2)).get()`` through the bare worker.
b. **gridq job**: ``ptr.mean().get()`` on a 1M-element float32 dataset, as ``alice``: one
   signed job (client builds and validates the plan, signs an envelope; the node verifies
   it, records nonce and job, authorizes, validates, runs, seals the value for alice, signs
   the reply, records it; the client verifies and unseals).
c. **10 MiB download**: ``ptr.get()`` of a 10 MiB float32 dataset (sealed bytes travel by
   claim-check: Redis key in the reply) against the same 10 MiB as a Celery task
   argument to the bare worker (which answers its size).

Then, to see where the time goes: the client's steps during extra ``ptr.mean().get()``
calls, and the node's own ``JobRunner.handle`` run in this process on the same store (no
broker), by phase. This machine may be shared: the CPU used by processes outside this
benchmark during each measurement is printed with it (``other load``, in cores).
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


def _busy_ticks() -> int:
    """CPU ticks spent busy by the whole machine since boot (all cores)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    return sum(fields) - fields[3] - fields[4]  # less idle and iowait


def _own_ticks() -> int:
    """CPU ticks of this process and all its descendants (redis, gateway, workers, pools)."""
    parent: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                rest = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(entry)
        parent[pid] = int(rest[1])
        ticks[pid] = sum(int(v) for v in rest[11:15])  # utime stime cutime cstime
    mine, total = {os.getpid()}, 0
    for pid in sorted(parent):  # children have larger pids, mostly; iterate until stable
        pass
    changed = True
    while changed:
        changed = False
        for pid, ppid in parent.items():
            if ppid in mine and pid not in mine:
                mine.add(pid)
                changed = True
    for pid in mine:
        total += ticks.get(pid, 0)
    return total


class Load:
    """CPU used by processes outside this benchmark while a measurement ran, in cores."""

    def __enter__(self) -> Load:
        self.t0, self.busy0, self.own0 = time.perf_counter(), _busy_ticks(), _own_ticks()
        return self

    def __exit__(self, *exc: object) -> None:
        hz = os.sysconf("SC_CLK_TCK")
        seconds = time.perf_counter() - self.t0
        other = (_busy_ticks() - self.busy0) - (_own_ticks() - self.own0)
        self.cores = max(0.0, other / hz / seconds)


def timed(fn: Callable[[], Any], n: int, warmup: int) -> tuple[list[float], float]:
    """Milliseconds of ``n`` sequential calls after ``warmup`` unrecorded ones, and the
    other load on the machine meanwhile."""
    for _ in range(warmup):
        fn()
    out = []
    with Load() as load:
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1000)
    return out, load.cores


def p(samples: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(samples), q))


class Row:
    def __init__(self, what: str, measured: tuple[list[float], float], baseline: Row | None = None) -> None:
        self.what, (self.samples, self.other_load), self.baseline = what, measured, baseline
        self.p50, self.p99 = p(self.samples, 50), p(self.samples, 99)

    @property
    def ratio(self) -> str:
        return f"{self.p50 / self.baseline.p50:.2f}×" if self.baseline else "1 (baseline)"


@contextlib.contextmanager
def phases(*targets: tuple[Any, str, str]) -> Iterator[dict[str, list[float]]]:
    """Time every call of ``owner.attr`` (label) while the block runs; this process only."""
    found: dict[str, list[float]] = {label: [] for _, _, label in targets}
    saved: list[tuple[Any, str, Any, bool]] = []
    for owner, attr, label in targets:
        original = getattr(owner, attr)
        own = attr in vars(owner)

        def timed_call(*a: Any, _f: Any = original, _l: str = label, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return _f(*a, **k)
            finally:
                found[_l].append((time.perf_counter() - t0) * 1000)

        saved.append((owner, attr, vars(owner).get(attr), own))
        setattr(owner, attr, timed_call)
    try:
        yield found
    finally:
        for owner, attr, original, own in reversed(saved):
            if own:
                setattr(owner, attr, original)
            else:
                delattr(owner, attr)


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


# --- where the time goes ------------------------------------------------------------------------


def client_breakdown(grid: Any, ptr: Any, n: int) -> list[tuple[str, float]]:
    """The client's steps during ``n`` more ``ptr.mean().get()`` calls, p50 of each."""
    import celery.result

    import orchestrator.grid
    import orchestrator.pointer
    import orchestrator.ticket
    from protocol.identity import Identity

    total: list[float] = []
    with phases((orchestrator.pointer, "validate", "client: build plan + validate on meta tensors"),
                (orchestrator.grid, "seal_envelope", "client: sign job envelope"),
                (grid.app, "send_task", "client: send_task (publish to Redis)"),
                (celery.result.AsyncResult, "get", "client: wait for the reply (queue → node → backend)"),
                (grid, "_verify_reply", "client: verify reply envelope"),
                (Identity, "unseal", "client: unseal value"),
                (orchestrator.ticket, "decode_tensor", "client: decode tensor")) as found:
        for _ in range(n):
            t0 = time.perf_counter()
            ptr.mean().get()
            total.append((time.perf_counter() - t0) * 1000)
    return [(label, p(ms, 50)) for label, ms in found.items()] + [("client: ptr.mean().get() total", p(total, 50))]


def node_breakdown(grid: Any, n: int) -> list[tuple[str, float]]:
    """The node's ``JobRunner.handle`` in this process on the same store, p50 of each phase."""
    import workers.jobs as jobs

    node = Node(load_config(NODE_CONFIGS / "hospital.toml"))
    runner = node.runner()
    plan = next(ptr for ptr in grid.search(TAG)["hospital"] if ptr.name == SMALL).mean().plan
    body = RunJob(plan=plan, release=RawRelease()).model_dump(mode="json")

    def one() -> None:
        job_id = f"hospital:bench-{time.perf_counter_ns()}"
        env = seal_envelope(grid.identity, recipient="hospital", kind="run", job_id=job_id, body=body,
                            now=time.time())
        reply = runner.handle(env.model_dump(mode="json"), delivery_id=job_id)
        assert reply["kind"] == "job_reply", reply

    for _ in range(10):
        one()
    with phases((jobs, "open_envelope", "node: verify envelope (incl. nonce row)"),
                (runner.store, "remember", "node:   of which nonce INSERT + commit"),
                (runner.store, "begin_job", "node: job row INSERT + commit"),
                (runner.store, "dataset", "node: dataset lookup (SELECT; tensor cached)"),
                (jobs, "authorize", "node: authorize"),
                (jobs, "validate", "node: validate plan on meta tensors"),
                (jobs, "evaluate", "node: run plan (mean of 1M)"),
                (runner, "_seal", "node: seal value for requester"),
                (runner, "_sign", "node: sign reply envelope"),
                (runner.store, "finish_job", "node: job row UPDATE + commit (reply)"),
                (runner, "handle", "node: JobRunner.handle total")) as found:
        for _ in range(n):
            one()
    node.close()
    return [(label, p(ms, 50)) for label, ms in found.items()]


# --- main ---------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> tuple[list[Row], list[tuple[str, float]], float]:
    n, warmup, big_runs = args.n, args.warmup, args.big_runs
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

        def raw_claim_check() -> None:  # the floor of a claim-check: SET, then GET + DEL of the bytes
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
                     bare)
            console.print(f"(c) 10 MiB: bare task argument, raw claim-check, gridq .get() × {big_runs} each …")
            bare_big = Row("bare Celery: 10 MiB bytes as task argument", timed(bare_10mib, big_runs, 2))
            raw_cc = Row("raw Redis SET + GET/DEL of 10 MiB (claim-check floor)",
                         timed(raw_claim_check, big_runs, 2), bare_big)
            got = big.get()
            assert got.shape == (BIG_ELEMENTS,) and got.dtype == torch.float32
            gq_big = Row("gridq: ptr.get() of 10 MiB float32 (claim-check)", timed(big.get, big_runs, 2), bare_big)
            console.print("where the time goes: client steps, then the node's JobRunner.handle in-process …")
            breakdown = client_breakdown(grid, small, max(50, n // 3))
            breakdown += node_breakdown(grid, max(50, n // 3))
        r.close()
        client.close()
    return [bare, gq, bare_big, raw_cc, gq_big], breakdown, time.perf_counter() - t_start


def command(args: argparse.Namespace) -> str:
    return "python -m ops.bench.latency" + "".join(f" {a}" for a in sys.argv[1:])


def table(rows: list[Row]) -> Table:
    t = Table(title="gridq latency vs bare Celery (same Redis, same settings, sequential)")
    for col in ("measurement", "n", "p50 ms", "p99 ms", "vs baseline (p50)", "other load"):
        t.add_column(col, justify="left" if col == "measurement" else "right")
    for row in rows:
        t.add_row(row.what, str(len(row.samples)), f"{row.p50:.2f}", f"{row.p99:.2f}", row.ratio,
                  f"{row.other_load:.2f}")
    return t


def markdown(rows: list[Row], breakdown: list[tuple[str, float]], seconds: float, args: argparse.Namespace) -> str:
    lines = ["| measurement | n | p50 ms | p99 ms | vs baseline (p50) | baseline | other load (cores) |",
             "|---|---:|---:|---:|---:|---|---:|"]
    for row in rows:
        base = row.baseline.what if row.baseline else "—"
        lines.append(f"| {row.what} | {len(row.samples)} | {row.p50:.2f} | {row.p99:.2f} | {row.ratio} | {base} "
                     f"| {row.other_load:.2f} |")
    lines += ["", "Where the time goes (p50 of each step; the client's during extra `ptr.mean().get()` calls, "
              "the node's from `JobRunner.handle` run in-process on the same store, no broker):",
              "", "| step | p50 ms |", "|---|---:|"]
    lines += [f"| {label} | {ms:.3f} |" for label, ms in breakdown]
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    lines += ["", f"`{command(args)}`: n={args.n} (after {args.warmup} warm-up), 10 MiB runs={args.big_runs} "
              f"(after 2 warm-up); total {seconds:.0f} s; Python {platform.python_version()}, "
              f"torch {torch.__version__}, {os.cpu_count()} CPUs, OMP_NUM_THREADS={threads}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ops.bench.latency", description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300, help="timed round trips for (a) and (b)")
    parser.add_argument("--warmup", type=int, default=30, help="unrecorded round trips before each of (a), (b)")
    parser.add_argument("--big-runs", type=int, default=10, help="timed 10 MiB transfers for each of (c)")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="experiment: set OMP_NUM_THREADS for every process of the grid and torch's "
                             "threads here (default: leave torch's default, as gridq does)")
    args = parser.parse_args(argv)
    if args.torch_threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(args.torch_threads)  # inherited through LocalGrid.env()
        torch.set_num_threads(args.torch_threads)
    rows, breakdown, seconds = run(args)
    out = Console()
    out.print(table(rows))
    bt = Table(title="where the time goes (p50 per step)")
    bt.add_column("step")
    bt.add_column("p50 ms", justify="right")
    for label, ms in breakdown:
        bt.add_row(label, f"{ms:.3f}")
    out.print(bt)
    ratio = rows[1].p50 / rows[0].p50
    out.print(f"gridq p50 / bare p50 = {ratio:.2f} (target ≤ 1.5: {'met' if ratio <= 1.5 else 'NOT met'}); "
              f"10 MiB gridq / bare = {rows[4].p50 / rows[2].p50:.2f}; total {seconds:.0f} s")
    busiest = max(row.other_load for row in rows)
    if busiest > 0.2:
        out.print(f"[yellow]note: other processes used up to {busiest:.2f} cores during the measurements; "
                  "figures are inflated and noisy[/]")
    out.print()
    print("## Results (markdown)\n")
    print(markdown(rows, breakdown, seconds, args))


if __name__ == "__main__":
    main()
