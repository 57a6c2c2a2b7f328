"""The release policy (ARCHITECTURE.md §6) as a matrix: for each kind of release and each
kind of user, the outcome the policy specifies — on an automatic node (the hospital) and,
for approved and denied requests, on a manual-approval node (see test_approvals)."""

from __future__ import annotations

import time

import pytest
import torch

from ops.local import LocalGrid
from orchestrator import Grid
from protocol import errors

DATA = torch.tensor([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [4.0, 40.0]])

# release → user → expected outcome (a kind of answer, or the error type)
MATRIX = {
    "keep": {"allowed": "pointer", "not allowed": "pointer", "unknown": errors.UnknownSender},
    "raw": {"allowed": "exact", "not allowed": errors.PermissionDenied, "unknown": errors.UnknownSender},
    "dp": {"allowed": "noisy", "not allowed": "noisy", "unknown": errors.UnknownSender},
}
USERS = {"allowed": "alice", "not allowed": "carol", "unknown": "mallory"}


@pytest.fixture(scope="module")
def matrix_data(local_grid: LocalGrid):  # type: ignore[no-untyped-def]
    import os

    from ops.local import NODE_CONFIGS
    from workers import Node

    os.environ.update({"GRIDQ_HOME": str(local_grid.home), "GRIDQ_BROKER": local_grid.url})
    node = Node.from_config(NODE_CONFIGS / "hospital.toml")
    node.publish("matrix", DATA, columns=["a", "b"], tags=["#matrix"], allowed_users=["alice"],
                 bounds={"a": (0.0, 5.0), "b": (0.0, 50.0)})
    node.close()
    with local_grid.connect("alice") as grid:
        deadline = time.monotonic() + 10
        while "hospital" not in grid.search("#matrix") and time.monotonic() < deadline:
            time.sleep(0.05)


def _outcome(grid: Grid, release: str) -> str:
    data = grid.search("#matrix")["hospital"][0]
    expr = data["a"].mean()
    if release == "keep":
        return "pointer" if expr.submit().result().kind == "object" else "?"
    if release == "raw":
        return "exact" if torch.equal(expr.get(), DATA[:, 0].mean()) else "?"
    value = expr.get(epsilon=0.5)
    return "noisy" if value.noise.scale == pytest.approx(5.0 / 4 / 0.5) else "?"


@pytest.mark.parametrize("release", list(MATRIX))
@pytest.mark.parametrize("user", list(USERS))
def test_release_policy_matrix(local_grid: LocalGrid, matrix_data, release: str, user: str):
    expected = MATRIX[release][user]
    with local_grid.connect(USERS[user]) as grid:
        if isinstance(expected, str):
            assert _outcome(grid, release) == expected
        else:
            with pytest.raises(expected):
                _outcome(grid, release)


def _submit(grid: Grid, release: str):  # type: ignore[no-untyped-def]
    expr = grid.search("#ward-matrix")["ward"][0]["a"].mean()
    return expr.submit(epsilon=0.5) if release == "dp" else (
        expr.submit() if release == "keep" else grid.submit("ward", _raw_job(expr)))


def _raw_job(expr):  # type: ignore[no-untyped-def]
    from protocol.messages import RawRelease, RunJob

    return RunJob(plan=expr.plan, release=RawRelease())


@pytest.mark.parametrize("release, approved_outcome", [("keep", "pointer"), ("raw", "exact"), ("dp", "noisy")])
@pytest.mark.parametrize("decision", ["approved", "denied"])
def test_approved_and_denied_requests(local_grid: LocalGrid, ward, release: str, approved_outcome: str,
                                      decision: str, monkeypatch: pytest.MonkeyPatch):
    from workers import Node

    monkeypatch.setenv("GRIDQ_HOME", str(local_grid.home))
    monkeypatch.setenv("GRIDQ_BROKER", local_grid.url)
    owner = Node.from_config(ward)
    try:
        if "ward-matrix" not in [d.name for d in owner.datasets()]:
            owner.publish("ward-matrix", DATA, columns=["a", "b"], tags=["#ward-matrix"], allowed_users=["alice"],
                          bounds=(0.0, 50.0))
        with local_grid.connect("carol") as grid:  # not an allowed user of ward-matrix
            deadline = time.monotonic() + 10
            while "ward" not in grid.search("#ward-matrix") and time.monotonic() < deadline:
                time.sleep(0.05)
            ticket = _submit(grid, release)
            while ticket.id not in [r.job_id for r in owner.requests()]:
                assert time.monotonic() < deadline + 20, "the job was never parked"
                time.sleep(0.05)
            if decision == "denied":
                owner.deny(ticket.id, "no")
                with pytest.raises(errors.RequestDenied):
                    ticket.wait(timeout=30)
                return
            owner.approve(ticket.id)
            reply = ticket.reply(timeout=30)
            outcome = ("pointer" if reply.ticket else "noisy" if reply.noise else
                       "exact" if torch.equal(ticket.value(), DATA[:, 0].mean()) else "?")
            assert outcome == approved_outcome
    finally:
        owner.close()
