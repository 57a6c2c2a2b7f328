"""Federated learning through the broker, against a plain-torch loop of the same math and
against bare Celery doing the same rounds.

    python -m ops.bench.fl              # ~2 min on 2 cores
    python -m ops.bench.fl --nodes 10 --rounds 20

The workload of Flower's simulation (:mod:`ops.bench.flower_anchor`, measured first, in its
own venv: ``python3 ops/bench/flower_anchor.py --install`` once; without it the table says
so and shows Flower's dated figures): scikit-learn's digits, 80/20 stratified split (seed 0),
IID over 10 nodes, MLP 64-64-10, SGD lr 0.05, batch 32, 1 local epoch, 20 rounds, every node
every round. Four ways, with the same seeds — so the final accuracies must be identical
(Flower's to ~1e-3: it averages in numpy float32, in another order):

* **Flower 1.42's simulation** on Ray (two ClientApp actors on 2 cores);
* **plain torch**: the local trainings (:func:`workers.jobs.training.train`) one after another
  and FedAvg (:func:`orchestrator.fl.fedavg`), in one process;
* **bare Celery**: ten Celery workers (:mod:`ops.bench.bare_worker`, the settings and pool
  of a gridq node) each training on its shard, the weights sent as plain task arguments:
  no signature, no sealing, no policy, no job record — the floor a Celery design stands on;
* **gridq**: ``grid.fit`` over ten real node workers.

Printed: time and CPU (whole process tree) per round, the overhead per round over plain
torch, bare Celery and Flower, and against issue 20's aims (overhead ≤ 0.04 s a round and
≤ 0.2× Flower's; memory under Flower's); the final accuracies; the peak memory of the process tree
during a separate, untimed run (sampling it costs ~0.15 s of CPU a time with ten torch
processes: it would distort the timed runs); then the cost of secure aggregation
(aggregation parties ``company`` and ``public`` from the MPC pool) and of DP-SGD (σ = 1.1,
C = 1), as seconds per round against plain ``grid.fit`` rounds of the same run.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import torch
from celery import Celery, group
from rich.console import Console
from rich.table import Table

from ops.bench import bare_worker as bare
from ops.bench import flower_anchor
from ops.bench.measure import Load, tree_ticks, wait_quiet
from ops.bench.tree_memory import PeakMemory
from ops.demo_data import digits_split
from ops.local import NODE_CONFIGS, LocalGrid
from orchestrator.fl import fedavg
from orchestrator.transport import poll_results
from protocol.broker import connection_settings
from protocol.contract import celery_settings
from protocol.messages import DPConfig, TrainConfig
from protocol.model import build_model, describe_model, flatten_state
from workers.jobs.training import train, warm_up

console = Console(stderr=True)
# issue 20's aims: the overhead over plain torch at most 0.04 s a round and 0.2× Flower's; the
# process tree's memory (PSS, which counts a page shared by n processes 1/n in each) under Flower's
AIM_OVERHEAD_SECONDS = 0.04
AIM_OVERHEAD_VS_FLOWER = 0.2
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

[worker]
concurrency = {concurrency}

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


def start_bare(lg: LocalGrid, sites: list[str]) -> Celery:
    """One bare Celery worker per shard, on its own queue; returns a client app once all serve."""
    for site in sites:
        lg._spawn(f"bare-{site}", [sys.executable, "-m", "celery", "-A", "ops.bench.bare_worker", "worker",
                                   "--queues", f"{bare.QUEUE}.{site}", "--hostname", f"bare-{site}@%h",
                                   "--loglevel", "WARNING", "--pool", "prefork", "--concurrency", "1",
                                   "--without-mingle", "--without-gossip", "--task-events"])
    app = Celery("gridq-bench-fl", set_as_current=False)
    app.conf.update(connection_settings(lg.url, celery_settings()))
    for site in sites:
        app.send_task(bare.ADD, args=[1, 2], queue=f"{bare.QUEUE}.{site}").get(timeout=180, interval=0.05)
    return app


def bare_fit(app: Celery, sites: list[str], rounds: int) -> tuple[torch.nn.Module, float, float]:
    """The same rounds through bare Celery workers: a group of tasks, polled as ``grid.fit``
    polls (:func:`orchestrator.transport.poll_results`), then FedAvg here. Returns the model,
    seconds and CPU seconds per round."""
    model = mlp()
    spec, state = describe_model(model)
    spec_json = spec.model_dump_json()
    started, ticks = time.perf_counter(), tree_ticks()
    for r in range(rounds):
        weights = bare._encode(flatten_state(state))
        ids = [uuid.uuid4().hex for _ in sites]
        group(app.signature(bare.TRAIN, args=[site, spec_json, weights, TrainConfig(
            epochs=1, batch_size=32, lr=0.05, seed=r * len(sites) + i).model_dump(mode="json")],
            queue=f"{bare.QUEUE}.{site}").set(task_id=job) for i, (site, job) in enumerate(zip(sites, ids, strict=True))
        ).apply_async()
        done = {job: meta["result"] for job, (_, meta) in poll_results(app, ids, 60.0).items()}  # as grid.fit polls
        if len(done) < len(ids):
            raise RuntimeError(f"bare Celery round {r}: {len(done)} of {len(ids)} workers answered within 60 s")
        state = fedavg(state, [(site, bare._decode(done[job][0]), done[job][1])
                               for site, job in zip(sites, ids, strict=True)])
    seconds = (time.perf_counter() - started) / rounds
    cpu = (tree_ticks() - ticks) / os.sysconf("SC_CLK_TCK") / rounds
    model.load_state_dict(state)
    return model, seconds, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--node-concurrency", type=int, default=2,
                        help="pool processes per node ([worker] concurrency; 2 is a node's default, 1 one process "
                             "for a node that serves one requester at a time)")
    parser.add_argument("--variant-rounds", type=int, default=5,
                        help="rounds of the secure-aggregation and DP-SGD runs, timed against plain rounds")
    args = parser.parse_args()
    torch.set_num_threads(1)
    shards, test = digits_split(args.nodes)
    sites = [f"site-{i:02d}" for i in range(args.nodes)]
    console.print("Flower's simulation of the same rounds, in its own venv (ops/bench/flower_anchor.py) …")
    flower, flower_note = flower_anchor.figures()
    wait_quiet(60, console.print)
    with tempfile.TemporaryDirectory(prefix="gridq-bench-fl-") as tmp, LocalGrid(Path(tmp)) as lg:
        home = Path(tmp)
        (home / "data").mkdir()
        lg.ensure_keys("alice", "bob", "dana", "eve", "company", "public", *sites)
        for site, shard in zip(sites, shards, strict=True):
            np.save(home / "data" / f"{site}.npy", shard)
            (home / f"{site}.toml").write_text(CONFIG.format(site=site, concurrency=args.node_concurrency))
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
            with Load() as load:
                started, ticks = time.perf_counter(), tree_ticks()
                result = grid.fit(mlp(), data, rounds=args.rounds, lr=0.05, batch_size=32, progress=False,
                                  history_db=f"sqlite:///{home / 'runs.db'}")
                grid_round = (time.perf_counter() - started) / args.rounds
                grid_cpu = (tree_ticks() - ticks) / os.sysconf("SC_CLK_TCK") / args.rounds
            console.print("memory, in an untimed run …")
            with PeakMemory({"nodes": {lg.procs[s].pid for s in sites}}) as peak:
                grid.fit(mlp(), data, rounds=max(5, args.variant_rounds), lr=0.05, progress=False,
                         history_db=f"sqlite:///{home / 'memory.db'}")
            console.print("secure aggregation and DP-SGD …")
            for party in ("company", "public"):  # the aggregation parties, from the MPC pool
                lg.start_mpc(NODE_CONFIGS / f"{party}.toml")
            lg.wait_ready(["company", "public"], timeout=120, workers=["company-mpc", "public-mpc"])
            dp = DPConfig(noise_multiplier=1.1, max_grad_norm=1.0, delta=1e-7)
            grid.fit(mlp(), data, rounds=1, lr=0.05, progress=False, history_db=f"sqlite:///{home / 'warm.db'}",
                     dp=dp)  # a node loads Opacus with its first DP-SGD job
            variants = {}
            for name, options in (("plain", {}),
                                  ("secure aggregation", {"secure_aggregation": True,
                                                          "aggregators": ["company", "public"]}),
                                  ("DP-SGD", {"dp": dp})):
                started = time.perf_counter()
                run = grid.fit(mlp(), data, rounds=args.variant_rounds, lr=0.05, batch_size=32, progress=False,
                               history_db=f"sqlite:///{home / 'variants.db'}", **options)  # type: ignore[arg-type]
                variants[name] = ((time.perf_counter() - started) / args.variant_rounds, accuracy(run.model, test))
        console.print("bare Celery (the gridq nodes and MPC workers are stopped first) …")
        for name in [*sites, "company-mpc", "public-mpc"]:
            lg.kill(name)
        app = start_bare(lg, sites)
        bare_fit(app, sites, 1)  # warm
        bare_model, bare_round, bare_cpu = bare_fit(app, sites, args.rounds)
    accs = {name: accuracy(m, test) for name, m in (("plain", baseline), ("bare", bare_model),
                                                     ("gridq", result.model))}
    table = Table(title=f"federated digits, {args.nodes} nodes × {args.rounds} rounds ({os.cpu_count()} cores; "
                        f"{args.node_concurrency} pool process(es) a node)")
    for col in ("measurement", "gridq", "bare Celery", "plain torch", "Flower simulation", "note"):
        table.add_column(col)
    flower_round, flower_overhead = flower["seconds_per_round"], flower["overhead_per_round"]
    table.add_row("seconds per round", f"{grid_round:.3f}", f"{bare_round:.3f}", f"{plain_round:.3f}",
                  f"{flower_round:.3f}", f"gridq {grid_round / plain_round:.1f}× plain, {grid_round / bare_round:.2f}× "
                  f"bare Celery, {grid_round / flower_round:.2f}× Flower")
    table.add_row("CPU seconds per round (process tree)", f"{grid_cpu:.3f}", f"{bare_cpu:.3f}", f"{plain_round:.3f}",
                  "", f"{os.cpu_count()} cores share it")
    overhead = grid_round - plain_round
    vs_flower = overhead / flower_overhead
    met = overhead <= AIM_OVERHEAD_SECONDS and vs_flower <= AIM_OVERHEAD_VS_FLOWER
    table.add_row("overhead per round over plain torch (s)", f"{overhead:.3f}", f"{bare_round - plain_round:.3f}", "",
                  f"{flower_overhead:.3f}",
                  f"gridq {vs_flower:.2f}× Flower's, bare Celery {(bare_round - plain_round) / flower_overhead:.2f}×; "
                  f"aim ≤ {AIM_OVERHEAD_SECONDS} s and ≤ {AIM_OVERHEAD_VS_FLOWER}× Flower's: "
                  + ("met" if met else "NOT MET"))
    table.add_row("gridq over bare Celery (s per round)", f"{grid_round - bare_round:.3f}", "", "", "",
                  "signatures, sealing, policy, job records")
    table.add_row("final test accuracy", f"{accs['gridq']:.4f}", f"{accs['bare']:.4f}", f"{accs['plain']:.4f}",
                  f"{flower['accuracy']:.4f}", "identical" if len(set(accs.values())) == 1 else "DIFFERENT")
    gib = 2**30
    table.add_row("peak memory of the process tree: PSS", f"{peak.pss / gib:.2f} GiB", "", "",
                  f"{flower['peak_pss_bytes'] / gib:.2f} GiB",
                  f"gridq {peak.pss / flower['peak_pss_bytes']:.2f}× Flower's; aim under Flower's: "
                  + ("met" if peak.pss < flower["peak_pss_bytes"] else "NOT MET")
                  + f"; one node (parent + pool) {peak.parts['nodes'] / args.nodes / 2**20:.0f} MiB")
    table.add_row("peak memory of the process tree: RSS", f"{peak.rss / gib:.2f} GiB", "", "",
                  f"{flower['peak_rss_bytes'] / gib:.2f} GiB", "counts each shared page once per process")
    table.add_row("other load (cores)", f"{load.cores:.2f}", "", "", f"{flower.get('load', float('nan')):.2f}", "")
    base = variants["plain"][0]
    for name, (seconds, acc) in variants.items():
        table.add_row(f"{name}: s per round ({args.variant_rounds} rounds)", f"{seconds:.3f}", "", "", "",
                      f"{seconds / base:.2f}× plain gridq rounds; test accuracy {acc:.4f}")
    Console(width=190).print(table)
    Console(width=190).print(f"Flower: {flower_note}; memory sampled during its timed rounds, gridq's in an "
                             "untimed run (both every 0.5 s, over the whole process tree)")


if __name__ == "__main__":
    main()
