"""The owner's approval queue over a real node store (SQLite): parked jobs wait with what a
person needs to judge them, ids resolve by unique prefix as git's do, and a decision is final."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

import workers.policy.approvals as approvals
from protocol.errors import InvalidRequest, NotFound
from workers.policy.approvals import Parked, Requests
from workers.storage.store import Store

ENVELOPE = {"sender": "carol", "body": "signed and verified"}


@pytest.fixture
def requests(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Requests]:
    clock = iter(float(t) for t in range(1000, 2000))  # one tick per call: created_at orders the queue
    monkeypatch.setattr(approvals, "time", SimpleNamespace(time=lambda: next(clock)))
    store = Store(tmp_path, "sqlite:///" + str(tmp_path / "node.db"))
    queue = Requests(store)
    queue.park("ward:abc123", "carol", ENVELOPE, Parked("dp", ["births"], "v0 = dataset:births", "dp (ε=0.5)"))
    queue.park("ward:abd456", "dave", {}, Parked("raw", ["births", "deaths"], "v1 = max(v0)", "raw", "not allowed"))
    queue.park("clinic:abc999", "erin", {}, Parked("compute", ["visits"], "v1 = sum(v0)", "keep"))
    yield queue
    store.close()


def test_parked_signal_carries_what_the_owner_judges() -> None:
    parked = Parked("dp", ["births"], "v2 = mean(v1)", "dp (ε=0.5)", reason="manual node")
    assert isinstance(parked, Exception) and parked.args == ("dp",)
    assert (parked.kind, parked.datasets, parked.summary, parked.release, parked.reason) == (
        "dp", ["births"], "v2 = mean(v1)", "dp (ε=0.5)", "manual node")


def test_parked_requests_are_pending_in_arrival_order_with_their_envelope(requests: Requests) -> None:
    pending = requests.list("pending")
    assert [r.job_id for r in pending] == ["ward:abc123", "ward:abd456", "clinic:abc999"]
    first = requests.get("ward:abc123")
    assert (first.requester, first.kind, first.datasets, first.release) == ("carol", "dp", ["births"], "dp (ε=0.5)")
    assert first.envelope == ENVELOPE and first.status == "pending" and first.decided_at is None
    assert requests.get("ward:abd456").reason == "not allowed"


def test_parking_again_keeps_the_first_request(requests: Requests) -> None:
    requests.park("ward:abc123", "mallory", {}, Parked("raw", ["deaths"], "other", "raw"))  # a redelivery
    again = requests.get("ward:abc123")
    assert again.requester == "carol" and again.kind == "dp" and len(requests.list()) == 3


@pytest.mark.parametrize("given, whole", [
    ("ward:abc123", "ward:abc123"),
    ("ward:abc", "ward:abc123"),  # a prefix of the whole id
    ("abc1", "ward:abc123"),  # or of its hex part
    ("abd", "ward:abd456"),
    ("clinic", "clinic:abc999"),
])
def test_unique_prefixes_resolve(requests: Requests, given: str, whole: str) -> None:
    assert requests.resolve(given) == whole
    assert requests.get(given).job_id == whole


def test_an_exact_id_wins_over_longer_ids_it_prefixes(requests: Requests) -> None:
    requests.park("ward:abc", "carol", {}, Parked("dp", ["births"], "", "dp"))
    assert requests.resolve("ward:abc") == "ward:abc" and requests.resolve("ward:abc1") == "ward:abc123"
    with pytest.raises(InvalidRequest, match=r"names 3 requests \(ward:abc, ward:abc123, ward:abd456"):
        requests.resolve("ward:ab")  # …but a prefix of several stays ambiguous


@pytest.mark.parametrize("given", ["ab", "abc", "ward"])
def test_ambiguous_prefixes_are_refused_and_list_the_candidates(requests: Requests, given: str) -> None:
    with pytest.raises(InvalidRequest, match="give more of the id") as caught:
        requests.resolve(given)
    assert not isinstance(caught.value, NotFound) and "ward:abc123" in str(caught.value)


@pytest.mark.parametrize("given", ["zzz", "", "%", "_bc", "ward:abc1234"])
def test_unknown_ids_are_not_found(requests: Requests, given: str) -> None:
    with pytest.raises(NotFound, match="no request"):  # LIKE wildcards are taken literally
        requests.resolve(given)
    with pytest.raises(NotFound):
        requests.get(given)


def test_decisions_leave_the_pending_queue_and_are_final(requests: Requests) -> None:
    approved = requests.decide("abc1", "approved")
    assert (approved.job_id, approved.status, approved.decision) == ("ward:abc123", "approved", "")
    assert approved.decided_at is not None and approved.decided_at > approved.created_at
    denied = requests.decide("ward:abd", "denied", "not for this study")
    assert requests.get(denied.job_id).decision == "not for this study"
    assert [r.job_id for r in requests.list()] == ["clinic:abc999"]
    assert [(r.job_id, r.status) for r in requests.list(None)] == [
        ("ward:abc123", "approved"), ("ward:abd456", "denied"), ("clinic:abc999", "pending")]
    assert [r.job_id for r in requests.list("denied")] == ["ward:abd456"]
    with pytest.raises(InvalidRequest, match="ward:abc123 was already approved"):
        requests.decide("ward:abc123", "denied")
    assert requests.get("ward:abc123").status == "approved"  # the refused decision changed nothing
    with pytest.raises(NotFound):
        requests.decide("nope", "approved")
    with pytest.raises(InvalidRequest, match="approved or denied, not 'aproved'"):
        requests.decide("clinic:abc999", "aproved")
    assert requests.get("clinic:abc999").status == "pending"


def test_pending_requests_survive_a_restart(requests: Requests, tmp_path: Path) -> None:
    reopened = Store(tmp_path, "sqlite:///" + str(tmp_path / "node.db"))
    try:
        assert [r.job_id for r in Requests(reopened).list()] == ["ward:abc123", "ward:abd456", "clinic:abc999"]
    finally:
        reopened.close()
