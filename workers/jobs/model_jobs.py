"""Jobs that run a model on a node's data: training (one federated round's local work) and
evaluation. Models come as allow-listed layer specs, never as code. The weights leave by
the release policy's door; the figures (loss, accuracy) by theirs (:mod:`workers.policy.figures`)."""

from __future__ import annotations

import torch

from protocol.codec import decode_tensor
from protocol.dp import Charge
from protocol.errors import InvalidRequest, SensitivityUnknown
from protocol.interpret import evaluate
from protocol.messages import (
    DPRelease,
    EvalJob,
    JobReply,
    JobStatus,
    KeepRelease,
    RawRelease,
    SecureAggregation,
    TrainJob,
    TrainMetrics,
)
from protocol.model import flatten_state, load_state, unflatten_state
from protocol.mpc.ring import FixedPoint
from protocol.mpc.sharing import share
from protocol.mpc.wire import aggregation_label, pack, seal_signed
from protocol.plan import Plan
from workers.jobs.context import Job, NodeContext, Outcome, describe
from workers.jobs.training import Models, dp_charge, score, train
from workers.policy import figures
from workers.policy.approvals import Parked
from workers.policy.doors import Door, Source, job_kind
from workers.policy.release import PendingCharge


class ModelJobs:
    def __init__(self, node: NodeContext) -> None:
        self.node = node
        self.models = Models()

    def train(self, job: Job, body: TrainJob) -> Outcome:
        """Train the model on (x, y) here; keep the weights, or release them by the policy's
        door — with DP-SGD, the DP door, charged to the budget (checked before training).
        The figures leave by their own door, or are withheld."""
        node = self.node
        x_inputs, y_inputs, sources = node.xy_inputs(body, job.requester)
        kept = self._start(job, body, sources)
        datasets = sorted({s.dataset for s in sources})
        if body.dp is not None:  # DP-SGD's privacy unit is a stored row: sample i is stored row i
            figures.sample_rows(body.x, body.y, self._metas)
        x, y = evaluate(body.x, x_inputs), evaluate(body.y, y_inputs)
        charge, noise = self._charges(body, len(x))
        release = body.release if charge is None or (isinstance(body.release, KeepRelease) and noise is None) else \
            DPRelease(epsilon=max(charge.epsilon, 1e-12), delta=charge.delta)
        door = node.door(job, release, sources, training=True)
        if door is Door.PARK:
            raise Parked(job_kind(job.requester, release, sources, training=True), datasets,
                         f"train a model of {len(body.model.layers)} layers, {body.config.epochs} epoch(s), on\n"
                         f"x: {body.x.describe()}\ny: {body.y.describe()}", _released(job, body, release))
        if door is not Door.DP:
            charge = None  # DP-SGD's weights kept here, figures not asked for: nothing leaves, nothing is charged
        shown = figures.door(job.requester, job.approved or door is Door.APPROVED, body.dp, sources)
        with self.models.lend(body.model, give_back=body.dp is None) as model:
            if kept is None:  # sealed weights are taken from the broker only now: a parked job finds them once approved
                if body.weights is None:
                    raise InvalidRequest("a training job sends its starting weights, or names kept ones (start)")
                kept = decode_tensor(node.unseal(body.weights))
            load_state(model, unflatten_state(kept, model.state_dict()))
            if charge is not None:
                node.ledger.precheck(job.requester, datasets, charge, job.job_id)  # exhausted: refused before work
            metrics = train(model, x, y, body.config, body.dp, strict=shown in (Door.RAW, Door.APPROVED))
            if shown is Door.DP and body.dp is not None and noise is not None:
                metrics = figures.private(model, x, y, body.config.loss, body.dp.loss_bound, noise)
            trained = flatten_state(model.state_dict())
        metrics = self._figures(job, body, sources, shown, metrics, charge)
        sealed = metrics.sealed_to(node.keyring[job.requester])  # for the requester only
        if isinstance(body.release, KeepRelease):
            reply = JobReply(status=JobStatus.DONE, ticket=node.keep(job, trained, datasets), metrics=sealed)
        elif body.secure is not None:
            reply = JobReply(status=JobStatus.DONE, shares=self._shares(job, body.secure, trained, metrics.samples),
                             metrics=sealed)
        else:
            reply = JobReply(status=JobStatus.DONE, value=node.seal(job.requester, trained), metrics=sealed)
        return Outcome(reply, PendingCharge(datasets, charge) if charge is not None else None)

    def evaluate(self, job: Job, body: EvalJob) -> Outcome:
        """The weights' loss and accuracy on (x, y) here: figures of private rows, released
        by the door trained weights would leave by, or with DP noise if asked for."""
        node = self.node
        x_inputs, y_inputs, sources = node.xy_inputs(body, job.requester)
        datasets = sorted({s.dataset for s in sources})
        door = node.door(job, body.release, sources, training=True)
        if door is Door.PARK:
            raise Parked(job_kind(job.requester, body.release, sources, training=True), datasets,
                         f"evaluate a model of {len(body.model.layers)} layers ({body.loss} loss) on\n"
                         f"x: {body.x.describe()}\ny: {body.y.describe()}",
                         describe(body.release) + " loss and accuracy")
        charge = None
        if isinstance(body.release, DPRelease):
            figures.sample_rows(body.x, body.y, self._metas)
        x, y = evaluate(body.x, x_inputs), evaluate(body.y, y_inputs)
        if isinstance(body.release, DPRelease):
            charge = figures.figures_charge(len(x), body.loss_bound, body.loss == "cross_entropy",
                                            body.release.epsilon, body.release.delta)
            node.ledger.precheck(job.requester, datasets, charge, job.job_id)
        with self.models.lend(body.model) as model:
            load_state(model, unflatten_state(decode_tensor(node.unseal(body.weights)), model.state_dict()))
            metrics = figures.private(model, x, y, body.loss, body.loss_bound, charge) if charge is not None else \
                score(model, x, y, body.loss)
        reply = JobReply(status=JobStatus.DONE, metrics=metrics.sealed_to(node.keyring[job.requester]))
        return Outcome(reply, PendingCharge(datasets, charge) if charge is not None else None)

    def _start(self, job: Job, body: TrainJob, sources: list[Source]) -> torch.Tensor | None:
        """Weights trained and kept here to continue from (they carry their datasets), if named."""
        if body.start is None:
            return None
        if body.dp is not None:
            raise SensitivityUnknown(
                f"DP-SGD does not start from weights kept at the node ({body.start}): they may have been trained "
                "without DP on these same rows, which its guarantee does not cover. Send the starting weights: "
                "grid.send(model, node).train(x, y, dp=…), or grid.fit(…, dp=…)")
        obj, kept = self.node.store.object(body.start, job.requester)
        sources.extend(self.node.sources(obj.sources))
        return kept

    def _charges(self, body: TrainJob, samples: int) -> tuple[Charge | None, Charge | None]:
        """DP-SGD's charge — its accountant's (ε, δ), plus the private figures' ε if asked
        for (basic composition: one charge) — and the figures' noise; None without DP-SGD."""
        if body.dp is None:
            return None, None
        if not body.dp.metrics_epsilon:
            return dp_charge(body.config, body.dp, samples), None
        noise = figures.figures_charge(samples, body.dp.loss_bound, body.config.loss == "cross_entropy",
                                       body.dp.metrics_epsilon)
        return dp_charge(body.config, body.dp, samples, also_epsilon=noise.epsilon), noise

    @staticmethod
    def _figures(job: Job, body: TrainJob, sources: list[Source], shown: Door | None, metrics: TrainMetrics,
                 charge: Charge | None) -> TrainMetrics:
        """The figures as they leave: all of them by their door, or only the public ones."""
        epsilon = charge.epsilon if charge is not None else None
        if shown is None:
            return figures.withheld(metrics.samples, job.requester, body.dp, sources, epsilon)
        return metrics.model_copy(update={"epsilon": epsilon})

    def _metas(self, plan: Plan) -> list[dict[str, object]]:
        return [self.node.store.dataset_row(r.name).meta for r in plan.inputs if r.kind == "dataset"]

    def _shares(self, job: Job, secure: SecureAggregation, trained: torch.Tensor, samples: int) -> dict[str, str]:
        """The update weighted by its sample count, in fixed point, split into one additive
        share per aggregation party, each sealed to it and signed by this node."""
        node = self.node
        encoded = FixedPoint(secure.frac_bits).encode(trained.to(torch.float64) * samples)
        parts = share(encoded, len(secure.aggregators))
        label = aggregation_label(secure.round, node.node_id)
        return {party: node.claim_check(seal_signed(node.identity, node.node_key(party), label, pack({"s": part})))
                for party, part in zip(secure.aggregators, parts, strict=True)}


def _released(job: Job, body: TrainJob, release: KeepRelease | RawRelease | DPRelease) -> str:
    """What leaves if the owner approves, as the approval queue shows it: the figures go
    with the weights (exactly; under DP-SGD only with noise, if asked for)."""
    if body.dp is None:
        return f"{describe(release)} weights; their exact loss and accuracy on these rows to {job.requester}"
    if body.dp.metrics_epsilon:
        return f"{describe(release)} weights; loss and accuracy with noise (ε={body.dp.metrics_epsilon:g} of it)"
    return f"{describe(release)} weights; loss and accuracy withheld"
