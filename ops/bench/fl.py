"""Federated learning through the broker, against a plain-torch loop of the same math.

    python -m ops.bench.fl              # ~1 min on 2 cores
    python -m ops.bench.fl --nodes 10 --rounds 20

The workload Flower 1.41's simulation was measured on here (FACTS.md: 0.26–0.29 s per
round, 2.26 GB): scikit-learn's digits, 80/20 stratified split (seed 0), IID over 10
nodes, MLP 64-64-10, SGD lr 0.05, batch 32, 1 local epoch, 20 rounds, every node every
round. gridq: ``grid.fit`` over 10 real node workers (Celery, prefork, one process each
plus its parent) on a local Redis. Baseline: the same local training
(:func:`workers.training.train`) and the same FedAvg (:func:`orchestrator.fl.fedavg`)
in one process, with the same seeds — so the two final accuracies must be identical.

Printed: time per round for both, gridq's overhead per round (the difference), the final
accuracies, and the peak memory of the whole process tree during the run (the sum of
RSS, which counts pages shared after fork once per process, and of PSS, which shares
them out). Then the cost of secure aggregation (aggregation parties ``company`` and
``public`` from the MPC pool) and of DP-SGD (σ = 1.1, C = 1), as seconds per round
against plain ``grid.fit`` rounds of the same run.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from ops.bench.measure import Load, wait_quiet
from ops.demo_data import digits_split
from ops.local import NODE_CONFIGS, LocalGrid
from orchestrator.fl import fedavg
from protocol.messages import DPConfig, TrainConfig
from protocol.model import build_model, describe_model, flatten_state
from workers.training import train, warm_up

console = Console(stderr=True)
CONFIG = """
[node]
id = "{site}"
broker = "${{GRIDQ_BROKER}}"
store = "${{GRIDQ_HOME}}/{site}"
identity = "${{GRIDQ_HOME}}/keys/{site}.key"

[users.alice]
public_key_file = "${{GRIDQ_HOME}}/keys/alice.pub"

[budget]
default_epsilon = 1000.0  # room for the DP-SGD rounds measured below

[[datasets]]
name = "digits"
path = "${{GRIDQ_HOME}}/data/{site}.npy"
tags = ["#digits"]
allowed_users = ["alice"]
"""


def mlp() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))


def accuracy(model: torch.nn.Module, test: tuple[np.ndarray, np.ndarray]) -> float:
    with torch.no_grad():
        return float((model(torch.tensor(test[0])).argmax(1).numpy() == test[1]).mean())


def plain(shards: list[np.ndarray], rounds: int) -> tuple[torch.nn.Module, float]:
    """The same rounds in one process: returns the model and seconds per round."""
    model = mlp()
    spec, state = describe_model(model)
    started = time.perf_counter()
    for r in range(rounds):
        updates = []
        for i, shard in enumerate(shards):
            local = build_model(spec, state)
            config = TrainConfig(epochs=1, batch_size=32, lr=0.05, seed=r * len(shards) + i)
            metrics = train(local, torch.tensor(shard[:, :64]), torch.tensor(shard[:, 64]), config)
            updates.append((f"site-{i:02d}", flatten_state(local.state_dict()), metrics.samples))
        state = fedavg(state, updates)
    seconds = (time.perf_counter() - started) / rounds
    model.load_state_dict(state)
    return model, seconds


def memory(pid: int) -> tuple[int, int]:
    """RSS and PSS (bytes) summed over ``pid`` and all its descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry))
    rss = pss = 0
    stack = [pid]
    while stack:
        p = stack.pop()
        stack.extend(children.get(p, []))
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Rss:"):
                        rss += int(line.split()[1]) * 1024
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1]) * 1024
        except OSError:
            continue
    return rss, pss


class PeakMemory:
    """Samples the process tree's memory every 0.1 s while the block runs."""

    def __enter__(self) -> PeakMemory:
        self.rss = self.pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            rss, pss = memory(os.getpid())
            self.rss, self.pss = max(self.rss, rss), max(self.pss, pss)
            self._stop.wait(0.1)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--variant-rounds", type=int, default=5,
                        help="rounds of the secure-aggregation and DP-SGD runs, timed against plain rounds")
    args = parser.parse_args()
    torch.set_num_threads(1)
    shards, test = digits_split(args.nodes)
    sites = [f"site-{i:02d}" for i in range(args.nodes)]
    wait_quiet(60, console.print)
    with tempfile.TemporaryDirectory(prefix="gridq-bench-fl-") as tmp, LocalGrid(Path(tmp)) as lg:
        home = Path(tmp)
        (home / "data").mkdir()
        lg.ensure_keys("alice", "bob", "dana", "eve", "company", "public", *sites)
        for site, shard in zip(sites, shards, strict=True):
            np.save(home / "data" / f"{site}.npy", shard)
            (home / f"{site}.toml").write_text(CONFIG.format(site=site))
        console.print(f"starting Redis, the gateway and {args.nodes} nodes …")
        lg.start([home / f"{s}.toml" for s in sites], timeout=180)
        console.print("plain torch …")
        warm_up()  # torch's first optimizer imports torch._dynamo (1.7 s): the nodes paid it at start
        baseline, plain_round = plain(shards, args.rounds)
        console.print("grid.fit …")
        with lg.connect("alice") as grid:
            found = grid.search("#digits")
            data = [(found[s][0][:, :64], found[s][0][:, 64]) for s in sites]
            grid.fit(mlp(), data, rounds=1, lr=0.05, progress=False,
                     history_db=f"sqlite:///{home / 'warm.db'}")  # warm the client and every node
            with PeakMemory() as peak, Load() as load:
                started = time.perf_counter()
                result = grid.fit(mlp(), data, rounds=args.rounds, lr=0.05, batch_size=32, progress=False,
                                  history_db=f"sqlite:///{home / 'runs.db'}")
                grid_round = (time.perf_counter() - started) / args.rounds
            console.print("secure aggregation and DP-SGD …")
            for party in ("company", "public"):  # the aggregation parties, from the MPC pool
                lg.start_mpc(NODE_CONFIGS / f"{party}.toml")
            lg.wait_ready(["company", "public"], timeout=120, workers=["company-mpc", "public-mpc"])
            variants = {}
            for name, options in (("plain", {}),
                                  ("secure aggregation", {"secure_aggregation": True,
                                                          "aggregators": ["company", "public"]}),
                                  ("DP-SGD", {"dp": DPConfig(noise_multiplier=1.1, max_grad_norm=1.0, delta=1e-7)})):
                started = time.perf_counter()
                run = grid.fit(mlp(), data, rounds=args.variant_rounds, lr=0.05, batch_size=32, progress=False,
                               history_db=f"sqlite:///{home / 'variants.db'}", **options)  # type: ignore[arg-type]
                variants[name] = ((time.perf_counter() - started) / args.variant_rounds, accuracy(run.model, test))
    gridq_acc, plain_acc = accuracy(result.model, test), accuracy(baseline, test)
    table = Table(title=f"federated digits, {args.nodes} nodes × {args.rounds} rounds ({os.cpu_count()} cores)")
    for col in ("measurement", "gridq", "plain torch", "note"):
        table.add_column(col)
    overhead = grid_round - plain_round
    table.add_row("seconds per round", f"{grid_round:.3f}", f"{plain_round:.3f}",
                  f"ratio {grid_round / plain_round:.1f}×")
    table.add_row("overhead per round (s)", f"{overhead:.3f}", "", f"Flower simulation 0.24–0.27 s: "
                  f"{overhead / 0.255:.2f}× of it")
    table.add_row("final test accuracy", f"{gridq_acc:.4f}", f"{plain_acc:.4f}",
                  "identical" if gridq_acc == plain_acc else "DIFFERENT")
    table.add_row("peak memory, process tree", f"RSS {peak.rss / 2**30:.2f} GiB, PSS {peak.pss / 2**30:.2f} GiB", "",
                  "Flower simulation 2.26 GB")
    table.add_row("other load (cores)", f"{load.cores:.2f}", "", "")
    base = variants["plain"][0]
    for name, (seconds, acc) in variants.items():
        table.add_row(f"{name}: s per round ({args.variant_rounds} rounds)", f"{seconds:.3f}", "",
                      f"{seconds / base:.2f}× plain gridq rounds; test accuracy {acc:.4f}")
    Console(width=150).print(table)


if __name__ == "__main__":
    main()
