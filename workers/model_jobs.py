"""Jobs that run a model on a node's data: training (one federated round's local work) and
evaluation. Models come as allow-listed layer specs, never as code."""

from __future__ import annotations

import torch

from protocol.codec import decode_tensor
from protocol.errors import InvalidRequest
from protocol.interpret import evaluate
from protocol.messages import DPRelease, EvalJob, JobReply, KeepRelease, RawRelease, SecureAggregation, TrainJob
from protocol.model import flatten_state, load_state, unflatten_state
from protocol.mpc.ring import FixedPoint
from protocol.mpc.sharing import share
from protocol.mpc.wire import aggregation_label, pack, seal_signed
from workers.approvals import Parked
from workers.context import Job, NodeContext, Outcome, describe
from workers.policy import Door, job_kind
from workers.release import PendingCharge
from workers.training import Models, dp_charge, score, train


class ModelJobs:
    def __init__(self, node: NodeContext) -> None:
        self.node = node
        self.models = Models()

    def train(self, job: Job, body: TrainJob) -> Outcome:
        """Train the model on (x, y) here; keep the weights, or release them by the policy's
        door — with DP-SGD, the DP door, charged to the budget (checked before training)."""
        node = self.node
        x_inputs, y_inputs, sources = node.xy_inputs(body, job.requester)
        kept: torch.Tensor | None = None
        if body.start is not None:  # continue from weights trained and kept here: they carry their datasets
            obj, kept = node.store.object(body.start, job.requester)
            sources.extend(node.sources(obj.sources))
        datasets = sorted({s.dataset for s in sources})
        x, y = evaluate(body.x, x_inputs), evaluate(body.y, y_inputs)
        charge = dp_charge(body.config, body.dp, len(x)) if body.dp else None
        release = body.release if charge is None or isinstance(body.release, KeepRelease) else \
            DPRelease(epsilon=max(charge.epsilon, 1e-12), delta=charge.delta)
        door = node.door(job, release, sources, training=True)
        if door is Door.PARK:
            raise Parked(job_kind(job.requester, release, sources, training=True), datasets,
                         f"train a model of {len(body.model.layers)} layers, {body.config.epochs} epoch(s), on\n"
                         f"x: {body.x.describe()}\ny: {body.y.describe()}", describe(body.release) + " weights")
        with self.models.lend(body.model, give_back=body.dp is None) as model:
            if kept is None:  # sealed weights are taken from the broker only now: a parked job finds them once approved
                if body.weights is None:
                    raise InvalidRequest("a training job sends its starting weights, or names kept ones (start)")
                kept = decode_tensor(node.unseal(body.weights))
            load_state(model, unflatten_state(kept, model.state_dict()))
            if door is Door.DP and charge is not None:
                node.ledger.precheck(job.requester, datasets, charge, job.job_id)  # exhausted: refused before work
            metrics = train(model, x, y, body.config, body.dp)
            trained = flatten_state(model.state_dict())
        sealed = metrics.sealed_to(node.keyring[job.requester])  # figures of private data: for the requester only
        if door is Door.KEEP:
            return Outcome(JobReply(status="done", ticket=node.keep(job, trained, datasets), metrics=sealed))
        if body.secure is not None:
            reply = JobReply(status="done", shares=self._shares(job, body.secure, trained, metrics.samples),
                             metrics=sealed)
        else:
            reply = JobReply(status="done", value=node.seal(job.requester, trained), metrics=sealed)
        return Outcome(reply, PendingCharge(datasets, charge) if door is Door.DP and charge is not None else None)

    def evaluate(self, job: Job, body: EvalJob) -> Outcome:
        """The weights' loss and accuracy on (x, y) here: metrics of private data, released
        by the door trained weights would leave by (never by DP: they carry no noise)."""
        node = self.node
        x_inputs, y_inputs, sources = node.xy_inputs(body, job.requester)
        datasets = sorted({s.dataset for s in sources})
        if node.door(job, RawRelease(), sources, training=True) is Door.PARK:
            raise Parked(job_kind(job.requester, RawRelease(), sources, training=True), datasets,
                         f"evaluate a model of {len(body.model.layers)} layers ({body.loss} loss) on\n"
                         f"x: {body.x.describe()}\ny: {body.y.describe()}", "raw loss and accuracy")
        x, y = evaluate(body.x, x_inputs), evaluate(body.y, y_inputs)
        with self.models.lend(body.model) as model:
            load_state(model, unflatten_state(decode_tensor(node.unseal(body.weights)), model.state_dict()))
            metrics = score(model, x, y, body.loss)
        return Outcome(JobReply(status="done", metrics=metrics.sealed_to(node.keyring[job.requester])))

    def _shares(self, job: Job, secure: SecureAggregation, trained: torch.Tensor, samples: int) -> dict[str, str]:
        """The update weighted by its sample count, in fixed point, split into one additive
        share per aggregation party, each sealed to it and signed by this node."""
        node = self.node
        encoded = FixedPoint(secure.frac_bits).encode(trained.to(torch.float64) * samples)
        parts = share(encoded, len(secure.aggregators))
        label = aggregation_label(secure.round, node.node_id)
        return {party: node.claim_check(seal_signed(node.identity, node.node_key(party), label, pack({"s": part})))
                for party, part in zip(secure.aggregators, parts, strict=True)}
