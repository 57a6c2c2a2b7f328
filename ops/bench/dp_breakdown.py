"""Where a DP release's time goes at the node: ``JobRunner.answer`` run in this process on
the node's own database, raw and DP, timed phase by phase (used by :mod:`ops.bench.dp`)."""

from __future__ import annotations

import time
from pathlib import Path

from ops.bench.measure import p, phases
from ops.keys import read_identity
from protocol.contract import Tasks
from protocol.envelope import seal_envelope
from protocol.messages import DPRelease, RawRelease, RunJob
from protocol.plan import Plan
from workers.config import load_config
from workers.node import Node
from workers.policy.release import calibrate_release


def node_breakdown(config: Path, identity_path: Path, plan: Plan, n: int, *, dataset: str, rows: int,
                   epsilon: float, history_user: str) -> dict[str, dict[str, float]]:
    """The node's ``JobRunner.answer`` in this process on the same node database, raw and
    DP, p50 of each phase; ``{"raw": {step: ms}, "dp": {…}}``."""
    import protocol.dp_release as dp_release
    import protocol.serving as serving
    import workers.jobs.compute as compute
    import workers.jobs.context as context

    node = Node(load_config(config))
    me = read_identity(identity_path)
    runner = node.runner()
    bodies = {"raw": RunJob(plan=plan, release=RawRelease()).model_dump(mode="json"),
              "dp": RunJob(plan=plan, release=DPRelease(epsilon=epsilon)).model_dump(mode="json")}

    def one(kind: str) -> None:
        job_id = f"{node.id}:bench-{time.perf_counter_ns()}"
        env = seal_envelope(me, recipient=node.id, kind="run", job_id=job_id, body=bodies[kind], now=time.time())
        reply = runner.answer(Tasks.RUN_JOB, env.model_dump(mode="json"), job_id).signed
        assert reply["kind"] == "job_reply" and '"status":"done"' in reply["body"], reply

    for _ in range(10):
        one("raw")
        one("dp")
    out: dict[str, dict[str, float]] = {}
    for kind in ("raw", "dp"):
        with phases((serving, "open_envelope", "verify envelope (incl. nonce INSERT + commit)"),
                    (runner.store, "begin_job", "job row SELECT + INSERT + commit"),
                    (runner.store, "dataset_row", "dataset row SELECT (each; DP: one more per job)"),
                    (context, "validate", "validate plan on meta tensors"),
                    (compute, "calibrate_release",
                     "DP: analyse the plan + calibrate (OpenDP stability maps → Laplace scale)"),
                    (runner.node.ledger, "precheck", "DP: ledger precheck (own transaction)"),
                    (runner.node.ledger, "_check", "DP:   read the user's running totals (each; 2 per job)"),
                    (compute, "evaluate", f"raw: run plan (mean of {rows:,} rows, torch)"),
                    (compute, "run_release", "DP: run the release (row phase, aggregate, noise)"),
                    (dp_release, "aggregate", f"DP:   OpenDP clamp + mean of {rows:,} rows"),
                    (compute, "add_noise", "DP:   add Laplace noise (OpenDP sampler)"),
                    (runner.node, "seal", "seal value for requester"),
                    (runner.server, "sign", "sign reply envelope"),
                    (runner.node.ledger, "charge_with_reply",
                     "DP: ledger transaction: lock, check, charge INSERT, job UPDATE, commit"),
                    (runner.store, "finish_job", "raw: job row UPDATE + commit (reply)"),
                    (runner, "answer", "JobRunner.answer total (in-process)")) as found:
            for _ in range(n):
                one(kind)
        out[kind] = {label: p(ms, 50) for label, ms in found.items()}  # NaN: not a step of this kind
    charge = calibrate_release(plan, DPRelease(epsilon=epsilon), [node.store.dataset_row(dataset).meta]).charge
    past = runner.node.ledger.info(history_user, dataset).releases
    ms = []
    for _ in range(n // 2):
        t0 = time.perf_counter()
        runner.node.ledger.precheck(history_user, [dataset], charge, "bench")
        ms.append((time.perf_counter() - t0) * 1000)
    out["dp"][f"DP: ledger precheck, a user with {past:,} past releases"] = p(ms, 50)
    node.close()
    return out
