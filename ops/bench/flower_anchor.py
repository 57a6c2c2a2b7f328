"""Flower's simulation on the federated-learning benchmark's workload, measured on this machine.

Flower lives in its own venv (``.venv-flower``, never the project's ``.venv``): flwr[simulation]
brings Ray and its own pins of grpcio, protobuf, fastapi, …, which gridq must not inherit. This
file is three things, and imports nothing but the standard library at module level:

* the script that measures, run with that venv's interpreter (it imports no gridq code)::

      .venv-flower/bin/python ops/bench/flower_anchor.py
      .venv-flower/bin/python ops/bench/flower_anchor.py --rounds 20 --clients 10 --client-cpus 1

  It prints one JSON object on stdout (everything else, Flower's and Ray's logs included, goes
  to stderr)::

      {"flwr", "torch", "ray", "rounds": 20, "clients": 10, "client_cpus": 1.0,
       "seconds_per_round", "plain_seconds_per_round", "overhead_per_round",
       "startup_seconds", "total_seconds", "peak_rss_bytes", "peak_pss_bytes", "processes",
       "sampling_cpu_seconds", "accuracy", "plain_accuracy", "load"}

  ``seconds_per_round``: wall time of the 20 timed rounds / 20. Start-up is separate:
  ``startup_seconds`` runs from the ``run_simulation`` call to the start of the timed rounds
  and holds Ray's start, the ClientApp actors' start and imports, and one warm-up round
  (which, like ``ops/bench/fl.py``'s warm-up ``grid.fit``, trains a model that is then thrown
  away). ``plain_seconds_per_round``: the same rounds in a plain-torch loop in the same
  process, before Flower starts. ``load``: CPU that other processes used during the timed
  rounds, in cores (as ops/bench/measure.py's ``Load``). Before it starts it waits up to
  ``--quiet-wait`` s (60) for a quiet machine; then a run takes ~15 s on 2 cores (~8 s of it
  start-up). ``total_seconds``: from the ``run_simulation`` call to its return (Ray's shutdown
  included).

* the installer, idempotent, for any Python >= 3.11 (stdlib only)::

      python3 ops/bench/flower_anchor.py --install          # ~60 s fresh, ~3 s when built

* the bench's entry point, importable from the gridq venv without Flower::

      from ops.bench import flower_anchor
      figures = flower_anchor.anchor()           # dict, or raises FlowerUnavailable(reason)
      figures, note = flower_anchor.figures()    # measured, else FALLBACK; note says which and why

The workload is ``ops/bench/fl.py``'s, the same seeds: scikit-learn's bundled digits
(``load_digits``, nothing downloaded), 80/20 stratified split (seed 0), the training part
permuted (``numpy.random.default_rng(0)``) and ``array_split`` over 10 clients (IID), as
``ops/demo_data.py: digits_split``; MLP 64-64-10 (``torch.manual_seed(0)`` before building it);
SGD lr 0.05, no momentum, batch 32 over ``torch.randperm`` of a generator seeded with
``(round - 1) * clients + client``, the default generator seeded likewise, mean cross-entropy,
1 local epoch, as ``workers/jobs/training.py: train``; 20 rounds, every client every round,
FedAvg weighted by sample counts. Flower runs it with its Message API: a ``ClientApp`` whose
``@train`` does the local epoch, a ``ServerApp`` whose ``@main`` runs
``flwr.serverapp.strategy.FedAvg`` (``fraction_train=1``, no federated evaluation), through
``flwr.simulation.run_simulation`` on the Ray backend with ``client_resources.num_cpus`` 1
(so 2 ClientApp actors train at once on 2 cores). ``torch.set_num_threads(1)`` and
``OMP_NUM_THREADS=1`` in every process. Flower averages in numpy float32, gridq in torch, in
another order: the two accuracies agree to within a few 1e-3, not bit for bit.

Memory: a thread samples, every 0.5 s from the ``run_simulation`` call to its return (so the
timed rounds too: ``sampling_cpu_seconds`` is what the sampling cost, ~0.5 s over a run), the
sum of RSS and of PSS (``/proc/<pid>/smaps_rollup``) over the measuring process and every
process related to it: its descendants, and also every process of its Unix session when it
leads that session (``anchor()`` starts it with ``start_new_session=True``), which would catch a
Ray process that daemonized itself out of the tree (reparented to init) but kept the session;
and any process whose parent was seen in an earlier sample, for one that left both. With Ray
2.55.1 nothing leaves the tree while it runs (checked with ``ps``): gcs_server, raylet, the
autoscaler monitor, dashboard.py and log_monitor.py are this process's children, the
DashboardAgent, RuntimeEnvAgent and the ClientApp actors are raylet's (the actors are reparented
to init only at shutdown, after raylet exits). ``processes`` is the most processes in one sample;
the processes of the sample with the peak PSS, and each one's PSS, go to stderr.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

try:
    from ops.bench import side_venv, tree_memory
except ImportError:  # a script of Flower's venv, where gridq is not importable (nor, in spawned children, this folder)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    side_venv, tree_memory = importlib.import_module("side_venv"), importlib.import_module("tree_memory")
    del sys.path[0]

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DEFAULT_VENV = REPO / ".venv-flower"
FLOWER_REQUIREMENTS = HERE / "flower_requirements.txt"
STAMP_NAME = ".flower-installed"
ENV_PYTHON = "GRIDQ_FLOWER_PYTHON"

CLIENTS, ROUNDS, LR, BATCH = 10, 20, 0.05, 32

# Dated figures, for a machine where Flower cannot be installed: measured 2026-12-07 on this
# project's 2-core machine with this very script (through figures(), other load 0.58 cores).
FALLBACK: dict[str, Any] = {
    "flwr": "1.42.0",
    "torch": "2.13.0+cpu",
    "ray": "2.55.1",
    "rounds": ROUNDS,
    "clients": CLIENTS,
    "client_cpus": 1.0,
    "measured": "2026-12-07",
    "seconds_per_round": 0.1759,
    "plain_seconds_per_round": 0.0174,
    "overhead_per_round": 0.1585,
    "startup_seconds": 7.91,
    "peak_rss_bytes": 2_181_201_920,
    "peak_pss_bytes": 1_623_442_432,
    "processes": 12,
    "accuracy": 0.9611,
    "plain_accuracy": 0.9611,
}


class FlowerUnavailable(side_venv.Unavailable):
    """Flower could not be run here; ``reason`` says why (one line)."""


# --------------------------------------------------------------------------- from the bench

def find_python(python: str | None = None) -> str | None:
    """Flower's venv's interpreter: ``python``, else $GRIDQ_FLOWER_PYTHON, else the repo's
    ``.venv-flower/bin/python`` if it exists; None when there is none."""
    return side_venv.find_python(python, ENV_PYTHON, DEFAULT_VENV)


def anchor(python: str | None = None, timeout: float = 600, rounds: int = ROUNDS,
           clients: int = CLIENTS) -> dict[str, Any]:
    """Run this script under Flower's interpreter and return its JSON; raise
    :class:`FlowerUnavailable` (with the reason) when there is no such interpreter, Flower does
    not import there, the run fails, or it takes longer than ``timeout`` seconds."""
    return side_venv.run_json(
        find_python(python), Path(__file__).resolve(), ["--rounds", str(rounds), "--clients", str(clients)],
        name="Flower", timeout=timeout, unavailable=FlowerUnavailable,
        valid=lambda got: isinstance(got.get("seconds_per_round"), float),
        install=f"{DEFAULT_VENV} missing, ${ENV_PYTHON} unset: python3 {Path(__file__).relative_to(REPO)} --install")


def figures(python: str | None = None, timeout: float = 600) -> tuple[dict[str, Any], str]:
    """Flower's figures measured now, else :data:`FALLBACK`; with a note for the table."""
    try:
        got = anchor(python, timeout)
    except FlowerUnavailable as e:
        return FALLBACK, (f"Flower {FALLBACK['flwr']} simulation: dated figures from {FALLBACK['measured']} "
                          f"(not measured now: {e.reason})")
    return got, (f"Flower {got['flwr']} simulation (Ray {got['ray']}, torch {got['torch']}), "
                 f"{got['clients']} clients, measured in this run")


# --------------------------------------------------------------------------- installer

def install(venv: str | Path | None = None, base_python: str | None = None, quiet: bool = True) -> Path:
    """Build Flower's venv (default ``.venv-flower`` at the repo root) unless a stamp says it is
    already built from the same requirements; return its interpreter: torch alone first, the CPU
    build pinned; then ``ops/bench/flower_requirements.txt`` (flwr[simulation], ray,
    scikit-learn, numpy, pinned; none of them asks for torch, so pip keeps the CPU build)
    (:func:`ops.bench.side_venv.build_venv`). Raises RuntimeError."""
    return side_venv.build_venv(Path(venv) if venv else DEFAULT_VENV, Path(__file__).resolve(),
                                [FLOWER_REQUIREMENTS], stamp_name=STAMP_NAME, base_python=base_python, quiet=quiet)


# --------------------------------------------------------------------------- inside Flower's venv

def digits_split(nodes: int, seed: int = 0) -> tuple[list[Any], tuple[Any, Any]]:
    """``ops/demo_data.py: digits_split`` (IID), copied: this script imports no gridq code."""
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.data.astype(np.float32), digits.target, test_size=0.2, stratify=digits.target, random_state=seed)
    order = np.random.default_rng(seed).permutation(len(y_train))
    table = np.column_stack([x_train, y_train]).astype(np.float32)[order]
    return np.array_split(table, nodes), (x_test, y_test)


def mlp() -> Any:
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))


def local_train(model: Any, shard: Any, seed: int) -> int:
    """One local epoch, as ``workers/jobs/training.py: train`` does it (SGD, no momentum, the
    shuffle and the default generator seeded with ``seed``); returns the sample count."""
    import torch
    import torch.nn.functional as F

    x, y = torch.tensor(shard[:, :64]), torch.tensor(shard[:, 64]).to(torch.long)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.0, weight_decay=0.0)
    torch.default_generator.manual_seed(seed)
    order = torch.Generator().manual_seed(seed)
    model.train()
    for batch in torch.randperm(len(x), generator=order).split(BATCH):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x[batch]), y[batch], reduction="none").sum() / len(batch)
        loss.backward()
        optimizer.step()
    return len(x)


def accuracy(model: Any, test: tuple[Any, Any]) -> float:
    import torch

    model.eval()
    with torch.no_grad():
        return float((model(torch.tensor(test[0])).argmax(1).numpy() == test[1]).mean())


def plain(shards: list[Any], rounds: int) -> tuple[Any, float]:
    """The same rounds in one process, FedAvg as ``orchestrator.fl.fedavg``: returns the model
    and seconds per round."""
    import copy

    import torch

    model = mlp()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    started = time.perf_counter()
    for r in range(rounds):
        updates = []
        for i, shard in enumerate(shards):
            local = copy.deepcopy(model)
            local.load_state_dict(state)
            n = local_train(local, shard, r * len(shards) + i)
            updates.append((local.state_dict(), n))
        total = sum(n for _, n in updates)
        state = {k: sum((u[k] * (n / total) for u, n in updates), torch.zeros_like(state[k])) for k in state}
    seconds = (time.perf_counter() - started) / rounds
    model.load_state_dict(state)
    return model, seconds


# memory of the process tree -----------------------------------------------------------------

# Flower ---------------------------------------------------------------------------------------

_SHARDS: list[Any] = []  # in each ClientApp actor, loaded with its first message


def _client_app(clients: int) -> Any:
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        import torch

        torch.set_num_threads(1)
        if not _SHARDS:
            _SHARDS.extend(digits_split(clients)[0])
        client = int(context.node_config["partition-id"])
        server_round = int(msg.content["config"]["server-round"])
        model = mlp()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        n = local_train(model, _SHARDS[client], (server_round - 1) * clients + client)
        return Message(content=RecordDict({"arrays": ArrayRecord(model.state_dict()),
                                           "metrics": MetricRecord({"num-examples": n})}), reply_to=msg)

    return app


def run_flower(clients: int, rounds: int, client_cpus: float, out: dict[str, Any],
               peak: tree_memory.PeakMemory) -> None:
    """Flower's simulation: a warm-up round, then ``rounds`` timed rounds; fills ``out`` with
    their start and end (``warm``, ``done``), the machine's busy CPU ticks and those of this
    process and its relatives at both (``busy``, ``own``: the others' load is the difference)
    and the final weights (``state``)."""
    import torch
    from flwr.app import ArrayRecord, Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        torch.set_num_threads(1)
        strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=clients,
                          min_available_nodes=clients)
        strategy.start(grid=grid, initial_arrays=ArrayRecord(mlp().state_dict()), num_rounds=1)  # warm-up
        out["busy"], out["own"] = [side_venv.busy_ticks()], [tree_memory.own_ticks(peak.related())]
        out["warm"] = time.perf_counter()
        result = strategy.start(grid=grid, initial_arrays=ArrayRecord(mlp().state_dict()), num_rounds=rounds)
        out["done"] = time.perf_counter()
        out["busy"].append(side_venv.busy_ticks())
        out["own"].append(tree_memory.own_ticks(peak.related()))  # while Ray's processes are still there to count
        out["state"] = result.arrays.to_torch_state_dict()

    backend = {"client_resources": {"num_cpus": client_cpus, "num_gpus": 0.0},
               "init_args": {"log_to_driver": False, "include_dashboard": False}}
    run_simulation(server_app=server, client_app=_client_app(clients), num_supernodes=clients,
                   backend_config=backend)


def measure(clients: int, rounds: int, client_cpus: float) -> dict[str, Any]:
    import flwr
    import ray
    import torch

    torch.set_num_threads(1)
    shards, test = digits_split(clients)
    torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.1)  # torch's first optimizer imports torch._dynamo
    print("plain torch …", file=sys.stderr, flush=True)
    plain(shards, 1)
    baseline, plain_round = plain(shards, rounds)
    print(f"plain torch: {plain_round:.4f} s per round; Flower's simulation …", file=sys.stderr, flush=True)
    out: dict[str, Any] = {}
    with tree_memory.PeakMemory() as peak:
        started = time.perf_counter()
        run_flower(clients, rounds, client_cpus, out, peak)
        ended = time.perf_counter()
    print("at peak PSS: " + ", ".join(f"{name} {pss / 2**20:.0f}" for name, pss in peak.at_peak) + " (MiB)",
          file=sys.stderr)
    if "done" not in out:
        raise RuntimeError("Flower's ServerApp did not finish its rounds (see the log above)")
    seconds = (out["done"] - out["warm"]) / rounds
    other = (out["busy"][1] - out["busy"][0]) - (out["own"][1] - out["own"][0])
    model = mlp()
    model.load_state_dict(out["state"])
    return {
        "flwr": flwr.__version__ if hasattr(flwr, "__version__") else _version("flwr"),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "rounds": rounds,
        "clients": clients,
        "client_cpus": client_cpus,
        "seconds_per_round": round(seconds, 4),
        "plain_seconds_per_round": round(plain_round, 4),
        "overhead_per_round": round(seconds - plain_round, 4),
        "startup_seconds": round(out["warm"] - started, 2),
        "total_seconds": round(ended - started, 2),
        "peak_rss_bytes": peak.rss,
        "peak_pss_bytes": peak.pss,
        "processes": peak.processes,
        "sampling_cpu_seconds": round(peak.cpu, 2),
        "accuracy": round(accuracy(model, test), 4),
        "plain_accuracy": round(accuracy(baseline, test), 4),
        "load": round(max(0.0, other / os.sysconf("SC_CLK_TCK") / (out["done"] - out["warm"])), 2),
    }


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


def main(argv: list[str]) -> int:
    parser = side_venv.cli(__doc__, "Flower", DEFAULT_VENV)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--clients", type=int, default=CLIENTS)
    parser.add_argument("--client-cpus", type=float, default=1.0,
                        help="Ray CPUs per ClientApp actor (1: two actors at once on 2 cores)")
    parser.add_argument("--quiet-wait", type=float, default=60,
                        help="first wait up to this many seconds for other processes to go quiet")
    args = parser.parse_args(argv)
    done = side_venv.common_commands(args, "Flower", install, figures)
    if done is not None:
        return done
    try:
        import flwr  # noqa: F401
        import ray
        import torch
        from flwr.simulation import run_simulation  # noqa: F401
    except ImportError as e:
        print(f"flwr does not import: {e}", file=sys.stderr)
        return 3
    if args.check:
        print(json.dumps({"flwr": _version("flwr"), "ray": ray.__version__, "torch": torch.__version__}))
        return 0

    # stdout is for the JSON alone: Flower, Ray and their children write to fd 1, which now is stderr
    sys.stdout.flush()
    real_stdout = os.dup(1)
    os.dup2(2, 1)
    side_venv.wait_quiet(args.quiet_wait)
    try:
        result = measure(args.clients, args.rounds, args.client_cpus)
    except Exception as e:  # Flower's or Ray's failure: one line for anchor()
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(f"Flower: {result['seconds_per_round']:.4f} s per round, start-up {result['startup_seconds']:.1f} s, "
          f"accuracy {result['accuracy']} (plain {result['plain_accuracy']})", file=sys.stderr, flush=True)
    with os.fdopen(real_stdout, "w") as f:
        f.write(json.dumps(result, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    # this folder holds modules (mpc.py, measure.py, …) that must not shadow anything in Flower's venv
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # for Ray's workers, which this process starts
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    sys.exit(main(sys.argv[1:]))
