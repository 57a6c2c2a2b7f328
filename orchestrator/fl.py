"""Federated learning, the scientist's side: train a model where the data lives.

PySyft-style, one node at a time::

    mptr = grid.send(model, "hospital")          # nothing moves yet
    mptr.train(x_ptr, y_ptr, epochs=2, lr=0.05).wait()
    model = mptr.get()                           # the trained weights, if the node's policy releases them

and over many nodes at once, by federated averaging::

    result = grid.fit(model, data=[(x1, y1), (x2, y2), (x3, y3)], rounds=20, lr=0.05,
                      evaluate=[(x1v, y1v), (x2v, y2v)])   # optional: held-out data at the nodes
    result.model, result.history, result.evaluations

A model travels as a graph of allow-listed layers and its weights (``protocol.model``);
the node rebuilds it from the allow-list and never runs code it was sent. Each round of
``fit`` is a Celery group of training jobs, one per node, run in parallel; the round
closes when every node has answered or ``round_timeout`` has passed with at least
``min_nodes`` answers. Late answers are discarded and recorded; a dead node never stops
the run. Each node's job releases its trained weights, and its loss and accuracy, sealed
to you (the node's policy decides: an allowed user gets them, others wait for the owner's
approval of kind ``train``, and the round goes on without that node). Their average,
weighted by sample counts, becomes the new global model as the run's strategy says
(:mod:`orchestrator.strategies`: ``FedAvg()``, ``FedProx(mu=…)``, ``FedAdam(lr=…)``; or a
robust combination of the nodes' updates instead of their average: ``FedMedian()``,
``FedTrimmedAvg(beta=…)``, ``Krum(byzantine=…)``).
With ``dp=DPConfig(noise_multiplier=, max_grad_norm=, delta=)`` the nodes train by
DP-SGD and charge what their accountant says to your budget on their dataset; the weights
then leave by the DP door, without approval, and a budget that cannot cover a round
refuses it before it runs (``BudgetExhausted``). The round's loss and accuracy then reach
someone who may not see the rows only with noise, if asked for
(``DPConfig(metrics_epsilon=…)``, in the same charge); otherwise they are ``None`` in the
history, and the node says why (``withheld``). With ``secure_aggregation=True`` and two
or more ``aggregators`` (MPC pool nodes), each node sends its sample-weighted update as
additive shares, one sealed to each aggregator; each aggregator adds up its shares of the
round once and seals the sum to you: no one — you included — sees one node's update, only
their sum.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import random
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from orchestrator import mpc
from orchestrator.evaluation import Evaluation, weighted
from orchestrator.evaluation import evaluate as federated_evaluation
from orchestrator.gather import gather, pairs, same_node, seal_for
from orchestrator.history import (
    NODE_COLUMNS,
    ROUND_COLUMNS,
    History,
    RoundRecord,
    RoundSummary,
    figure,
    node_rows,
    plot_rounds,
    round_rows,
    summarize,
)
from orchestrator.pointer import DataPointer, Expression, JobTicket, submit
from orchestrator.session import Session
from orchestrator.strategies import NodeUpdate, Strategy, weighted_mean
from orchestrator.strategies import strategy as as_strategy
from protocol.codec import dtype_name
from protocol.contract import Tasks
from protocol.errors import ApprovalRequired, GridError, InvalidRequest, JobFailed, NodeUnavailable, NotFound
from protocol.messages import (
    DPConfig,
    KeepRelease,
    RawRelease,
    SecureAggregation,
    TrainConfig,
    TrainJob,
    checked,
)
from protocol.model import ModelSpec, describe_model, flatten_state, unflatten_state
from protocol.mpc.ring import FixedPoint
from protocol.mpc.wire import Aggregate, open_signed, sum_label, unpack
from protocol.plan import InputRef, TensorSpec

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)
FRAC_BITS = SecureAggregation.model_fields["frac_bits"].default  # secure aggregation's fixed point, as recorded


class ModelPointer:
    """A model sent to one node: train it there, then get the trained weights back."""

    def __init__(self, session: Session, model: torch.nn.Module, node: str) -> None:
        self._session = session
        self.node = node
        self._model = copy.deepcopy(model)
        self._spec, self._state = describe_model(self._model)  # refuse what the node would, here first
        self._kept: str | None = None  # the object id of trained weights kept at the node
        self._ticket: JobTicket | None = None

    def __repr__(self) -> str:
        where = f"trained weights kept as {self._kept}" if self._kept else "not trained yet"
        return f"<ModelPointer {self.node}: {len(self._spec.layers)} layers, {where}>"

    def train(self, x: Expression, y: Expression, dp: DPConfig | None = None, **config: Any) -> JobTicket:
        """Train at the node on ``x`` and ``y`` (pointers or expressions on that node); the
        trained weights stay there. ``config``: epochs, batch_size, lr, optimizer ("sgd",
        "adam"), momentum, weight_decay, loss ("cross_entropy", "mse"), proximal_mu, seed."""
        self._settle()
        same_node(self.node, x, y)
        start = self._kept
        weights = None if start else seal_for(self._session, self.node, flatten_state(self._state))
        job = TrainJob(model=self._spec, weights=weights, start=start, x=x.plan, y=y.plan,
                       config=checked(TrainConfig, **config), release=KeepRelease(), dp=dp)
        self._ticket = submit(self._session, self.node, job)
        return self._ticket

    def get(self, timeout: float | None = None) -> torch.nn.Module:
        """The model with its trained weights, released as the node's policy allows."""
        self._settle(timeout)
        if self._kept is None:
            raise InvalidRequest("train the model first: mptr.train(x, y, ...)")
        flat = flatten_state(self._state)
        ptr = DataPointer(self._session, self.node, InputRef(kind="object", name=self._kept),
                          TensorSpec(shape=tuple(flat.shape), dtype=dtype_name(flat.dtype)))
        self._state = unflatten_state(ptr.get(timeout=timeout), self._state)
        self._model.load_state_dict(self._state)
        return copy.deepcopy(self._model)

    def _settle(self, timeout: float | None = None) -> None:
        if self._ticket is not None:
            self._kept = self._ticket.result(timeout).name
            self._ticket = None


@dataclass
class FitResult:
    """The federated model and the run's history, one row per node and round."""

    model: torch.nn.Module
    history: list[RoundRecord] = field(default_factory=list)
    run_id: str = ""
    evaluations: list[Evaluation] = field(default_factory=list)  # with evaluate=: the global model after each round
    interrupted: bool = False  # stopped by Ctrl-C: ``model`` is the one after the last whole round

    def rounds(self) -> list[RoundSummary]:
        """Per round: nodes that answered, loss and accuracy of their trained models on their
        training data (weighted by samples: not a held-out evaluation), dropouts. Numbered
        from 0, as the history stores them (to_dataframe numbers them from 1)."""
        return summarize(self.history)

    def to_dataframe(self, by: Literal["round", "node"] = "round") -> pd.DataFrame:
        """The rounds as a pandas DataFrame, numbered from 1 as the progress bar counts them.
        ``by="round"``: one row per round — round, nodes (that answered), asked, samples,
        loss, accuracy (training, weighted by samples), eval_loss, eval_accuracy (the global
        model on held-out data, with ``evaluate=``), dropouts, dropped ("node (status)"),
        seconds (the round's slowest answer), epsilon (DP-SGD: the largest ε a node charged).
        ``by="node"``: one row per node and round — round, node, status, samples, loss,
        accuracy, seconds, epsilon, error. A withheld figure is NaN."""
        import pandas as pd

        floats: tuple[str, ...]
        ints: tuple[str, ...]
        if by == "round":
            evaluated = {r: (ev.loss, ev.accuracy) for r, ev in enumerate(self.evaluations)}
            frame = pd.DataFrame(round_rows(self.history, evaluated), columns=list(ROUND_COLUMNS))
            floats = ("loss", "accuracy", "eval_loss", "eval_accuracy", "seconds", "epsilon")
            ints = ("round", "nodes", "asked", "samples", "dropouts")
        elif by == "node":
            frame = pd.DataFrame(node_rows(self.history), columns=list(NODE_COLUMNS))
            floats, ints = ("loss", "accuracy", "seconds", "epsilon"), ("round", "samples")
        else:
            raise InvalidRequest(f"by must be 'round' or 'node', not {by!r}")
        return frame.astype({**{c: "float64" for c in floats}, **{c: "int64" for c in ints}})

    def to_csv(self, path: str | Path, by: Literal["round", "node"] = "round") -> Path:
        """Write :meth:`to_dataframe` to ``path`` as CSV (a header, then one line per row; a
        withheld figure is an empty field). Returns the path."""
        path = Path(path)
        self.to_dataframe(by).to_csv(path, index=False)
        return path

    def plot(self, path: str | Path | None = None, title: str = "") -> Figure:
        """The learning curve: loss and accuracy per round, dropouts marked (as ``gridq runs
        plot``); saved to ``path`` (PNG, SVG, PDF by its suffix) if given."""
        evaluated = {r: (ev.loss, ev.accuracy) for r, ev in enumerate(self.evaluations)}
        fig = plot_rounds(round_rows(self.history, evaluated), title or f"run {self.run_id[:12]}")
        if path is not None:
            fig.savefig(path)
        return fig


def fit(session: Session, model: torch.nn.Module, data: Sequence[tuple[Expression, Expression]], *, rounds: int,
        local_epochs: int = 1, batch_size: int = 32, lr: float = 0.01, optimizer: str = "sgd",
        loss: str = "cross_entropy", momentum: float = 0.0, strategy: Strategy | str = "fedavg",
        min_nodes: int = 1, round_timeout: float = 120.0, seed: int = 0, progress: bool = True,
        history_db: str | None = None, dp: DPConfig | None = None, secure_aggregation: bool = False,
        aggregators: Sequence[str] = (), evaluate: Sequence[tuple[Expression, Expression]] = (),
        sample_fraction: float = 1.0, min_sampled: int = 1, checkpoint_every: int = 0,
        resume: str | None = None, train: TrainConfig | None = None) -> FitResult:
    """``train`` (a TrainConfig) says how the nodes train, as the keywords local_epochs …
    momentum do (one or the other: not both); its ``seed`` and ``proximal_mu`` are the run's
    (``seed``, and the strategy's). ``sample_fraction`` of the nodes (at least ``min_sampled``
    and ``min_nodes``) train each round, drawn anew from ``seed`` and the round.
    ``checkpoint_every=N`` keeps the global model (and the strategy's state) in the history
    every N rounds and after the last; ``resume=RUN`` (its id, or a unique prefix) goes on with
    that run from its last checkpoint, up to ``rounds`` in all, as if it had not stopped.
    Ctrl-C stops the run between rounds: the round under way is dropped, the model of the
    last whole round is returned (``interrupted=True``) and the run is recorded as interrupted."""
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise InvalidRequest(f"rounds must be a whole number of at least 1, not {rounds!r}: fit trains for that many "
                             "rounds (with none, it would hand the model back untrained)")
    data = pairs(data, "fit's data")
    evaluate = pairs(evaluate, "evaluate") if evaluate else []
    server = as_strategy(strategy)
    server.check(len(data))
    if secure_aggregation and server.sees_updates:
        raise InvalidRequest(f"{type(server).__name__} combines each node's update, which secure aggregation hides "
                             "from everyone, you included: use FedAvg, FedProx or FedAdam with it")
    if not 1 <= min_nodes <= len(data):
        raise InvalidRequest(f"min_nodes must be within 1..{len(data)} (the nodes given)")
    if not 0 < sample_fraction <= 1 or not 1 <= min_sampled <= len(data):
        raise InvalidRequest(f"sample_fraction must be within (0, 1] (the share of nodes that train each round), not "
                             f"{sample_fraction}, and min_sampled within 1..{len(data)} (the nodes given), not "
                             f"{min_sampled}")
    min_sampled = max(min_sampled, min_nodes)  # a round asks at least the nodes it waits for
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 0:
        raise InvalidRequest(f"checkpoint_every must be a whole number of rounds (0: no checkpoints), "
                             f"not {checkpoint_every!r}")
    if secure_aggregation and (len(set(aggregators)) < 2 or set(aggregators) & {x.node for x, _ in data}):
        raise InvalidRequest("secure aggregation needs at least two aggregation parties (MPC pool nodes), none of "
                             "them a node whose data is trained on")
    local = _local_training(train, epochs=local_epochs, batch_size=batch_size, lr=lr, optimizer=optimizer,
                            loss=loss, momentum=momentum)
    model = copy.deepcopy(model)
    spec, state = describe_model(model)
    history = History(history_db)
    config = {"rounds": rounds, "local_epochs": local.epochs, "batch_size": local.batch_size, "lr": local.lr,
              "optimizer": local.optimizer, "loss": local.loss, "momentum": local.momentum,
              **({"weight_decay": local.weight_decay} if local.weight_decay else {}), **server.config(),
              "nodes": [x.node for x, _ in data], "min_nodes": min_nodes, "round_timeout": round_timeout, "seed": seed,
              **({"sample_fraction": sample_fraction, "min_sampled": min_sampled} if sample_fraction < 1 else {}),
              **({"checkpoint_every": checkpoint_every} if checkpoint_every else {}),
              **({"evaluated_at": [x.node for x, _ in evaluate]} if evaluate else {}),
              # how the nodes' data was protected, for `gridq runs show`
              "dp": dp.model_dump(mode="json") if dp is not None else None,
              "secure_aggregation": {"aggregators": list(aggregators), "frac_bits": FRAC_BITS}
              if secure_aggregation else None}
    if resume is None:
        server.start(model)
        run_id, first = history.start(spec, config), 0
        result = FitResult(model, [], run_id)
    else:
        run_id, first, state = _resume(history, resume, spec, config, model, server)
        result = FitResult(model, history.rounds(run_id), run_id,
                           [weighted(nodes) for _, nodes in sorted(history.evaluations(run_id).items())])
    done = first  # whole rounds so far: ``state`` is their aggregate
    try:
        with _progress(progress, rounds, first) as bar:
            for r in range(first, rounds):
                chosen = sampled(len(data), sample_fraction, min_sampled, seed, r)
                configs = [local.model_copy(update={"proximal_mu": server.proximal_mu,
                                                    "seed": seed + r * len(data) + i}) for i in chosen]
                secure = SecureAggregation(round=uuid.uuid4().hex, aggregators=list(aggregators)) \
                    if secure_aggregation else None
                records, updates, errors = _round(session, spec, state, [data[i] for i in chosen], configs, r,
                                                  round_timeout, dp, secure)
                history.record(run_id, records)
                result.history.extend(records)
                if len(updates) < min_nodes and errors and len(errors) == len(chosen):
                    raise errors[0]  # every node refused, for a reason of its own: BudgetExhausted, PermissionDenied …
                if len(updates) < min_nodes:
                    raise NodeUnavailable(f"round {r}: {len(updates)} of {len(chosen)} nodes answered within "
                                          f"{round_timeout:g} s; min_nodes is {min_nodes} "
                                          f"({'; '.join(f'{h.node}: {h.status} {h.error}' for h in records)})")
                combined = _secure_mean(session, secure, state, updates) if secure \
                    else unflatten_state(server.combine(_node_updates(records, updates)), state)
                state = server.aggregate(combined)
                done = r + 1
                summary = result.rounds()[-1]
                shown = f"round {r + 1}/{rounds}  train loss {figure(summary.loss)}  " \
                        f"train acc {figure(summary.accuracy, 3)}"
                if evaluate:  # the new global model, on held-out data at the nodes
                    ev = federated_evaluation(session, spec, state, evaluate, loss=local.loss, timeout=round_timeout,
                                              label=f"[evaluation of {session.identity.name}: round {r}]")
                    history.record_evaluation(run_id, r, ev.nodes)
                    result.evaluations.append(ev)
                    shown += f"  eval loss {figure(ev.loss)}" + (
                        f"  eval acc {ev.accuracy:.3f}" if ev.accuracy is not None else "")
                if checkpoint_every and (done % checkpoint_every == 0 or done == rounds):
                    history.save_checkpoint(run_id, r, state, server.state())
                bar.update(bar.task_ids[0], advance=1, description=f"{shown}  nodes {summary.nodes}/{len(chosen)}")
    except KeyboardInterrupt:
        # Ctrl-C: what the round under way would add is dropped (its jobs finish at the nodes, unread)
        why = f"stopped with Ctrl-C after {done} of {rounds} rounds; the model of round {done} was returned"
        history.finish(run_id, "interrupted", why)
        log.warning("grid.fit %s (run %s)", why, run_id)
        result.interrupted = True
    except Exception as exc:
        history.finish(run_id, "failed", f"{type(exc).__name__}: {exc}")
        raise
    else:
        history.finish(run_id, "done")
    model.load_state_dict(state)
    return result


def _local_training(given: TrainConfig | None, **keywords: Any) -> TrainConfig:
    """How each node trains: ``given``, or the keywords; both given (a keyword off its default) is refused."""
    if given is None:
        return checked(TrainConfig, **keywords)
    defaults = TrainConfig()
    moved = [k for k, v in keywords.items() if v != getattr(defaults, k)]
    if moved:
        raise InvalidRequest(f"fit's local training is given twice: train=TrainConfig(…) and {', '.join(moved)}; put "
                             f"{'them' if len(moved) > 1 else 'it'} in the TrainConfig")
    return given


def sampled(nodes: int, fraction: float, at_least: int, seed: int, r: int) -> list[int]:
    """The indices of the nodes that train in round ``r``: ⌈fraction·nodes⌉ of them, at least
    ``at_least``, drawn from ``seed`` and ``r`` (the same run asks the same nodes again)."""
    if fraction >= 1:
        return list(range(nodes))
    count = min(nodes, max(at_least, math.ceil(fraction * nodes)))
    return sorted(random.Random(f"gridq-sample:{seed}:{r}").sample(range(nodes), count))


def _resume(history: History, given: str, spec: ModelSpec, config: dict[str, Any], model: torch.nn.Module,
            server: Strategy) -> tuple[str, int, dict[str, torch.Tensor]]:
    """The run ``given`` names, reopened at its last checkpoint: its id, the first round to
    run, and the global model's weights then (loaded into ``model``, the strategy restored)."""
    run_id = history.resolve(given)
    last = history.checkpoint(run_id)
    if last is None:
        raise NotFound(f"run {run_id} kept no checkpoint to resume from: fit(..., checkpoint_every=N) keeps one "
                       "every N rounds")
    if history.model(run_id) != json.loads(spec.model_dump_json()):
        raise InvalidRequest(f"run {run_id} trained another model (its layers or shapes differ): resume it with the "
                             "model it started with")
    was = history.config(run_id)
    differ = [k for k in ("nodes", *server.config(), "local_epochs", "batch_size", "lr", "optimizer", "loss",
                          "momentum", "weight_decay", "seed", "sample_fraction", "secure_aggregation", "dp")
              if was.get(k) != config.get(k)]
    if differ:
        raise InvalidRequest(f"run {run_id} was asked otherwise ({', '.join(f'{k}: {was.get(k)!r}' for k in differ)}): "
                             "resume it with the same data, strategy and training settings")
    if last.round + 1 >= config["rounds"]:
        raise InvalidRequest(f"run {run_id} has {last.round + 1} rounds already: ask for more (rounds=…) to go on")
    model.load_state_dict(last.model)
    server.start(model)
    server.restore(last.strategy)
    history.reopen(run_id)
    return run_id, last.round + 1, model.state_dict()


def fedavg(like: dict[str, torch.Tensor], updates: Sequence[tuple[Any, torch.Tensor, int]]) -> dict[str, torch.Tensor]:
    """The average of flat weight vectors, weighted by the nodes' sample counts."""
    return unflatten_state(weighted_mean([NodeUpdate(str(node), flat, n) for node, flat, n in updates]), like)


def _node_updates(records: Sequence[RoundRecord], updates: Sequence[Update]) -> list[NodeUpdate]:
    """The round's updates as a strategy sees them: with each node's training loss and accuracy."""
    said = {r.node: (r.loss, r.accuracy) for r in records if r.status == "done"}
    return [NodeUpdate(node, flat, n, *said.get(node, (None, None))) for node, flat, n in updates]


def _secure_mean(session: Session, secure: SecureAggregation, like: dict[str, torch.Tensor],
                 updates: Sequence[tuple[str, dict[str, str], int]]) -> dict[str, torch.Tensor]:
    """FedAvg from the aggregation parties' sums: each adds up its shares of the nodes'
    sample-weighted updates; only the total is ever reconstructed, here."""
    if len(updates) < 2:
        raise NodeUnavailable(f"only {len(updates)} node answered this round: secure aggregation needs two at least "
                              "(one update alone is not hidden by a sum)")
    asked = [mpc.request(session, party, Tasks.MPC_AGGREGATE, Aggregate(  # every party at once, then the answers
        round=secure.round, shares={node: shares[party] for node, shares, _ in updates}))
        for party in secure.aggregators]
    total = None
    for party, pending in zip(secure.aggregators, asked, strict=True):
        reply = mpc.answer(session, pending)
        sealed = session.claim(reply.outputs[party])  # signed by the party, for this round
        part = unpack(open_signed(session.identity, session.node_key(party), sum_label(secure.round, party),
                                  sealed))[0]["sum"]
        total = part if total is None else total + part
    assert total is not None
    mean = FixedPoint(secure.frac_bits).decode(total) / sum(n for _, _, n in updates)
    return unflatten_state(mean, like)


Update = tuple[str, Any, int]  # a node, its trained weights (flat, or sealed shares by party), its sample count


def _round(session: Session, spec: ModelSpec, state: dict[str, torch.Tensor],
           data: Sequence[tuple[Expression, Expression]], configs: list[TrainConfig], r: int, timeout: float,
           dp: DPConfig | None, secure: SecureAggregation | None
           ) -> tuple[list[RoundRecord], list[Update], list[GridError]]:
    """One round: a group of training jobs, then their answers until all are in or time is up."""
    flat = flatten_state(state)
    jobs = [(x.node, TrainJob(model=spec, weights=seal_for(session, x.node, flat), x=x.plan, y=y.plan, config=config,
                              release=RawRelease(), dp=dp, secure=secure))
            for (x, y), config in zip(data, configs, strict=True)]
    answers = gather(session, jobs, timeout, f"[training job of {session.identity.name}: round {r}, {len(data)} nodes]")
    records: list[RoundRecord] = []
    updates: list[Update] = []
    errors: list[GridError] = []
    for node, (seconds, answer) in answers.items():
        if answer is None:
            records.append(RoundRecord(r, node, "late", 0, 0.0, None, timeout, "no answer within the round"))
            continue
        try:
            if isinstance(answer, GridError):
                raise answer
            reply = answer.reply()
            m = answer.metrics()
            if secure is None:
                update: Any = answer.value()
            elif set(reply.shares) == set(secure.aggregators):
                update = reply.shares
            else:
                raise JobFailed(f"node {node!r} answered without a share for each aggregation party")
        except GridError as exc:
            status = "pending_approval" if isinstance(exc, ApprovalRequired) else "failed"
            records.append(RoundRecord(r, node, status, 0, 0.0, None, seconds, f"{type(exc).__name__}: {exc}"))
            errors.append(exc)
            continue
        records.append(RoundRecord(r, node, "done", m.samples, m.loss, m.accuracy, seconds, m.withheld, m.epsilon))
        updates.append((node, update, m.samples))
    return records, updates, errors


class _NoBar:
    task_ids = [0]

    def update(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def _progress(show: bool, rounds: int, done: int = 0) -> Any:
    if not show:
        return _NoBar()
    bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TimeElapsedColumn())
    bar.add_task(f"round {done}/{rounds}", total=rounds, completed=done)
    return bar
