"""Issue 14, point 3 for model jobs: a training's or an evaluation's figures leave by a
door (raw, approved, DP) or not at all; DP-SGD's privacy unit is a stored row; training on
private data fails without quoting it, and where its figures stay closed it does not fail.
The node's JobRunner in this process, on a real store (SQLite), no broker."""

from __future__ import annotations

import base64
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from orchestrator.pointer import DataPointer, Expression
from protocol.codec import encode_tensor
from protocol.contract import Tasks
from protocol.envelope import MemoryNonceStore, open_envelope, seal_envelope
from protocol.errors import SensitivityUnknown
from protocol.identity import Identity
from protocol.interpret import validate
from protocol.messages import (
    DatasetMeta,
    DPConfig,
    DPRelease,
    EvalJob,
    JobReply,
    KeepRelease,
    RawRelease,
    SealedValue,
    TrainConfig,
    TrainJob,
    TrainMetrics,
)
from protocol.model import describe_model, flatten_state
from protocol.plan import InputRef, Plan, Ref, Step, TensorSpec
from protocol.serving import Answer
from workers.config import ApprovalSection, BudgetSection
from workers.jobs.context import NodeContext
from workers.jobs.runner import JobRunner
from workers.jobs.training import dp_charge, train
from workers.policy.ledger import Ledger
from workers.storage.store import Store

NODE = Identity.generate("ward")
ALICE, BOB = Identity.generate("alice"), Identity.generate("bob")
KEYS = {"alice": ALICE, "bob": BOB}
ROWS = 64
SECRET = 4.25  # row 3's first value: what a one-weight model's loss would give away


def table() -> torch.Tensor:
    """Two features, then a label in 0..2."""
    g = torch.Generator().manual_seed(0)
    t = torch.cat([torch.rand(ROWS, 2, generator=g) * 5, torch.randint(0, 3, (ROWS, 1), generator=g)], 1)
    t[3, 0] = SECRET
    return t


TABLES = {"table": table(), "other": table().flip(0), "bad": table()}
TABLES["bad"][5, 2] = 3790.0  # a label no 3-class model has


@pytest.fixture
def made(tmp_path: Path) -> Iterator[tuple[JobRunner, Store]]:
    jobs, store = runner(tmp_path, ApprovalSection())
    yield jobs, store
    store.close()


def runner(tmp_path: Path, approval: ApprovalSection) -> tuple[JobRunner, Store]:
    store = Store(tmp_path / "store", f"sqlite:///{tmp_path / 'node.db'}")
    for name, data in TABLES.items():
        store.put_dataset(meta(name), data, ["alice"], None)
    node = NodeContext("ward", NODE, {n: i.public for n, i in KEYS.items()}, store,
                      Ledger(store, "ward", BudgetSection(default_epsilon=10.0)), approval, lambda b: pytest.fail(),
                      lambda k: pytest.fail(), lambda n: pytest.fail())
    return JobRunner(node), store


def meta(name: str) -> DatasetMeta:
    return DatasetMeta(node="ward", name=name, shape=(ROWS, 3), dtype="float32")


def ptr(name: str = "table") -> DataPointer:
    return DataPointer(None, "ward", InputRef(kind="dataset", name=name),  # type: ignore[arg-type]
                       TensorSpec(shape=(ROWS, 3), dtype="float32"), meta(name))


def weights(model: nn.Module) -> SealedValue:
    sealed = NODE.public.seal(encode_tensor(flatten_state(model.state_dict())))
    return SealedValue(sealed=base64.b64encode(sealed).decode(), size=len(sealed))


def classifier() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 3))


def training(x: Expression | Plan, y: Expression | Plan, model: nn.Module | None = None, **fields: Any) -> TrainJob:
    model = model or classifier()
    spec, _ = describe_model(model)
    return TrainJob(model=spec, weights=weights(model), x=x if isinstance(x, Plan) else x.plan,
                    y=y if isinstance(y, Plan) else y.plan, **fields)


def send(jobs: JobRunner, body: Any, who: str = "bob", job_id: str = "ward:job-1") -> Answer:
    env = seal_envelope(KEYS[who], recipient="ward", kind=body.kind, job_id=job_id,
                        body=body.model_dump(mode="json"), now=time.time())
    return jobs.answer(Tasks.RUN_JOB, env.model_dump(mode="json"), job_id)


def read(answer: Answer, who: str = "bob") -> tuple[JobReply, TrainMetrics | None]:
    env = open_envelope(answer.signed, recipient=who, keyring={"ward": NODE.public}, nonces=MemoryNonceStore(),
                        delivery_id="d", now=time.time())
    reply = JobReply.model_validate(env.body_json())
    return reply, reply.metrics.open(KEYS[who]) if reply.metrics is not None else None


def one_weight_attack() -> TrainJob:
    """The issue's attack: a one-weight model at 0, trained by a step of nothing, on x = 0 and
    y = row 3's value; its MSE loss is that value squared."""
    t = ptr()
    model = nn.Sequential(nn.Linear(1, 1, bias=False))
    nn.init.zeros_(model[0].weight)
    return training(t[3:4, 0:1] * 0.0, t[3:4, 0:1], model, config=TrainConfig(loss="mse", lr=1e-9))


# --- 1. figures leave by a door ----------------------------------------------------------------

def test_a_user_who_may_not_see_the_rows_gets_no_figure_of_them(made: tuple[JobRunner, Store]) -> None:
    reply, figures = read(send(made[0], one_weight_attack()))
    assert reply.status == "done" and reply.ticket is not None  # the weights are kept: computing is allowed
    assert figures is not None and figures.samples == 1
    assert figures.loss is None and figures.accuracy is None and figures.seconds == 0.0
    assert "closed to bob" in figures.withheld and "metrics_epsilon" in figures.withheld
    # an allowed user asking the same gets them: the attack's figure is exactly the secret squared
    reply, figures = read(send(made[0], one_weight_attack(), who="alice", job_id="ward:job-2"), who="alice")
    assert figures is not None and figures.loss is not None and math.sqrt(figures.loss) == pytest.approx(SECRET)


def test_an_approved_job_releases_the_figures_with_the_weights(tmp_path: Path) -> None:
    jobs, store = runner(tmp_path, ApprovalSection(default="manual", auto=[]))
    t = ptr()
    for job_id, release in (("ward:keep", KeepRelease()), ("ward:raw", RawRelease())):
        assert send(jobs, training(t[:, :2], t[:, 2], release=release), job_id=job_id).parked
        (request,) = [r for r in jobs.requests.list("pending") if r.job_id == job_id]
        assert "loss and accuracy" in request.release and "bob" in request.release
        jobs.requests.decide(job_id, "approved")
        _, figures = read(Answer(jobs.run_approved(job_id)))
        assert figures is not None and figures.loss is not None and figures.accuracy is not None
    store.close()


# --- 2. DP-SGD: figures only with noise, one charge ----------------------------------------------

DP = DPConfig(noise_multiplier=2.0, max_grad_norm=1.0, delta=1e-7)
CONFIG = TrainConfig(batch_size=16, lr=0.1)


def test_dp_sgd_withholds_its_figures_unless_asked_for_with_noise(made: tuple[JobRunner, Store]) -> None:
    jobs, _ = made
    t = ptr()
    sgd = dp_charge(CONFIG, DP, ROWS).epsilon
    _, plain = read(send(jobs, training(t[:, :2], t[:, 2], config=CONFIG, release=RawRelease(), dp=DP)))
    assert plain is not None and plain.loss is None and plain.accuracy is None and "noise" in plain.withheld
    assert plain.epsilon == pytest.approx(sgd)
    asked = DP.model_copy(update={"metrics_epsilon": 0.2})
    reply, noisy = read(send(jobs, training(t[:, :2], t[:, 2], config=CONFIG, release=RawRelease(), dp=asked),
                             job_id="ward:job-2"))
    assert reply.status == "done" and reply.value is not None
    assert noisy is not None and noisy.loss is not None and noisy.accuracy is not None and not noisy.withheld
    # 0/1 hits averaged over 64 rows, plus Laplace noise of scale ~0.8: beyond 3 it went 2% of runs (a flaky
    # bound); beyond 0.8·ln(1e9) ≈ 16.6 it goes once in 10^9
    tail = 0.8 * math.log(1e9)
    assert 0.0 - tail < noisy.accuracy < 1.0 + tail
    assert noisy.epsilon == pytest.approx(sgd + 0.2)  # one charge: DP-SGD's ε plus the figures'
    assert jobs.node.ledger.info("bob", "table").spent_epsilon == pytest.approx(sgd + sgd + 0.2)


def test_the_budget_covers_training_and_figures_before_training(made: tuple[JobRunner, Store]) -> None:
    jobs, _ = made
    t = ptr()
    sgd = dp_charge(CONFIG, DP, ROWS).epsilon
    assert sgd < 10.0
    greedy = DP.model_copy(update={"metrics_epsilon": 10.0 - sgd + 0.01})
    reply, _ = read(send(jobs, training(t[:, :2], t[:, 2], config=CONFIG, release=RawRelease(), dp=greedy)))
    assert reply.error is not None and reply.error.code == "budget_exhausted"
    assert jobs.node.ledger.info("bob", "table").spent_epsilon == 0.0


# --- 3. DP-SGD's privacy unit is a stored row ----------------------------------------------------

def copies(row: Expression) -> Plan:
    """``row`` joined to itself along the rows 4,096 times: 16 × 16 × 16, in three steps (a
    step takes 16 arguments; an expression would repeat its steps for each copy)."""
    steps = list(row.plan.steps)
    for _ in range(3):
        steps.append(Step(op="cat", args=[Ref(ref=len(steps))] * 16, params={"dim": 0}))
    return Plan(inputs=row.plan.inputs, steps=steps)


@pytest.mark.parametrize("case", ["one row 4,096 times", "shifted", "two datasets", "kept weights"])
def test_dp_sgd_refuses_what_is_not_one_sample_per_stored_row(made: tuple[JobRunner, Store], case: str) -> None:
    jobs, _ = made
    t, o = ptr(), ptr("other")
    if case == "one row 4,096 times":
        x, y = copies(t[0:1, :2]), copies(t[0:1, 2])
        assert validate(x, [TensorSpec(shape=(ROWS, 3), dtype="float32")])[-1].shape == (4096, 2)
        body, said = training(x, y, dp=DP), "cat"
    elif case == "shifted":
        body, said = training(t[1:, :2], t[:-1, 2], dp=DP), "same stored row"
    elif case == "two datasets":
        body, said = training(t[:, :2], o[:, 2], dp=DP), "same stored row"
    else:  # weights bob trained here without DP, on the same rows, and kept
        kept = read(send(jobs, training(t[:, :2], t[:, 2]), job_id="ward:job-0"))[0].ticket
        assert kept is not None
        spec, _ = describe_model(classifier())
        body = TrainJob(model=spec, start=kept.object_id, x=t[:, :2].plan, y=t[:, 2].plan, release=RawRelease(),
                        dp=DP)
        said = "trained without DP on these same rows"
    reply, _ = read(send(jobs, body))
    assert reply.error is not None and reply.error.code == SensitivityUnknown.code and said in reply.error.message
    assert jobs.node.ledger.info("bob", "table").spent_epsilon == 0.0


# --- 4. DP-SGD does not fail or go NaN on the data -----------------------------------------------

def test_dp_sgd_zeroes_non_finite_per_sample_gradients() -> None:
    x, y = torch.randn(40, 2), torch.randint(0, 3, (40,))
    x[7, 0] = float("nan")  # one row's NaN would make every weight NaN through the clipped sum
    model = classifier()
    train(model, x, y, TrainConfig(batch_size=40, epochs=3, lr=0.1), DP)
    assert torch.isfinite(flatten_state(model.state_dict())).all()


# --- 5. errors carry no data -------------------------------------------------------------------

def test_a_failure_on_private_labels_does_not_quote_them(made: tuple[JobRunner, Store]) -> None:
    jobs, _ = made
    b = ptr("bad")
    answer = send(jobs, training(b[:, :2], b[:, 2], release=RawRelease()), who="alice")
    reply, _ = read(answer, who="alice")
    assert reply.status == "failed" and reply.error is not None and "class indices 0 … 2" in reply.error.message
    assert "3790" not in json.dumps(answer.signed)
    spec, _ = describe_model(classifier())
    evaluation = EvalJob(model=spec, weights=weights(classifier()), x=b[:, :2].plan, y=b[:, 2].plan)
    answer = send(jobs, evaluation, who="alice", job_id="ward:job-2")
    assert read(answer, who="alice")[0].status == "failed" and "3790" not in json.dumps(answer.signed)


@pytest.mark.parametrize("dp", [None, DP])
def test_training_whose_figures_stay_closed_is_total(made: tuple[JobRunner, Store], dp: DPConfig | None) -> None:
    """Whether it fails would tell bob that a label is out of range: it does not fail."""
    b = ptr("bad")
    answer = send(made[0], training(b[:, :2], b[:, 2], release=KeepRelease(), dp=dp))
    reply, figures = read(answer)
    assert reply.status == "done" and figures is not None and figures.loss is None
    assert "3790" not in json.dumps(answer.signed) + figures.model_dump_json()
    assert figures.epsilon is None and made[0].node.ledger.info("bob", "bad").spent_epsilon == 0.0  # kept: free


# --- evaluation by the DP door -----------------------------------------------------------------

def test_an_evaluation_by_the_dp_door_is_noisy_and_charged(made: tuple[JobRunner, Store]) -> None:
    jobs, _ = made
    t = ptr()
    spec, _ = describe_model(classifier())
    body = EvalJob(model=spec, weights=weights(classifier()), x=t[:, :2].plan, y=t[:, 2].plan,
                   release=DPRelease(epsilon=0.3), loss_bound=5.0)
    reply, figures = read(send(jobs, body))
    assert reply.status == "done" and figures is not None and figures.loss is not None
    assert figures.accuracy is not None and figures.epsilon == pytest.approx(0.3)
    assert jobs.node.ledger.info("bob", "table").spent_epsilon == pytest.approx(0.3)
    shifted = body.model_copy(update={"x": t[1:, :2].plan, "y": t[:-1, 2].plan})
    reply, _ = read(send(jobs, shifted, job_id="ward:job-2"))
    assert reply.error is not None and reply.error.code == SensitivityUnknown.code


def test_private_figures_are_bounded_means_with_their_sensitivity() -> None:
    from workers.policy.figures import figures_charge, private, sensitivity

    l1, l2 = sensitivity(ROWS, 10.0, classification=True)
    assert l1 == pytest.approx(10.0 / ROWS + 1.0 / ROWS, rel=1e-6)  # one row replaced: its loss, its hit
    assert l2 == pytest.approx(math.hypot(10.0 / ROWS, 1.0 / ROWS), rel=1e-6)
    x, y = TABLES["bad"][:, :2], TABLES["bad"][:, 2]  # row 5's label is no class: a miss of loss 10
    model = classifier()
    with torch.no_grad():
        out = model(x)
    each = torch.nn.functional.cross_entropy(out, y.long().clamp(0, 2), reduction="none").clamp(0, 10.0)
    each[5] = 10.0
    hits = (out.argmax(1) == y.long()).double()
    charge = figures_charge(ROWS, 10.0, True, epsilon=100.0)  # a scale of ~0.002: the noise stays small
    figures = private(model, x, y, "cross_entropy", 10.0, charge)
    assert figures.loss == pytest.approx(float(each.mean()), abs=0.05)
    assert figures.accuracy == pytest.approx(float(hits.mean()), abs=0.05)
    assert figures.epsilon == pytest.approx(100.0) and figures.samples == ROWS
