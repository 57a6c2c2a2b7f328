"""Sustained use: does a node stay as fast, and as small, at the end of a long run as at its start?

    python -m ops.bench.soak                # 10 min of load (+ ~30 s to start, up to 60 s waiting for a quiet CPU)
    python -m ops.bench.soak --minutes 3    # a shorter smoke run
    python -m ops.bench.soak --window 30    # figures every 30 s instead of every minute

One :class:`~ops.local.LocalGrid` in a temp dir (its own redis-server on a free port, the
gateway) and one node, ``soak`` (two worker processes, the default), with three datasets:
``soak-open`` (1,000 × 2 float32, bounded; both clients are allowed users), ``soak-closed``
(the same, allowed to no one) and ``soak-big`` (100,000 float32: a raw release of it is
~400 KB sealed, above the claim-check threshold). Two client processes (``alice`` and
``bob``, each its own ``Grid``) send one job after another for ``--minutes``, cycling through:

* **raw** — ``open["a"].mean().get()``: an allowed user's exact value;
* **refused** — ``closed["a"].mean().get()``: ``PermissionDenied``, answered by the node;
* **dp** — ``open["a"].mean().get(epsilon=0.001)``: a Laplace release, charged to the ledger
  (``[budget] default_epsilon`` is large enough never to run out);
* **claim-check** — ``big.get()``: the sealed value travels by claim-check.

The node's ``[retention]`` is shortened so that everything a job leaves behind reaches its
steady state within the run: answers live ``--results`` seconds in Redis (and a signed reply
as long; a client forgets its nonce then, and marks a job sent as long), reply bodies
``--replies`` seconds in node.db.
(The node's own nonce rows live as long as the jobs' envelopes, 600 s: node.db grows for
the first ten minutes of any run, then stays.)

Per window (``--window`` seconds, by completion time): jobs done, jobs/s, p50 and p99 over
all jobs, the DP jobs' p50, the resident memory of the node's worker (its processes summed)
and of each client, node.db's size (with its WAL), Redis ``used_memory``, and the CPU other
processes used meanwhile (``other load``, cores: compare runs only when it is near 0). At
the end, each window as a ratio to the second (the first includes warming up), and whether
throughput, p50, p99 and the memory figures stay within ±10% of it.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import re
import sqlite3
import sys
import tempfile
import time
from dataclasses import dataclass, field
from multiprocessing.synchronize import Event
from pathlib import Path

import numpy as np
import redis
from rich.console import Console
from rich.table import Table

from ops.bench.measure import Load, p, rss_bytes, tree_pids, wait_quiet
from ops.local import LocalGrid
from orchestrator.transport import redis_client

console = Console(stderr=True, width=160)  # the tables are wide: not wrapped in a log
KINDS = ("raw", "refused", "dp", "claim-check")
CLIENTS = ("alice", "bob")
TOLERANCE = 0.10

CONFIG = """
[node]
id = "soak"
broker = "${{GRIDQ_BROKER}}"
store = "${{GRIDQ_HOME}}/soak"
identity = "${{GRIDQ_HOME}}/keys/soak.key"

[users.alice]
public_key_file = "${{GRIDQ_HOME}}/keys/alice.pub"
[users.bob]
public_key_file = "${{GRIDQ_HOME}}/keys/bob.pub"

[budget]
default_epsilon = 1e12

[retention]
results = {results}
replies = {replies}
prune_every = 10

[[datasets]]
name = "soak-open"
path = "${{GRIDQ_HOME}}/data/soak-table.npy"
columns = ["a", "b"]
tags = ["#soak"]
allowed_users = ["alice", "bob"]
bounds = [0.0, 1.0]

[[datasets]]
name = "soak-closed"
path = "${{GRIDQ_HOME}}/data/soak-table.npy"
columns = ["a", "b"]
tags = ["#soak"]
allowed_users = []
bounds = [0.0, 1.0]

[[datasets]]
name = "soak-big"
path = "${{GRIDQ_HOME}}/data/soak-big.npy"
tags = ["#soak"]
allowed_users = ["alice", "bob"]
"""


# --- a client process ------------------------------------------------------------------------


def client(url: str, key: str, gateway: str, results: float, log: str, ready: Event, go: Event, stop: Event) -> None:
    """One data scientist: jobs one after another, cycling through KINDS, until ``stop``; each
    job's completion time, kind and milliseconds appended to ``log`` (a line each). The client
    marks each job sent for as long as the node keeps answers (``results``)."""
    from ops.keys import read_identity
    from orchestrator import Grid
    from protocol.errors import PermissionDenied

    with Grid.connect(url, read_identity(Path(key)), timeout=60, gateway_key=gateway) as grid, \
            open(log, "w", buffering=1 << 16) as out:
        grid.transport.app.conf.result_expires = int(results)  # the TTL of its "sent" marks (transport.send)
        found = {ptr.name: ptr for ptr in grid.search("#soak")["soak"]}
        opened, closed, big = found["soak-open"], found["soak-closed"], found["soak-big"]

        def refused() -> None:
            try:
                closed["a"].mean().get()
            except PermissionDenied:
                return
            raise AssertionError("a raw release of soak-closed was not refused")

        jobs = {"raw": lambda: opened["a"].mean().get(), "refused": refused,
                "dp": lambda: opened["a"].mean().get(epsilon=0.001), "claim-check": lambda: big.get()}
        for kind in KINDS:  # warm: each path once before the clock starts
            jobs[kind]()
        ready.set()
        go.wait()
        i = 0
        while not stop.is_set():
            kind = KINDS[i % len(KINDS)]
            t0 = time.perf_counter()
            jobs[kind]()
            out.write(f"{time.time():.4f},{kind},{(time.perf_counter() - t0) * 1000:.3f}\n")
            i += 1


# --- the run -----------------------------------------------------------------------------------


@dataclass
class Window:
    index: int
    seconds: float
    other_load: float = 0.0
    node_rss: int = 0
    client_rss: list[int] = field(default_factory=list)
    node_db: int = 0
    redis_used: int = 0
    ms: list[float] = field(default_factory=list)
    dp_ms: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return len(self.ms) / self.seconds

    def figures(self) -> dict[str, float]:
        """What must stay flat, by name."""
        return {"jobs/s": self.rate, "p50": p(self.ms, 50), "p99": p(self.ms, 99), "node RSS": self.node_rss,
                "client RSS": max(self.client_rss or [0]), "Redis": self.redis_used}


def write_grid(home: Path, results: float, replies: float) -> Path:
    data = home / "data"
    data.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    np.save(data / "soak-table.npy", rng.uniform(0, 1, (1000, 2)).astype(np.float32))
    np.save(data / "soak-big.npy", rng.uniform(0, 1, 100_000).astype(np.float32))
    config = home / "soak.toml"
    config.write_text(CONFIG.format(results=results, replies=replies))
    return config


def db_size(home: Path) -> int:
    return sum(f.stat().st_size for f in (home / "soak").glob("node.db*"))


def run(args: argparse.Namespace) -> tuple[list[Window], dict[str, int], dict[str, tuple[int, int]]]:
    seconds = args.minutes * 60
    count = max(2, round(seconds / args.window))
    with tempfile.TemporaryDirectory(prefix="gridq-soak-") as tmp, LocalGrid(Path(tmp)) as lg:
        home = Path(tmp)
        lg.ensure_keys("gateway", "soak", *CLIENTS)
        config = write_grid(home, args.results, args.replies)
        console.print("starting redis, the gateway and the soak node …")
        lg.start_redis()
        lg.start_gateway()
        lg.start_node(config)
        lg.wait_ready(["soak"])
        ctx = multiprocessing.get_context("spawn")
        go, stop = ctx.Event(), ctx.Event()
        readies, procs, logs = [], [], []
        for user in CLIENTS:
            ready = ctx.Event()
            log = home / f"client-{user}.log"
            proc = ctx.Process(target=client, args=(lg.url, str(lg.keys / f"{user}.key"), lg.gateway_key(),
                                                    args.results, str(log), ready, go, stop), name=f"soak-{user}")
            proc.start()
            readies.append(ready)
            procs.append(proc)
            logs.append(log)
        for ready, proc in zip(readies, procs, strict=True):
            while not ready.wait(1.0):
                if not proc.is_alive():
                    raise SystemExit(f"client {proc.name} exited (code {proc.exitcode}) before it was ready")
        if args.wait_quiet:
            wait_quiet(args.wait_quiet, console.print, threshold=0.3)
        node_pid = lg.procs["soak"].pid
        windows: list[Window] = []
        broker = redis_client(lg.url)
        console.print(f"{len(CLIENTS)} clients, {count} windows of {args.window:g} s …")
        start = time.time()
        go.set()
        try:
            for i in range(count):
                with Load() as load:
                    time.sleep(max(0.0, start + (i + 1) * args.window - time.time()))
                dead = [proc.name for proc in procs if not proc.is_alive()]
                if dead:
                    raise SystemExit(f"client(s) {dead} died; their logs are in {home}")
                window = Window(i + 1, args.window, load.cores, rss_bytes(tree_pids(node_pid)),
                                [rss_bytes([proc.pid or 0]) for proc in procs], db_size(home),
                                int(broker.info("memory")["used_memory"]))
                windows.append(window)
                console.print(f"  window {i + 1}/{count}: node RSS {window.node_rss / 2**20:.0f} MiB, "
                              f"node.db {window.node_db / 2**20:.1f} MiB, Redis {window.redis_used / 2**20:.1f} MiB "
                              f"({broker.dbsize():,} keys, {broker.info('stats')['pubsub_channels']:,} channels), "
                              f"other load {window.other_load:.2f}")
            census = key_census(broker)
        finally:
            stop.set()
            for proc in procs:
                proc.join(timeout=60)
                if proc.is_alive():
                    proc.kill()
            broker.close()
        for log in logs:
            for line in log.read_text().splitlines():
                at, kind, ms = line.split(",")
                index = int((float(at) - start) // args.window)
                if 0 <= index < count:
                    windows[index].ms.append(float(ms))
                    if kind == "dp":
                        windows[index].dp_ms.append(float(ms))
        return windows, node_rows(home), census


def key_census(broker: redis.Redis) -> dict[str, tuple[int, int]]:
    """Redis keys by kind (the key less its id), each with how many have no TTL."""
    found: dict[str, list[int]] = {}
    for key in broker.scan_iter(count=1000):
        text = key.decode(errors="replace")
        kind = re.sub(r"[0-9a-f]{32}|[0-9a-f]{8}-[0-9a-f-]{27}", "<id>", text)
        counts = found.setdefault(kind, [0, 0])
        counts[0] += 1
        counts[1] += broker.ttl(key) == -1
    return {kind: (n, forever) for kind, (n, forever) in sorted(found.items(), key=lambda kv: -kv[1][0])}


def node_rows(home: Path) -> dict[str, int]:
    """What node.db holds at the end: jobs (with a reply kept, of all), charges, nonces."""
    with sqlite3.connect(f"file:{home / 'soak' / 'node.db'}?mode=ro", uri=True) as db:
        one = lambda sql: int(db.execute(sql).fetchone()[0])  # noqa: E731
        return {"jobs": one("SELECT count(*) FROM jobs"),
                "jobs with their reply": one("SELECT count(*) FROM jobs WHERE reply IS NOT NULL"),
                "charges": one("SELECT count(*) FROM charges"),
                "charge totals": one("SELECT count(*) FROM charge_totals"),
                "nonces": one("SELECT count(*) FROM nonces")}


# --- the report ------------------------------------------------------------------------------


def mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def report(windows: list[Window], rows: dict[str, int], census: dict[str, tuple[int, int]], args: argparse.Namespace,
           seconds: float) -> bool:
    table = Table(title=f"soak: {len(CLIENTS)} clients, jobs cycling {' / '.join(KINDS)}, windows of "
                        f"{args.window:g} s (retention: results {args.results:g} s, replies {args.replies:g} s)")
    for column in ("window", "jobs", "jobs/s", "p50 ms", "p99 ms", "DP p50 ms", "node RSS MiB",
                   "client RSS MiB", "node.db MiB", "Redis MiB", "other load"):
        table.add_column(column, justify="right")
    for w in windows:
        table.add_row(str(w.index), f"{len(w.ms):,}", f"{w.rate:.1f}", f"{p(w.ms, 50):.2f}", f"{p(w.ms, 99):.2f}",
                      f"{p(w.dp_ms, 50):.2f}", mib(w.node_rss), " / ".join(mib(r) for r in w.client_rss),
                      mib(w.node_db), mib(w.redis_used), f"{w.other_load:.2f}")
    console.print(table)
    base = windows[1].figures()
    ratios = Table(title="each window against the second (flat: within ±10%)")
    ratios.add_column("window", justify="right")
    for name in base:
        ratios.add_column(name, justify="right")
    flat = {name: True for name in base}
    for w in windows:
        cells = []
        for name, value in w.figures().items():
            ratio = value / base[name] if base[name] else float("nan")
            within = abs(ratio - 1) <= TOLERANCE
            if w.index >= 2:
                flat[name] = flat[name] and within
            cells.append(f"{ratio:.3f}" + ("" if within or w.index < 2 else " ✗"))
        ratios.add_row(str(w.index), *cells)
    console.print(ratios)
    verdict = all(flat.values())
    console.print("flat (windows 2–{}, ±10% of window 2): {}".format(
        len(windows), ", ".join(f"{name} {'yes' if ok else 'NO'}" for name, ok in flat.items())))
    console.print("node.db at the end: " + ", ".join(f"{k} {v:,}" for k, v in rows.items()))
    console.print("Redis keys at the end (without a TTL): " + ", ".join(
        f"{kind} {n:,} ({forever:,})" for kind, (n, forever) in list(census.items())[:8]))
    console.print(f"`python -m ops.bench.soak --minutes {args.minutes:g} --window {args.window:g}`: "
                  f"{sum(len(w.ms) for w in windows):,} jobs; total {seconds:.0f} s; "
                  f"Python {platform.python_version()}, {os.cpu_count()} CPUs; "
                  f"load average at the end {os.getloadavg()[0]:.2f}")
    return verdict


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="how long the load runs (default 10)")
    parser.add_argument("--window", type=float, default=60.0, help="seconds per window of figures (default 60)")
    parser.add_argument("--results", type=float, default=60.0,
                        help="the node's [retention] results: seconds an answer lives in Redis (default 60)")
    parser.add_argument("--replies", type=float, default=60.0,
                        help="the node's [retention] replies: seconds a reply body stays in node.db (default 60)")
    parser.add_argument("--wait-quiet", type=float, default=60.0,
                        help="wait up to this many seconds for a quiet CPU before the clock starts (0: don't)")
    args = parser.parse_args(argv)
    if args.minutes * 60 < 2 * args.window:
        parser.error("the run needs at least two windows: the second is what the others are compared with")
    t0 = time.monotonic()
    windows, rows, census = run(args)
    return 0 if report(windows, rows, census, args, time.monotonic() - t0) else 1


if __name__ == "__main__":
    sys.exit(main())
