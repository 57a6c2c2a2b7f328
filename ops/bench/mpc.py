"""MPC through the broker, against plaintext torch in the same run.

    python -m ops.bench.mpc                 # ~3 min on 2 cores
    python -m ops.bench.mpc --parties 2     # one party count only
    python -m ops.bench.mpc --queries       # end to end only (no primitives, no CrypTen), ~1 min

Primitives (for 2 and 3 parties): each party is its own process, running the very code of
a pool party (:class:`workers.mpc.rounds.PartyEnd` driving a protocol generator): every round
crosses Redis, party to party, as MAC'd pub/sub messages. Inputs are already shared and the
dealer's bundles already dealt (the pool pre-deals them); the dealer's time for each bundle
is printed apart (``offline``).

* share + reconstruct 1M values: encode, split, each share SET and GET through Redis,
  sum, decode — against one SET and GET of the plaintext tensor;
* multiply 1M × 1M (Beaver, then exact truncation: 9 rounds) — against ``x * y``;
* matmul 128×784 · 784×10 (+ truncation: 9 rounds) — against ``x @ w``;
* ReLU on 128×10 and on 1M (9 rounds) — against ``x.clamp(min=0)``.

CrypTen 0.4.1 (2 and 3 parties, its trusted third party dealing during each op, gloo over
loopback) runs after ours in its own venv (``ops/bench/crypten_anchor.py``; ``make bench``
installs it), its figures beside ours; where it cannot run, its dated figures, said so.

End to end: the served linear model (784 → 10) and an MLP (784 → 128 → ReLU → 10), batch
1, through the whole pool (``gridq mpc start`` workers, ``grid.query``): client sharing and
sealing, the host's authorisation, pool bundles, the session, sealed output shares — against
the plaintext model's forward pass.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import secrets
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from ops.bench import crypten_anchor
from ops.bench.measure import Load, wait_quiet
from ops.demo import prepare
from ops.local import NODE_CONFIGS, LocalGrid
from orchestrator.transport import redis_client
from protocol import spans
from protocol.mpc import Dealer, FixedPoint, reconstruct, share
from protocol.mpc.beaver import PartyProtocol, beaver
from protocol.mpc.nonlinear import relu, truncate
from protocol.mpc.wire import pack, unpack
from workers.mpc.rounds import PartyEnd, connect

console = Console(stderr=True)
FP = FixedPoint(16)
TIMEOUT = 120.0


def _party(index: int, n: int, url: str, jobs: Any, ready: Any, done: Any) -> None:
    """A party process: for each job, build its protocol, subscribe, say ready, wait for go,
    run it with the other parties through Redis (as a pool party does), and say done."""
    torch.set_num_threads(1)
    spans.set_role("party")
    client = connect(url, TIMEOUT)
    names = [f"p{i}" for i in range(n)]
    while (job := jobs.get()) is not None:
        op, session, key, inputs, material = job
        protocol = PROTOCOLS[op](index, inputs, material)
        with PartyEnd(client, "bench", session, names, names[index], key, TIMEOUT) as end:
            ready.put(index)
            client.blpop([f"bench:go:{session}"], timeout=TIMEOUT)
            end.run(protocol)
        done.put(time.perf_counter())


def _mul(i: int, inputs: dict[str, torch.Tensor], m: dict[str, Any]) -> PartyProtocol:
    z = yield from beaver(i, inputs["x"], inputs["y"], m["triple"], torch.mul)
    return (yield from truncate(i, z, m["trunc"], FP.frac_bits))


def _matmul(i: int, inputs: dict[str, torch.Tensor], m: dict[str, Any]) -> PartyProtocol:
    z = yield from beaver(i, inputs["x"], inputs["y"], m["triple"], torch.matmul)
    return (yield from truncate(i, z, m["trunc"], FP.frac_bits))


def _relu(i: int, inputs: dict[str, torch.Tensor], m: dict[str, Any]) -> PartyProtocol:
    return (yield from relu(i, inputs["x"], m["relu"]))


PROTOCOLS: dict[str, Callable[[int, dict[str, torch.Tensor], dict[str, Any]], PartyProtocol]] = {
    "mul": _mul, "matmul": _matmul, "relu": _relu}


class Parties:
    def __init__(self, n: int, url: str) -> None:
        ctx = mp.get_context("fork")
        self.n = n
        self.jobs = [ctx.Queue() for _ in range(n)]
        self.ready, self.done = ctx.Queue(), ctx.Queue()
        self.procs = [ctx.Process(target=_party, args=(i, n, url, self.jobs[i], self.ready, self.done), daemon=True)
                      for i in range(n)]
        for p in self.procs:
            p.start()
        self.client = connect(url, TIMEOUT)

    def run(self, op: str, inputs: list[dict[str, torch.Tensor]], material: list[dict[str, Any]],
            window: list[tuple[float, float]]) -> float:
        """From go to the last party's end (fork start: perf_counter is one clock for all);
        the run's wall-clock ``window`` is appended (where its spans fall)."""
        session, key = secrets.token_hex(16), secrets.token_bytes(32)
        for i in range(self.n):
            self.jobs[i].put((op, session, key, inputs[i], material[i]))
        for _ in range(self.n):
            self.ready.get(timeout=TIMEOUT)
        wall, started = time.time(), time.perf_counter()
        self.client.rpush(f"bench:go:{session}", *range(self.n))
        took = max(self.done.get(timeout=TIMEOUT) for _ in range(self.n)) - started
        window.append((wall, wall + took + 0.05))
        return took

    def close(self) -> None:
        for q in self.jobs:
            q.put(None)
        for p in self.procs:
            p.join(timeout=10)
        self.client.close()


CRYPTEN_OPS = {"share + reconstruct 1M": crypten_anchor.SHARE, "multiply 1M × 1M": crypten_anchor.MUL,
               "matmul 128×784 · 784×10": crypten_anchor.MATMUL, "ReLU 128×10": crypten_anchor.RELU_SMALL,
               "ReLU 1M": crypten_anchor.RELU_1M}  # our rows → CrypTen's (its sharing is local: no reconstruct)
Windows = dict[str, list[tuple[float, float]]]  # a case's runs: where each started and ended (wall clock)
NESTED = ("join:", "rounds:")  # a party's phases inside "the protocol (rounds)"
ROLES = ("client", "host", "party")


def phases(recorded: list[dict[str, Any]], windows: list[tuple[float, float]]) -> list[tuple[str, str, float]]:
    """(role, phase, median ms over the runs) of one case. A party's figure is the mean of the
    parties that ran the protocol in that run (the dealer's refills are left out); what the
    broker and Celery take is what a waiting side saw minus what the other side spent."""
    per_run: list[dict[tuple[str, str], float]] = []
    for start, end in windows:
        inside = [r for r in recorded if start <= r["at"] <= end]
        parties = {r["pid"] for r in inside if r["role"] == "party" and r["name"] in ("the protocol (rounds)",
                                                                                      "rounds: compute")}
        sums: dict[tuple[str, str], float] = {}
        for r in inside:
            if r["role"] != "party" or r["pid"] in parties:
                key = (r["role"], r["name"])
                sums[key] = sums.get(key, 0.0) + r["ms"] / (len(parties) if r["role"] == "party" else 1)
        total = {role: sum(ms for (ro, name), ms in sums.items() if ro == role and not name.startswith(NESTED))
                 for role in ROLES}
        ask, wait = sums.get(("client", "ask the host (send, wait, verify the reply)")), \
            sums.get(("host", "wait for the parties' answers"))
        if ask is not None:
            sums[("client", "… of which broker and Celery, to the host and back")] = ask - total["host"]
        if wait is not None:
            sums[("host", "… of which broker and Celery, to the parties and back")] = wait - total["party"]
        per_run.append(sums)
    keys = list(dict.fromkeys(k for run in per_run for k in run))
    keys.sort(key=lambda k: ROLES.index(k[0]) if k[0] in ROLES else 9)
    return [(role, name, statistics.median(run.get((role, name), 0.0) for run in per_run)) for role, name in keys]


def best(fn: Callable[[], float], repeat: int) -> float:
    return statistics.median(fn() for _ in range(repeat))


def timed(fn: Callable[[], object], repeat: int = 5) -> float:
    def once() -> float:
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t
    return best(once, repeat)


def primitives(n: int, url: str, rows: list[tuple[str, ...]], windows: Windows) -> None:
    client = redis_client(url)
    gen = torch.Generator().manual_seed(n)
    dealer = Dealer(n)
    parties = Parties(n, url)
    try:
        x = torch.randn(1_000_000, generator=gen)

        def share_round_trip() -> None:
            shares = share(FP.encode(x), n)
            for i, s in enumerate(shares):
                client.set(f"bench:share:{i}", pack({"s": s}))
            back = [unpack(_bytes(client.getdel(f"bench:share:{i}")))[0]["s"] for i in range(n)]
            FP.decode(reconstruct(back))

        def plain_round_trip() -> None:
            client.set("bench:plain", pack({"x": x}))
            unpack(_bytes(client.getdel("bench:plain")))

        with Load() as load:
            shared, unshared = timed(share_round_trip), timed(plain_round_trip)
        rows.append(_row(n, "share + reconstruct 1M", shared, unshared, None, load.cores))

        cases = [
            ("multiply 1M × 1M", "mul", (1_000_000,), (1_000_000,), lambda a, b: a * b),
            ("matmul 128×784 · 784×10", "matmul", (128, 784), (784, 10), lambda a, b: a @ b),
            ("ReLU 128×10", "relu", (128, 10), None, lambda a, b: a.clamp(min=0)),
            ("ReLU 1M", "relu", (1_000_000,), None, lambda a, b: a.clamp(min=0)),
        ]
        for label, op, sa, sb, plain in cases:
            a = torch.randn(sa, generator=gen)
            b = torch.randn(sb, generator=gen) if sb else None
            xs = share(FP.encode(a), n)
            ys = share(FP.encode(b), n) if b is not None else None
            out_shape = tuple((a @ b).shape) if op == "matmul" else sa  # type: ignore[operator]
            inputs = [{"x": xs[i], **({"y": ys[i]} if ys is not None else {})} for i in range(n)]
            online, offline = [], []
            with Load() as load:
                for _ in range(3 if a.numel() >= 1_000_000 else 9):
                    started = time.perf_counter()
                    if op == "relu":
                        bundles = [{"relu": p.materialize()} for p in dealer.relu(sa)]
                    else:
                        trip = dealer.triple(sa, sb or sa, op)  # type: ignore[arg-type]
                        tr = dealer.trunc(out_shape, FP.frac_bits)
                        bundles = [{"triple": t.materialize(), "trunc": u.materialize()}
                                   for t, u in zip(trip, tr, strict=True)]
                    offline.append(time.perf_counter() - started)
                    online.append(parties.run(op, inputs, bundles, windows.setdefault(f"{label}, {n} parties", [])))
            plain_time = timed(lambda f=plain, a=a, b=b: f(a, b), 20)  # type: ignore[misc]
            rows.append(_row(n, label, statistics.median(online), plain_time, statistics.median(offline), load.cores))
    finally:
        parties.close()
        client.close()


def _bytes(value: Any) -> bytes:
    assert isinstance(value, bytes), "the bench's blob vanished from Redis"
    return value


def _row(n: int, label: str, t: float, plain: float, offline: float | None, load: float) -> tuple[str, ...]:
    return (str(n), label, f"{t * 1e3:.1f}", f"{plain * 1e3:.3f}", f"{t / plain:,.0f}×",
            "" if offline is None else f"{offline * 1e3:.0f}", f"{load:.2f}")


def end_to_end(lg: LocalGrid, rows: list[tuple[str, ...]], counts: list[int], windows: Windows) -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(784, 10)
    mlp = torch.nn.Sequential(torch.nn.Linear(784, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    x = torch.rand(1, 784)
    for n in counts:
        parties = ["hospital", "public", "clinic"][:n]
        with lg.connect("dana") as owner:
            for name, model in ((f"linear{n}", linear), (f"mlp{n}", mlp)):
                owner.serve(model, name=name, parties=parties, crypto_provider="university", host="company",
                            queriers=["bob"])
        with lg.connect("bob") as grid:
            for name, model, label in ((f"linear{n}", linear, "inference, Linear 784→10"),
                                       (f"mlp{n}", mlp, "inference, MLP 784→128→10")):
                grid.query(name, x)  # warm: the pool now holds this batch size's bundles
                samples = []
                with Load() as load:
                    for _ in range(9):
                        time.sleep(0.3)  # let the provider refill the pool between queries
                        wall, t = time.time(), time.perf_counter()
                        y = grid.query(name, x)
                        samples.append(time.perf_counter() - t)
                        windows.setdefault(f"{label}, {n} parties", []).append((wall, time.time() + 0.05))
                with torch.no_grad():
                    error = (y - model(x)).abs().max().item()
                    plain = timed(lambda m=model: m(x), 50)  # type: ignore[misc]
                rows.append(_row(n, f"{label} (max err {error:.1e})", statistics.median(samples), plain, None,
                                 load.cores))


def _crypten() -> tuple[dict[str, Any], str]:
    console.print("CrypTen, same machine, same run …")
    return crypten_anchor.figures()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parties", type=int, choices=[2, 3], action="append")
    parser.add_argument("--queries", action="store_true", help="end to end queries only")
    args = parser.parse_args()
    counts = args.parties or [2, 3]
    torch.set_num_threads(1)
    wait_quiet(60, console.print)
    rows: list[tuple[str, ...]] = []
    windows: Windows = {}
    with tempfile.TemporaryDirectory(prefix="gridq-bench-mpc-") as tmp:
        home = Path(tmp)
        os.environ[spans.SPANS_ENV] = str(home / "spans.jsonl")  # every worker started below records its phases
        prepare(home)
        with LocalGrid(home) as lg:
            url = lg.start_redis()
            for n in [] if args.queries else counts:
                console.print(f"primitives, {n} parties …")
                primitives(n, url, rows, windows)
            console.print("end to end through the pool …")
            nodes = ["company", "university", "hospital", "public", "clinic"]
            lg.ensure_keys(*nodes, "dana", "bob", "eve")
            lg.start([])
            for node in nodes:
                lg.start_mpc(NODE_CONFIGS / f"{node}.toml")
            lg.wait_ready(nodes, timeout=120, workers=[f"{n}-mpc" for n in nodes])
            end_to_end(lg, rows, counts, windows)
        recorded = spans.read(os.environ[spans.SPANS_ENV])
    crypten, note = ({}, "CrypTen not run (--queries)") if args.queries else _crypten()
    table = Table(title=f"gridq MPC through Redis vs plaintext torch and CrypTen (medians; {os.cpu_count()} cores)",
                  caption=note)
    for col in ("parties", "operation", "gridq ms", "plaintext ms", "ratio", "dealer ms (offline)", "other load",
                "CrypTen ms", "gridq / CrypTen"):
        table.add_column(col)
    for row in rows:
        theirs = crypten.get("ms" if row[0] == "2" else "ms3", {}).get(CRYPTEN_OPS.get(row[1], ""))
        table.add_row(*row, *(("", "") if theirs is None else (f"{theirs:.1f}", f"{float(row[2]) / theirs:.2f}×")))
    Console(width=170).print(table)
    for case, runs in windows.items():
        if case.startswith(("multiply 1M", "inference")):
            detail = Table(title=f"where the time goes: {case} (median of {len(runs)} runs, ms)")
            for col in ("side", "phase", "ms"):
                detail.add_column(col)
            for role, name, ms in phases(recorded, runs):
                detail.add_row(role, name, f"{ms:.2f}")
            Console(width=150).print(detail)


if __name__ == "__main__":
    main()
