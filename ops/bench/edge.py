"""A job through the HTTP edge against the same job through the Python client, in one run.

    python -m ops.bench.edge               # ~1 min on 2 cores (+ up to 60 s waiting for a quiet CPU)
    python -m ops.bench.edge --n 500

One :class:`~ops.local.LocalGrid` in a temp dir, with broker ACLs (every process its own
user: the edge logs in as ``edge``, the client as ``scientist``): Redis, the gateway, the
``hospital`` node with a 1M-element float32 dataset allowed to ``alice``, and the edge
(``gridq edge``). Sequential, one request in flight, the two kinds interleaved (so both meet
the same machine):

* **Python client**: ``ptr.mean().get()`` — build and check the plan, sign, send by Celery,
  wait for the reply (pub/sub), verify it, unseal and decode the value.
* **edge round trip**: the same plan signed the same way (``ops.edge.client.signed_job``),
  ``POST /v1/jobs``, then ``GET /v1/jobs/{id}?wait=30`` (a long-poll), then the reply verified,
  unsealed and decoded by the same client code (``JobTicket``): what a client in another
  language does, here over one keep-alive HTTP connection (``http.client``).

Also shown: the two HTTP calls' own times, and ``GET /healthz`` (the floor of an HTTP
request to the edge).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console

from ops.bench.measure import Load, p, phases, wait_quiet
from ops.demo import prepare
from ops.edge.client import EdgeClient, signed_job
from ops.keys import read_identity
from ops.local import NODE_CONFIGS, LocalGrid
from orchestrator.ticket import JobTicket
from protocol.messages import RawRelease, RunJob
from workers.config import load_config
from workers.node import Node

DATASET = "bench-1m"  # 1M float32, as ops.bench.latency's (b)
TAG = "#bench"
console = Console(stderr=True)


def start(lg: LocalGrid, home: Path) -> str:
    """Redis (with ACLs), the dataset in the hospital's store, the gateway, the node, the edge."""
    prepare(home)
    lg.start_redis()
    os.environ.update(GRIDQ_HOME=str(home))
    lg.enrol("hospital")  # its broker user, and the gateway's admission
    node = Node(load_config(NODE_CONFIGS / "hospital.toml"))
    node.publish(DATASET, torch.rand(1_000_000, generator=torch.Generator().manual_seed(0)),
                 description="1M float32 for the benchmark", tags=[TAG], allowed_users=["alice"], notify=False)
    node.close()
    lg.start([NODE_CONFIGS / "hospital.toml"])
    return lg.start_edge()


def interleaved(a: Callable[[], None], b: Callable[[], None], n: int, warmup: int
                ) -> tuple[list[float], list[float], float]:
    """Milliseconds of ``n`` calls of each, alternating which goes first, after ``warmup`` of
    each; and the load of other processes meanwhile (cores)."""
    for _ in range(warmup):
        a()
        b()
    times: tuple[list[float], list[float]] = ([], [])
    with Load() as load:
        for i in range(n):
            for k in ((0, 1) if i % 2 == 0 else (1, 0)):
                fn = (a, b)[k]
                t0 = time.perf_counter()
                fn()
                times[k].append((time.perf_counter() - t0) * 1000)
    return times[0], times[1], load.cores


def run(args: argparse.Namespace) -> dict[str, object]:
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gridq-bench-edge-") as tmp, LocalGrid(Path(tmp), acl=True) as lg:
        console.print("starting redis (ACLs), the gateway, the hospital node and the edge …")
        url = start(lg, Path(tmp))
        alice = read_identity(lg.keys / "alice.key")
        with lg.connect("alice") as grid, EdgeClient(url) as edge:
            ptr = grid.search(TAG)["hospital"][0]
            expected = ptr.mean().get()

            def python_client() -> None:
                ptr.mean().get()

            def through_edge() -> None:
                job_id = edge.submit(signed_job(alice, "hospital", RunJob(plan=ptr.mean().plan, release=RawRelease())))
                state, reply = edge.reply(job_id, wait=30)
                value = JobTicket.finished(grid, job_id, state, reply).value()
                assert torch.equal(value, expected)

            console.print(f"{args.n} round trips of each, interleaved, after {args.warmup} warm-up …")
            with phases((EdgeClient, "submit", "POST /v1/jobs"), (EdgeClient, "reply", "GET /v1/jobs/{id}?wait=30")
                        ) as steps:
                py, via, other = interleaved(python_client, through_edge, args.n, args.warmup)
            floor = []
            for _ in range(args.n):
                t0 = time.perf_counter()
                assert edge.call("GET", "/healthz")[0] == 200
                floor.append((time.perf_counter() - t0) * 1000)
    return {"python": py, "edge": via, "other": other, "steps": steps, "floor": floor,
            "seconds": time.perf_counter() - t_start}


def report(found: dict[str, object], args: argparse.Namespace) -> str:
    py, via = found["python"], found["edge"]
    steps, floor = found["steps"], found["floor"]
    assert isinstance(py, list) and isinstance(via, list) and isinstance(steps, dict) and isinstance(floor, list)
    ratio = p(via, 50) / p(py, 50)
    rows = [("Python client: ptr.mean().get()", py), ("edge round trip: POST /v1/jobs + GET ?wait=30, verify, unseal",
                                                     via)]
    rows += [(f"  of which {label}", steps[label][-len(via):]) for label in steps]
    rows += [("GET /healthz (an HTTP request's floor)", floor)]
    lines = ["| measurement | n | p50 ms | p95 ms | vs Python client (p50) |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {what} | {len(s)} | {p(s, 50):.2f} | {p(s, 95):.2f} | "
              f"{p(s, 50) / p(py, 50):.2f}× |" for what, s in rows]
    verdict = "met" if ratio <= 1.3 else "NOT met"
    lines += ["", f"edge p50 / Python client p50 = **{ratio:.2f}** (aim ≤ 1.3: {verdict}); "
                  f"p95 ratio {p(via, 95) / p(py, 95):.2f}; other load {found['other']:.2f} cores",
              "", f"`{' '.join(['python -m ops.bench.edge', *args.argv])}`: n={args.n} each (after {args.warmup} "
                  f"warm-up), interleaved; total {found['seconds']:.0f} s; Python {platform.python_version()}, "
                  f"torch {torch.__version__}, {os.cpu_count()} CPUs"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ops.bench.edge", description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="timed round trips of each kind")
    parser.add_argument("--warmup", type=int, default=20, help="unrecorded round trips of each kind first")
    parser.add_argument("--wait-quiet", type=float, default=60.0, metavar="SECONDS",
                        help="first wait up to this long for other processes to leave the CPU idle (0: don't)")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.wait_quiet > 0:
        wait_quiet(args.wait_quiet, console.print)
    found = run(args)
    text = report(found, args)
    if found["other"] > 0.2:  # type: ignore[operator]
        console.print(f"[yellow]note: other processes used {found['other']:.2f} cores meanwhile: the figures are "
                      "inflated and noisy[/]")
    print(text)


if __name__ == "__main__":
    main()
