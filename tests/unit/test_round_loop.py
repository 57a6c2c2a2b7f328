"""The round loop of ``grid.fit`` (``orchestrator.fl.fit``, ``_round`` and ``gather``), run
against a session that lives in memory — as flwr tests its server against an in-memory
``Grid`` — with no broker: each node answers a training job at once, as the test says.

What the nodes answer is signed with their own keys, the weights and figures sealed to the
scientist, so the real code verifies and opens them as it would a worker's reply.
"""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from orchestrator import fl
from orchestrator.grid import Grid
from orchestrator.history import History
from orchestrator.pointer import DataPointer
from orchestrator.session import Answers, Job, Session
from orchestrator.transport import Transport
from protocol.codec import decode_tensor, encode_tensor
from protocol.contract import PENDING_APPROVAL
from protocol.envelope import Envelope, MemoryNonceStore, open_envelope, seal_envelope
from protocol.errors import (
    BudgetExhausted,
    GridError,
    InvalidRequest,
    NodeUnavailable,
    NotFound,
    PermissionDenied,
)
from protocol.identity import Identity, PublicIdentity
from protocol.messages import JobReply, SealedValue, TrainConfig, TrainJob, TrainMetrics, WireError
from protocol.model import flatten_state
from protocol.plan import InputRef, TensorSpec

PARK = "park"  # a node's answer: the job waits for its owner's approval
# what a node does with a training job: its trained weights and figures, an error, PARK, or None (it stays silent)
Node = Callable[[torch.Tensor, int], "tuple[torch.Tensor, TrainMetrics] | GridError | str | None"]


class MemorySession:
    """A grid in memory: its nodes answer each training job as soon as it is sent. With
    ``interrupt_in`` = r, waiting for round r's answers raises KeyboardInterrupt (Ctrl-C)."""

    def __init__(self, nodes: dict[str, Node], interrupt_in: int | None = None) -> None:
        self.identity = Identity.generate("alice")
        self.timeout = 5.0
        self.mocks: dict[tuple[str, str], torch.Tensor] = {}
        self.nodes = nodes
        self.keys = {name: Identity.generate(name) for name in nodes}
        self.interrupt_in = interrupt_in
        self.rounds = 0  # waits for a round's answers so far
        self.waited: list[float] = []  # seconds each wait took
        self.results: dict[str, dict[str, Any]] = {}  # job id → its result's meta, as the backend stores it
        self.asked: list[tuple[str, TrainConfig]] = []  # each training job sent: its node and local training
        self.blobs: dict[str, bytes] = {}
        self.nonces = MemoryNonceStore()

    @property
    def transport(self) -> Transport:
        raise AssertionError("the round loop reached for the broker's transport")

    def node_key(self, node: str) -> PublicIdentity:
        if node not in self.keys:
            raise NotFound(f"node {node!r} is not on this grid")
        return self.keys[node].public

    def send_job(self, node: str, job: Job) -> str:
        return self.send_jobs([(node, job)], ttl=600.0, label="")[node]

    def send_jobs(self, jobs: Sequence[tuple[str, Job]], *, ttl: float, label: str) -> dict[str, str]:
        ids = {node: f"{node}:{uuid.uuid4().hex}" for node, _ in jobs}
        for node, job in jobs:
            assert isinstance(job, TrainJob) and job.weights is not None and job.config.seed is not None
            self.asked.append((node, job.config))
            weights = decode_tensor(self.keys[node].unseal(base64.b64decode(job.weights.sealed or "")))
            self._answer(node, ids[node], self.nodes[node](weights, self.rounds))
        return ids

    def _answer(self, node: str, job_id: str, outcome: Any) -> None:
        status = "SUCCESS"
        if outcome is None:
            return
        if outcome == PARK:
            reply, status = JobReply(status="pending_approval"), PENDING_APPROVAL
        elif isinstance(outcome, GridError):
            error = WireError(code=outcome.code, message=outcome.message, job_id=job_id)
            reply = JobReply(status="denied" if isinstance(outcome, PermissionDenied) else "failed", error=error)
        else:
            flat, metrics = outcome
            sealed = self.identity.public.seal(encode_tensor(flat))
            reply = JobReply(status="done", value=SealedValue(sealed=base64.b64encode(sealed).decode(),
                                                              size=len(sealed)),
                             metrics=metrics.sealed_to(self.identity.public))
        env = seal_envelope(self.keys[node], recipient=self.identity.name, kind=reply.kind, job_id=job_id,
                            body=reply.model_dump(mode="json"), now=time.time())
        self.results[job_id] = {"status": status, "result": env.model_dump(mode="json")}

    def answers(self, job_ids: Sequence[str], timeout: float, also: tuple[str, ...] = ()) -> Answers:
        started = time.monotonic()
        self.rounds += 1
        if self.interrupt_in == self.rounds - 1:
            raise KeyboardInterrupt
        found = {j: (0.0, self.results[j]) for j in job_ids
                 if j in self.results and self.results[j]["status"] in ("SUCCESS", *also)}
        if len(found) < len(job_ids):  # as the backend is polled: until the time is up
            time.sleep(timeout)
        self.waited.append(time.monotonic() - started)
        return found

    def verify(self, raw: Any, node: str, job_id: str) -> Envelope:
        return open_envelope(raw, recipient=self.identity.name, keyring={node: self.node_key(node)},
                             nonces=self.nonces, delivery_id=job_id, now=time.time(), job_id=job_id)

    def leave(self, data: bytes) -> str:
        key = f"gridq:blob:{uuid.uuid4().hex}"
        self.blobs[key] = data
        return key

    def claim(self, key: str) -> bytes:
        return self.blobs.pop(key)


def test_the_memory_session_and_grid_have_every_member_of_a_session() -> None:
    members = {name for name in vars(Session) if not name.startswith("_")}
    assert {"transport", "identity", "timeout", "send_jobs", "answers", "verify"} <= members
    assert sorted(members - set(dir(MemorySession({})))) == []
    assert sorted(members - set(dir(Grid))) == []  # what takes a session takes a grid


def trained(value: float, samples: int, loss: float = 0.5) -> Node:
    """A node whose training sets every weight to ``value``, over ``samples`` rows."""
    return lambda weights, _: (torch.full_like(weights, value), TrainMetrics(samples=samples, loss=loss, accuracy=0.75))


def stepped(step: float, samples: int) -> Node:
    """A node whose training adds ``step`` to every weight it was sent."""
    return lambda weights, _: (weights + step, TrainMetrics(samples=samples, loss=1.0, accuracy=0.5))


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 2))


def data(session: MemorySession) -> list[tuple[DataPointer, DataPointer]]:
    """(x, y) pointers at each node of ``session``."""
    return [(DataPointer(session, node, InputRef(kind="dataset", name="x"), TensorSpec(shape=(8, 3), dtype="float32")),
             DataPointer(session, node, InputRef(kind="dataset", name="y"), TensorSpec(shape=(8,), dtype="int64")))
            for node in session.nodes]


def fit(session: MemorySession, tmp_path: Path, **options: Any) -> fl.FitResult:
    options = {"rounds": 1, "round_timeout": 5.0, "progress": False,
               "history_db": f"sqlite:///{tmp_path / 'runs.db'}", **options}
    return fl.fit(session, model(), data(session), **options)


def weights(m: torch.nn.Module) -> torch.Tensor:
    return flatten_state(m.state_dict())


def test_fedavg_weighs_the_nodes_updates_by_their_samples(tmp_path: Path) -> None:
    session = MemorySession({"a": trained(1.0, 10), "b": trained(4.0, 30), "c": trained(-2.0, 20)})
    result = fit(session, tmp_path)
    expected = (10 * 1.0 + 30 * 4.0 + 20 * -2.0) / 60  # 1.5; the plain mean would be 1.0
    assert torch.allclose(weights(result.model), torch.full((8,), expected))
    assert [(h.node, h.status, h.samples) for h in result.history] == [("a", "done", 10), ("b", "done", 30),
                                                                       ("c", "done", 20)]
    assert result.rounds()[0].loss == pytest.approx(0.5) and not result.interrupted


def test_each_round_starts_from_the_last_rounds_average(tmp_path: Path) -> None:
    session = MemorySession({"a": stepped(1.0, 1), "b": stepped(3.0, 3)})
    start = weights(model())
    result = fit(session, tmp_path, rounds=3)
    assert torch.allclose(weights(result.model), start + 3 * (1.0 * 1 + 3.0 * 3) / 4)


def test_a_silent_node_is_recorded_late_and_the_round_closes_at_its_timeout(tmp_path: Path) -> None:
    session = MemorySession({"a": trained(2.0, 5), "quiet": lambda *_: None})
    result = fit(session, tmp_path, round_timeout=0.3, min_nodes=1)
    assert torch.allclose(weights(result.model), torch.full((8,), 2.0))  # the round went on with a alone
    late = [h for h in result.history if h.node == "quiet"]
    assert [(h.status, h.seconds, h.error) for h in late] == [("late", 0.3, "no answer within the round")]
    assert session.waited[0] == pytest.approx(0.3, abs=0.2)


def test_fewer_answers_than_min_nodes_raise_node_unavailable_naming_the_nodes(tmp_path: Path) -> None:
    session = MemorySession({"a": trained(2.0, 5), "quiet": lambda *_: None})
    with pytest.raises(NodeUnavailable) as raised:
        fit(session, tmp_path, round_timeout=0.1, min_nodes=2)
    assert "1 of 2 nodes answered" in raised.value.message and "min_nodes is 2" in raised.value.message
    assert "quiet: late" in raised.value.message and "a: done" in raised.value.message
    assert History(f"sqlite:///{tmp_path / 'runs.db'}").runs() and _status(tmp_path)[0] == "failed"


def test_when_every_node_refuses_the_first_nodes_own_error_is_raised(tmp_path: Path) -> None:
    session = MemorySession({"a": lambda *_: BudgetExhausted("carol's budget on births is spent"),
                             "b": lambda *_: PermissionDenied("carol may not train on wards")})
    with pytest.raises(BudgetExhausted, match="carol's budget on births is spent"):
        fit(session, tmp_path, min_nodes=1)


def test_a_lone_nodes_refusal_is_raised_as_its_own_type(tmp_path: Path) -> None:
    session = MemorySession({"b": lambda *_: PermissionDenied("carol may not train on wards")})
    with pytest.raises(PermissionDenied, match="may not train on wards"):
        fit(session, tmp_path)


def test_a_refusal_among_answers_is_recorded_and_the_round_goes_on(tmp_path: Path) -> None:
    session = MemorySession({"a": trained(2.0, 5), "b": lambda *_: PermissionDenied("carol may not train on wards")})
    result = fit(session, tmp_path)
    refused = [h for h in result.history if h.node == "b"][0]
    assert refused.status == "failed" and refused.error.startswith("PermissionDenied: carol may not train on wards")
    assert torch.allclose(weights(result.model), torch.full((8,), 2.0))


def test_a_job_parked_for_approval_is_recorded_pending(tmp_path: Path) -> None:
    session = MemorySession({"a": trained(2.0, 5), "ward": lambda *_: PARK})
    result = fit(session, tmp_path, round_timeout=1.0)
    parked = [h for h in result.history if h.node == "ward"][0]
    assert parked.status == "pending_approval" and parked.error.startswith("ApprovalRequired: 'ward' parked")
    assert torch.allclose(weights(result.model), torch.full((8,), 2.0))
    assert session.waited[0] < 0.5  # every node answered (one of them: parked): no wait for the timeout


def test_ctrl_c_mid_round_returns_the_last_whole_rounds_model(tmp_path: Path) -> None:
    session = MemorySession({"a": stepped(1.0, 1), "b": stepped(3.0, 1)}, interrupt_in=2)
    start = weights(model())
    result = fit(session, tmp_path, rounds=4)
    assert result.interrupted
    assert torch.allclose(weights(result.model), start + 2 * 2.0)  # rounds 0 and 1; round 2 dropped
    assert sorted({h.round for h in result.history}) == [0, 1]
    assert _status(tmp_path) == ("interrupted", "stopped with Ctrl-C after 2 of 4 rounds; the model of round 2 "
                                                "was returned")


def test_the_history_has_one_row_per_node_and_round(tmp_path: Path) -> None:
    session = MemorySession({"a": stepped(1.0, 2), "b": stepped(2.0, 2), "quiet": lambda *_: None})
    result = fit(session, tmp_path, rounds=3, round_timeout=0.05)
    rows = [(h.round, h.node) for h in result.history]
    assert rows == [(r, n) for r in range(3) for n in ("a", "b", "quiet")]
    stored = History(f"sqlite:///{tmp_path / 'runs.db'}").rounds(result.run_id)
    assert sorted((h.round, h.node, h.status) for h in stored) == sorted(
        (h.round, h.node, h.status) for h in result.history)
    assert [s.dropped for s in result.rounds()] == [["quiet"]] * 3


def _status(tmp_path: Path) -> tuple[str, str]:
    history = History(f"sqlite:///{tmp_path / 'runs.db'}")
    (run_id, _, _), = history.runs()
    return history.status(run_id)


def test_local_training_is_a_train_config_or_keywords_and_the_run_sets_seed_and_proximal_mu(tmp_path: Path) -> None:
    from orchestrator.strategies import FedProx

    session = MemorySession({"a": trained(1.0, 10), "b": trained(2.0, 10)})
    fit(session, tmp_path, rounds=2, seed=5, strategy=FedProx(mu=0.5),
        train=TrainConfig(epochs=3, lr=0.2, weight_decay=0.01, seed=99, proximal_mu=7.0))
    assert {(c.epochs, c.lr, c.weight_decay, c.proximal_mu) for _, c in session.asked} == {(3, 0.2, 0.01, 0.5)}
    assert [(n, c.seed) for n, c in session.asked] == [("a", 5), ("b", 6), ("a", 7), ("b", 8)]  # seed + r·n + i
    with pytest.raises(InvalidRequest, match="given twice: train=TrainConfig.* and batch_size, lr; put them in"):
        fit(session, tmp_path, train=TrainConfig(), lr=0.1, batch_size=8)
    with pytest.raises(InvalidRequest):  # keywords are checked as a TrainConfig is, before the run starts
        fit(session, tmp_path, lr=-1.0)
    assert len(History(f"sqlite:///{tmp_path / 'runs.db'}").runs()) == 1


def test_a_sampled_round_asks_the_nodes_its_seed_draws_and_no_others(tmp_path: Path) -> None:
    session = MemorySession({name: trained(1.0, 10) for name in "abcd"})
    result = fit(session, tmp_path, rounds=5, seed=11, sample_fraction=0.5)
    drawn = [[sorted("abcd")[i] for i in fl.sampled(4, 0.5, 1, 11, r)] for r in range(5)]
    assert [[h.node for h in result.history if h.round == r] for r in range(5)] == drawn
    assert len(session.asked) == 10 and len({tuple(d) for d in drawn}) > 1


def test_through_the_round_loop_a_poisoned_node_drags_fedavg_but_not_the_median(tmp_path: Path) -> None:
    from orchestrator.strategies import FedMedian, FedTrimmedAvg, Krum

    nodes: dict[str, Node] = {**{f"h{i}": trained(1.0 + i / 10, 10) for i in range(4)}, "poison": trained(1e6, 10)}
    mean = weights(fit(MemorySession(nodes), tmp_path).model)
    assert (mean > 1e5).all()
    for robust in (FedMedian(), FedTrimmedAvg(beta=0.2), Krum(byzantine=1)):
        got = weights(fit(MemorySession(nodes), tmp_path, strategy=robust).model)
        assert ((1.0 <= got) & (got <= 1.3)).all(), (robust, got)


def test_the_progress_line_shows_round_nodes_loss_and_accuracy(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    session = MemorySession({"a": trained(1.0, 10, loss=0.25), "b": trained(2.0, 10, loss=0.75),
                             "quiet": lambda *_: None})
    fit(session, tmp_path, rounds=2, round_timeout=0.3, min_nodes=1, progress=True)
    shown = capsys.readouterr().out
    # the last round's line: its number, its mean loss and accuracy over the nodes that answered, how many did
    assert "round 2/2" in shown and "train loss 0.5" in shown and "train acc 0.75" in shown, shown
    assert "nodes 2/3" in shown, shown
