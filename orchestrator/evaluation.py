"""Federated evaluation: how a model does on data that stays at the nodes.

    ev = grid.evaluate(model, data=[(x1, y1), (x2, y2)])   # pointers, one (x, y) per node
    ev.loss, ev.accuracy                                   # weighted by the nodes' samples
    ev.nodes["hospital"].accuracy, ev.missing              # per node; who did not answer, why

Each node evaluates the weights sent (sealed to it) on its ``x`` and ``y`` and answers the
loss and, for classification, the accuracy, sealed to you. That is a release of what the model does on
private data, by the same door as trained weights: to an allowed user of the data, or once
the owner approves (kind ``train``). Or by the DP door, with noise (``epsilon=``, charged
to your budget on each node's dataset): the mean of each sample's loss clamped to
[0, ``loss_bound``] and the share of right answers, both noised; x and y must then be one
row per stored row of one dataset, the same rows (the privacy unit is a stored row).
``grid.fit(..., evaluate=[...])`` evaluates the global model so after every round, on
held-out data at the nodes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from orchestrator.gather import gather, pairs, seal_for
from orchestrator.history import figure, weighted_mean
from orchestrator.pointer import Expression
from orchestrator.session import Session
from protocol.errors import GridError, InvalidRequest, NodeUnavailable
from protocol.messages import DPRelease, EvalJob, RawRelease, TrainMetrics
from protocol.model import ModelSpec, flatten_state


@dataclass(frozen=True)
class Evaluation:
    """A model's loss and accuracy at the nodes, weighted by their samples, and per node."""

    loss: float | None  # None if no node's loss was a finite number
    accuracy: float | None  # None for a regression loss
    samples: int
    nodes: dict[str, TrainMetrics]
    missing: dict[str, str]  # node → why it gave no figures (late, pending approval, an error)

    def __repr__(self) -> str:
        acc = f", accuracy {self.accuracy:.4f}" if self.accuracy is not None else ""
        gone = f"; missing {sorted(self.missing)}" if self.missing else ""
        return f"Evaluation(loss {figure(self.loss)}{acc} over {self.samples} samples at {len(self.nodes)} nodes{gone})"


def evaluate(session: Session, spec: ModelSpec, state: dict[str, torch.Tensor],
             data: Sequence[tuple[Expression, Expression]], *, loss: str, timeout: float, label: str,
             release: RawRelease | DPRelease | None = None, loss_bound: float = 10.0) -> Evaluation:
    """Evaluate the weights ``state`` of the model ``spec`` at every node of ``data`` at once
    (``release``: exact figures, or with DP noise). Raises the nodes' error if none of them
    answered with figures."""
    if loss not in ("cross_entropy", "mse"):
        raise InvalidRequest(f"loss {loss!r} is not known; use 'cross_entropy' or 'mse'")
    if not 0 < loss_bound <= 1e6:
        raise InvalidRequest(f"loss_bound (each sample's loss is clamped to [0, loss_bound]) must be in (0, 1e6], "
                             f"not {loss_bound}")
    data = pairs(data, "evaluate's data")
    flat = flatten_state(state)
    jobs = [(x.node, EvalJob(model=spec, weights=seal_for(session, x.node, flat), x=x.plan, y=y.plan,
                             loss=loss, release=release or RawRelease(), loss_bound=loss_bound))  # type: ignore[arg-type]
            for x, y in data]
    nodes: dict[str, TrainMetrics] = {}
    missing: dict[str, str] = {}
    errors: list[GridError] = []
    for node, (_, answer) in gather(session, jobs, timeout, label).items():
        if answer is None:
            missing[node] = f"no answer within {timeout:g} s"
            continue
        try:
            if isinstance(answer, GridError):
                raise answer
            nodes[node] = answer.metrics()
        except GridError as exc:
            missing[node] = f"{type(exc).__name__}: {exc}"
            errors.append(exc)
    if not nodes:
        if errors:
            raise errors[0]
        raise NodeUnavailable(f"no node answered the evaluation within {timeout:g} s ({', '.join(sorted(missing))})")
    return weighted(nodes, missing)


def weighted(nodes: dict[str, TrainMetrics], missing: dict[str, str] | None = None) -> Evaluation:
    """The nodes' figures weighted by their samples (of the nodes that have them)."""
    return Evaluation(loss=weighted_mean([(m.loss, m.samples) for m in nodes.values()]),
                      accuracy=weighted_mean([(m.accuracy, m.samples) for m in nodes.values()]),
                      samples=sum(m.samples for m in nodes.values()), nodes=dict(nodes), missing=dict(missing or {}))
