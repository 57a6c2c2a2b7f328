"""CrypTen's figures for the MPC benchmark, measured on this machine in the same run.

CrypTen lives in its own venv (``.venv-crypten``, never the project's ``.venv``): it needs
``--no-deps`` (its metadata asks for the dead ``sklearn`` package and for torchvision, which has
no CPU build here) and a one-line alias for a torch module it imports that torch 2.13 moved.
This file is three things, and imports nothing but the standard library at module level:

* the script that measures, run with that venv's interpreter (it imports no gridq code)::

      .venv-crypten/bin/python ops/bench/crypten_anchor.py            # 2 parties, then 3
      .venv-crypten/bin/python ops/bench/crypten_anchor.py --parties 2

  It prints one JSON object on stdout: ``{"crypten", "torch", "parties": 2, "provider": "TTP",
  "ms": {...}, "load": cores, "ms3": {...}, "load3": cores}`` (``ms3``: 3 parties, when that
  run works, else ``ms3_error``; ``load``: CPU that other processes used meanwhile, in cores, as
  ops/bench/measure.py's ``Load``). Before each run it waits up to ``--quiet-wait`` s (60) for a
  quiet machine. A run takes ~1 min on 2 quiet cores (2 parties ~15 s, 3 parties ~35 s).

* the installer, idempotent, for any Python >= 3.11 (stdlib only)::

      python3 ops/bench/crypten_anchor.py --install                   # ~50 s fresh, ~4 s when built

* the bench's entry point, importable from the gridq venv without CrypTen::

      from ops.bench import crypten_anchor
      figures = crypten_anchor.anchor()            # dict, or raises CryptenUnavailable(reason)
      figures, note = crypten_anchor.figures()     # measured, else FALLBACK; note says which and why

What is measured: each party is its own process (spawned), 2 parties + CrypTen's trusted third
party (``cfg.mpc.provider = "TTP"``, a further process that deals Beaver triples and binary
triples on demand, inside the timed op), gloo over 127.0.0.1 (``tcp://`` rendezvous,
``GLOO_SOCKET_IFNAME=lo``), ``torch.set_num_threads(1)`` in every process. Each op runs once to
warm up, then 9 times (3 for 1M-sized ones); rank 0 times each run between two barriers of the
parties, and the median is reported in ms. Ops: encrypting 1M values (``crypten.cryptensor``,
party 0's input: CrypTen's sharing is local, zero-shares from pairwise seeds, so no traffic),
encrypted × encrypted multiply of 1M (Beaver + CrypTen's truncation: local for 2 parties, TTP
wraps for 3), encrypted matmul 128×784 · 784×10, ReLU on 128×10 and on 1M.
"""

from __future__ import annotations

import importlib
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

try:
    from ops.bench import side_venv
except ImportError:  # a script of CrypTen's venv, where gridq is not importable (nor, in spawned children, this folder)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    side_venv = importlib.import_module("side_venv")
    del sys.path[0]

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DEFAULT_VENV = REPO / ".venv-crypten"
CRYPTEN_REQUIREMENTS = HERE / "crypten_requirements.txt"
CRYPTEN_VERSION = "0.4.1"
STAMP_NAME = ".crypten-installed"
ENV_PYTHON = "GRIDQ_CRYPTEN_PYTHON"

SHARE, MUL, MATMUL, RELU_SMALL, RELU_1M = (
    "share 1M", "multiply 1M", "matmul 128x784·784x10", "relu 128x10", "relu 1M")

# Dated figures, for a machine where CrypTen cannot be installed: measured 2026-12-06 on this
# project's 2-core machine with this very script, CrypTen 0.4.1, 2 parties, TTP.
FALLBACK: dict[str, Any] = {
    "crypten": "0.4.1",
    "torch": None,
    "parties": 2,
    "provider": "TTP",
    "measured": "2026-12-06",
    "ms": {SHARE: 22.0, MUL: 95.0, MATMUL: 15.0, RELU_SMALL: 38.0, RELU_1M: 1499.0},
}


class CryptenUnavailable(side_venv.Unavailable):
    """CrypTen could not be run here; ``reason`` says why (one line)."""


# --------------------------------------------------------------------------- from the bench

def find_python(python: str | None = None) -> str | None:
    """The CrypTen venv's interpreter: ``python``, else $GRIDQ_CRYPTEN_PYTHON, else the repo's
    ``.venv-crypten/bin/python`` if it exists; None when there is none."""
    return side_venv.find_python(python, ENV_PYTHON, DEFAULT_VENV)


def anchor(python: str | None = None, timeout: float = 600, parties: str = "2,3") -> dict[str, Any]:
    """Run this script under CrypTen's interpreter and return its JSON; raise
    :class:`CryptenUnavailable` (with the reason) when there is no such interpreter, CrypTen does
    not import there, the run fails, or it takes longer than ``timeout`` seconds."""
    return side_venv.run_json(
        find_python(python), Path(__file__).resolve(), ["--parties", parties], name="CrypTen", timeout=timeout,
        unavailable=CryptenUnavailable, valid=lambda got: isinstance(got.get("ms"), dict),
        install=f"{DEFAULT_VENV} missing, ${ENV_PYTHON} unset: python3 {Path(__file__).relative_to(REPO)} --install")


def figures(python: str | None = None, timeout: float = 600) -> tuple[dict[str, Any], str]:
    """CrypTen's figures measured now, else :data:`FALLBACK`; with a note for the table."""
    try:
        got = anchor(python, timeout)
    except CryptenUnavailable as e:
        return FALLBACK, (f"CrypTen {FALLBACK['crypten']}, {FALLBACK['parties']} parties + TTP: "
                          f"dated figures from {FALLBACK['measured']} (not measured now: {e.reason})")
    return got, f"CrypTen {got['crypten']} (torch {got['torch']}), 2 parties + TTP, measured in this run"


# --------------------------------------------------------------------------- installer

def install(venv: str | Path | None = None, base_python: str | None = None, quiet: bool = True) -> Path:
    """Build the CrypTen venv (default ``.venv-crypten`` at the repo root) unless a stamp says it
    is already built from the same requirements; return its interpreter: torch alone first, the
    CPU build pinned; CrypTen's real runtime deps (``ops/bench/crypten_requirements.txt``);
    ``crypten --no-deps`` (so it can neither replace torch nor ask for ``sklearn``/torchvision)
    (:func:`ops.bench.side_venv.build_venv`). Raises RuntimeError."""
    return side_venv.build_venv(Path(venv) if venv else DEFAULT_VENV, Path(__file__).resolve(),
                                [CRYPTEN_REQUIREMENTS], stamp_name=STAMP_NAME, base_python=base_python, quiet=quiet,
                                then=[["--no-deps", f"crypten=={CRYPTEN_VERSION}"]])


# --------------------------------------------------------------------------- inside CrypTen's venv

def _import_crypten() -> Any:
    """``import crypten`` under torch 2.13: crypten.nn's ONNX converter imports
    ``torch.onnx._internal.registration``, which torch moved to
    ``torch.onnx._internal.torchscript_exporter.registration``; alias the old name (in this
    process only; the ONNX converter is not used here). torchvision is not imported by
    ``import crypten`` (only by the deprecated crypten.models), so it needs no stand-in."""
    import importlib
    import types

    old = "torch.onnx._internal.registration"
    try:
        importlib.import_module(old)
    except ImportError:
        try:
            sys.modules[old] = importlib.import_module("torch.onnx._internal.torchscript_exporter.registration")
        except ImportError:
            stub = types.ModuleType(old)
            stub.registry = None  # type: ignore[attr-defined]
            sys.modules[old] = stub
    import crypten

    return crypten


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _party(rank: int, parties: int, port: int, out: Any) -> None:
    """One process: a party (rank < parties) or CrypTen's TTP (rank == parties)."""
    os.environ.update({"WORLD_SIZE": str(parties), "RANK": str(rank), "DISTRIBUTED_BACKEND": "gloo",
                       "RENDEZVOUS": f"tcp://127.0.0.1:{port}", "GLOO_SOCKET_IFNAME": "lo"})
    import torch

    torch.set_num_threads(1)
    crypten = _import_crypten()
    crypten.cfg.mpc.provider = "TTP"
    if rank == parties:
        crypten.mpc.provider.TTPServer()  # inits itself; serves until party 0's uninit says terminate
        crypten.uninit()
        return
    crypten.init()
    comm = crypten.communicator.get()
    gen = torch.Generator().manual_seed(0)  # the same inputs in every party

    def timed(fn: Any, repeat: int) -> float:
        fn()  # warm-up
        times = []
        for _ in range(repeat):
            comm.barrier()
            started = time.perf_counter()
            fn()
            comm.barrier()
            times.append(time.perf_counter() - started)
        return round(statistics.median(times) * 1e3, 2)

    x1m, y1m = torch.randn(1_000_000, generator=gen), torch.randn(1_000_000, generator=gen)
    a, w = torch.randn(128, 784, generator=gen), torch.randn(784, 10, generator=gen)
    s = torch.randn(128, 10, generator=gen)
    ex, ey = crypten.cryptensor(x1m, src=0), crypten.cryptensor(y1m, src=0)
    ea, ew, es = (crypten.cryptensor(t, src=0) for t in (a, w, s))
    ms = {
        SHARE: timed(lambda: crypten.cryptensor(x1m, src=0), 3),
        MUL: timed(lambda: ex * ey, 3),
        MATMUL: timed(lambda: ea.matmul(ew), 9),
        RELU_SMALL: timed(lambda: es.relu(), 9),
        RELU_1M: timed(lambda: ex.relu(), 3),
    }
    # correctness, so that a broken install cannot pass for a fast one
    err = max(float((ex * ey).get_plain_text().sub(x1m * y1m).abs().max()),
              float(ea.matmul(ew).get_plain_text().sub(a @ w).abs().max()) / 10,
              float(ex.relu().get_plain_text().sub(x1m.clamp(min=0)).abs().max()))
    if rank == 0:
        out.put({"crypten": crypten.__version__, "torch": torch.__version__, "ms": ms, "max_error": err})
    crypten.uninit()


def _children_ticks() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (r.ru_utime + r.ru_stime) * os.sysconf("SC_CLK_TCK")


def run_parties(parties: int, timeout: float = 400) -> dict[str, Any]:
    """``parties`` processes + the TTP, spawned, with a tcp:// rendezvous on 127.0.0.1."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    t0, busy0, own0 = time.perf_counter(), side_venv.busy_ticks(), _children_ticks()
    procs = [ctx.Process(target=_party, args=(r, parties, port, out), daemon=True) for r in range(parties + 1)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    try:
        result: dict[str, Any] = out.get(timeout=timeout)
        for p in procs:
            p.join(timeout=max(1.0, deadline - time.monotonic()))
    except Exception as e:  # queue.Empty: a party died or hung
        codes = [p.exitcode for p in procs]
        raise RuntimeError(f"{parties}-party run failed (exit codes {codes}): {type(e).__name__}") from None
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    other = (side_venv.busy_ticks() - busy0) - (_children_ticks() - own0)  # the children are reaped by now
    result["load"] = round(max(0.0, other / os.sysconf("SC_CLK_TCK") / (time.perf_counter() - t0)), 2)
    if result["max_error"] > 0.05:
        raise RuntimeError(f"{parties}-party results are wrong: max error {result['max_error']}")
    return result


def main(argv: list[str]) -> int:
    parser = side_venv.cli(__doc__, "CrypTen", DEFAULT_VENV)
    parser.add_argument("--parties", default="2,3", help="party counts: 2 goes in ms, 3 in ms3")
    parser.add_argument("--quiet-wait", type=float, default=60,
                        help="before each run, wait up to this many seconds for other processes to go quiet")
    args = parser.parse_args(argv)
    done = side_venv.common_commands(args, "CrypTen", install, figures)
    if done is not None:
        return done
    try:
        crypten = _import_crypten()
        import torch
    except ImportError as e:
        print(f"crypten does not import: {e}", file=sys.stderr)
        return 3
    if args.check:
        print(json.dumps({"crypten": crypten.__version__, "torch": torch.__version__}))
        return 0

    counts = [int(n) for n in args.parties.split(",")]
    result: dict[str, Any] = {"crypten": crypten.__version__, "torch": torch.__version__,
                              "parties": counts[0], "provider": "TTP"}
    for n in counts:
        key = "ms" if n == counts[0] else f"ms{n}"
        side_venv.wait_quiet(args.quiet_wait)
        started = time.perf_counter()
        try:
            got = run_parties(n)
        except RuntimeError as e:
            if key == "ms":
                print(e, file=sys.stderr)
                return 1
            result[f"{key}_error"] = str(e)
            continue
        result[key] = got["ms"]
        result["load" + key[2:]] = got["load"]
        print(f"{n} parties + TTP: {time.perf_counter() - started:.0f} s, max error {got['max_error']:.2g}, "
              f"other processes used {got['load']:.2f} cores meanwhile", file=sys.stderr)
    print(json.dumps(result, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    # this folder holds modules (mpc.py, measure.py, …) that must not shadow anything in CrypTen's venv
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
    sys.exit(main(sys.argv[1:]))
