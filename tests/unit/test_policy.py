"""The release policy and the approval policy, as pure functions: which door a job leaves
by, which jobs wait for the owner."""

from __future__ import annotations

import pytest

from protocol.errors import PermissionDenied
from protocol.messages import DPRelease, KeepRelease, RawRelease
from workers.config import ApprovalSection, UserApproval
from workers.policy.doors import Source, authorize, job_kind

SOURCES = [Source("births", ["alice"]), Source("deaths", ["alice", "bob"])]
AUTO = ApprovalSection()
MANUAL = ApprovalSection(default="manual", auto=["raw_if_allowed"], users={"bob": UserApproval(auto=["dp"])})


@pytest.mark.parametrize("user, release, kind", [
    ("alice", KeepRelease(), "compute"),
    ("alice", RawRelease(), "raw_if_allowed"),
    ("bob", RawRelease(), "raw"),  # allowed on deaths, not on births: every input must allow
    ("carol", DPRelease(epsilon=1.0), "dp"),
])
def test_job_kinds(user: str, release, kind: str) -> None:  # type: ignore[no-untyped-def]
    assert job_kind(user, release, SOURCES) == kind


@pytest.mark.parametrize("approval, user, release, door", [
    (AUTO, "alice", RawRelease(), "raw"),
    (AUTO, "carol", KeepRelease(), "keep"),
    (AUTO, "carol", DPRelease(epsilon=1.0), "dp"),
    (MANUAL, "alice", RawRelease(), "raw"),
    (MANUAL, "alice", KeepRelease(), "park"),  # compute is not in the manual node's auto list
    (MANUAL, "carol", RawRelease(), "park"),  # the approved door: the owner decides
    (MANUAL, "carol", DPRelease(epsilon=1.0), "park"),
    (MANUAL, "bob", DPRelease(epsilon=1.0), "dp"),  # bob's own list
    (MANUAL, "bob", RawRelease(), "park"),  # raw for a non-allowed user is never automatic
])
def test_doors(approval: ApprovalSection, user: str, release, door: str) -> None:  # type: ignore[no-untyped-def]
    assert authorize(user, release, SOURCES, "n", approval) == door


def test_an_automatic_node_refuses_raw_values_to_others_and_says_what_to_do() -> None:
    with pytest.raises(PermissionDenied, match=r"'carol'.*births, deaths.*epsilon.*request_access"):
        authorize("carol", RawRelease(), SOURCES, "n", AUTO)


def test_approved_jobs_leave_by_the_approved_door() -> None:
    assert authorize("carol", RawRelease(), SOURCES, "n", MANUAL, approved=True) == "approved"
    assert authorize("carol", RawRelease(), SOURCES, "n", AUTO, approved=True) == "approved"
    assert authorize("carol", DPRelease(epsilon=1.0), SOURCES, "n", MANUAL, approved=True) == "dp"


def test_raw_and_access_can_never_be_listed_as_automatic() -> None:
    with pytest.raises(ValueError):
        ApprovalSection(auto=["raw"])  # type: ignore[list-item]
    with pytest.raises(ValueError):
        ApprovalSection(auto=["access"])  # type: ignore[list-item]
