"""Running one job at the node: verify → authorize → validate → run → keep or release.

:class:`JobRunner` is the core the Celery task calls (the task itself is a shell). It
answers every message, good or bad, with a reply envelope signed by this node; it never
raises to Celery, so a hostile message costs one reply and the worker goes on serving.
A job id is run once: a redelivered job answers with the reply recorded the first time.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import time
from collections.abc import Callable
from typing import Any

import torch
from celery.exceptions import SoftTimeLimitExceeded

from protocol.codec import decode_tensor, dtype_name, encode_tensor, parse_dtype
from protocol.contract import CLAIM_CHECK_THRESHOLD, PUBLIC
from protocol.dp import add_noise
from protocol.envelope import Envelope, open_envelope, seal_envelope
from protocol.errors import (
    AuthenticationError,
    BudgetExhausted,
    GridError,
    InvalidRequest,
    JobFailed,
    NotFound,
    PermissionDenied,
)
from protocol.identity import Identity, PublicIdentity
from protocol.interpret import evaluate, validate
from protocol.messages import (
    AccessRequest,
    BudgetQuery,
    DatasetMeta,
    DPRelease,
    EvalJob,
    JobReply,
    KeepRelease,
    MockRequest,
    PointerTicket,
    RawRelease,
    RunJob,
    SealedValue,
    SecureAggregation,
    TrainJob,
    WireError,
    parse_body,
)
from protocol.model import flatten_state, load_state, unflatten_state
from protocol.mpc.ring import FixedPoint
from protocol.mpc.sharing import share
from protocol.mpc.wire import aggregation_label, pack, seal_signed
from protocol.plan import Plan, TensorSpec
from workers.approvals import Parked, Requests
from workers.config import ApprovalSection
from workers.ledger import Ledger
from workers.policy import Source, authorize, job_kind
from workers.release import PendingCharge, calibrate_release, declared_rows
from workers.store import DatasetRow, Store
from workers.training import Models, dp_charge, score, train

log = logging.getLogger(__name__)
_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")

ClaimCheck = Callable[[bytes], str]  # stores sealed bytes, returns their key
ClaimTake = Callable[[str], bytes]  # takes (fetches and deletes) bytes left by claim-check


class JobRunner:
    def __init__(self, node_id: str, identity: Identity, keyring: dict[str, PublicIdentity],
                 store: Store, ledger: Ledger, approval: ApprovalSection, claim_check: ClaimCheck,
                 claim_take: ClaimTake, node_key: Callable[[str], PublicIdentity]) -> None:
        self.node_id = node_id
        self.approval = approval
        self.requests = Requests(store)
        self.identity = identity
        self.keyring = keyring
        self.store = store
        self.ledger = ledger
        self.claim_check = claim_check
        self.claim_take = claim_take
        self.node_key = node_key  # another node's key, as the gateway lists it
        self.models = Models()

    def handle(self, raw: Any, delivery_id: str) -> dict[str, Any]:
        """Answer one delivered message with a signed reply (as a dict for the wire)."""
        claimed = raw.get("sender") if isinstance(raw, dict) else None
        # refusals go back to whoever the message claims to be: they carry no secret
        requester = claimed if isinstance(claimed, str) and _NAME.fullmatch(claimed) else PUBLIC
        job_id = (str(raw.get("job_id") or "")[:80] if isinstance(raw, dict) else "") or delivery_id
        try:
            env = open_envelope(raw, recipient=self.node_id, keyring=self.keyring,
                                nonces=self.store, delivery_id=delivery_id, now=time.time())
        except GridError as exc:  # nothing is recorded for a message we cannot trust
            log.warning("refused message %s from %r: %s", job_id, claimed, exc)
            return self._sign(requester, job_id, _failure(exc, job_id))
        job = self.store.begin_job(env.job_id, env.sender)
        if job.reply is not None:
            log.info("job %s delivered again; answering with its recorded reply", env.job_id)
            return job.reply
        try:
            reply, charge = self._execute(env, approved=False)
        except Parked as parked:
            self.requests.park(env.job_id, env.sender, env.model_dump(mode="json"), parked)
            log.info("job %s of %r waits for the owner's approval (%s)", env.job_id, env.sender, parked.kind)
            reply, charge = JobReply(status="pending_approval"), None
        return self._record(env.sender, env.job_id, reply, charge)

    def run_approved(self, job_id: str) -> dict[str, Any]:
        """Run a job the owner approved, as it was asked (its envelope was verified on arrival)."""
        env = Envelope.model_validate(self.requests.get(job_id).envelope)
        reply, charge = self._execute(env, approved=True)
        return self._record(env.sender, env.job_id, reply, charge)

    def refuse(self, job_id: str, error: GridError) -> dict[str, Any]:
        """Answer a parked job with the owner's refusal."""
        request = self.requests.get(job_id)
        return self._record(request.requester, job_id, _failure(error, job_id), None)

    @staticmethod
    def is_parked(signed: dict[str, Any]) -> bool:
        return bool(json.loads(signed["body"]).get("status") == "pending_approval")

    # --- the work ---------------------------------------------------------------------------

    def _execute(self, env: Envelope, *, approved: bool) -> tuple[JobReply, PendingCharge | None]:
        """Parse and run one verified message; every failure becomes a reply (Parked excepted)."""
        requester, job_id = env.sender, env.job_id
        try:
            body = parse_body(env.body_json(), job_id)
            if isinstance(body, BudgetQuery):
                return self._budgets(requester, body), None
            if isinstance(body, AccessRequest):
                return self._access(requester, job_id, body, approved), None
            if isinstance(body, MockRequest):
                return JobReply(status="done", value=self._seal(requester, self._mock(body.dataset))), None
            if isinstance(body, RunJob):
                return self._run(requester, job_id, body, approved)
            if isinstance(body, TrainJob):
                return self._train(requester, job_id, body, approved)
            if isinstance(body, EvalJob):
                return self._evaluate(requester, job_id, body, approved), None
            raise InvalidRequest(f"a node runs jobs; it does not take {body.kind!r} messages")
        except (GridError, Parked, SoftTimeLimitExceeded) as exc:
            if isinstance(exc, Parked):
                raise
            if isinstance(exc, SoftTimeLimitExceeded):
                exc = JobFailed("the job ran past this node's time limit; split it into smaller plans")
            return _failure(exc, job_id), None
        except Exception:  # a bug or a resource problem: the owner's log has the details
            log.exception("job %s failed", job_id)
            return _failure(JobFailed("the job failed at the node; the owner's log has details"), job_id), None

    def _record(self, requester: str, job_id: str, reply: JobReply, charge: PendingCharge | None
                ) -> dict[str, Any]:
        signed = self._sign(requester, job_id, reply)
        if charge is not None:  # a DP release leaves only if its charge is recorded with it
            try:
                self.ledger.charge_with_reply(job_id, requester, charge.datasets, charge.charge, reply.status, signed)
                return signed
            except BudgetExhausted as exc:
                signed = self._sign(requester, job_id, _failure(exc, job_id))
        self.store.finish_job(job_id, reply.status, signed)
        return signed

    def _budgets(self, requester: str, query: BudgetQuery) -> JobReply:
        names = [query.dataset] if query.dataset else [row.name for row in self.store.dataset_rows()]
        for name in names:
            self.store.dataset_row(name)  # NotFound for a dataset that is not here
        return JobReply(status="done", budgets=[self.ledger.info(requester, name) for name in names])

    def _mock(self, dataset: str) -> torch.Tensor:
        """The owner's mock twin, or synthetic rows drawn uniformly within the declared bounds
        (seeded by the dataset's name: the same twin every time)."""
        supplied = self.store.mock(dataset)
        if supplied is not None:
            return supplied
        meta = DatasetMeta.model_validate(self.store.dataset_row(dataset).meta)
        if meta.bounds is None or not meta.shape:
            raise NotFound(f"{dataset} has no mock twin: its owner supplied none and declared no bounds")
        rows = declared_rows(meta)
        lo, hi = rows.lo, rows.hi
        generator = torch.Generator().manual_seed(int(hashlib.sha256(dataset.encode()).hexdigest()[:15], 16))
        draws = torch.rand(meta.shape, generator=generator, dtype=torch.float64)
        return (lo + draws * (hi - lo)).to(parse_dtype(meta.dtype))

    def _access(self, requester: str, job_id: str, request: AccessRequest, approved: bool) -> JobReply:
        row = self.store.dataset_row(request.dataset)
        if requester in row.allowed_users:
            return JobReply(status="done")
        if not approved:
            raise Parked("access", [request.dataset], f"make {requester!r} an allowed user of {request.dataset}",
                         "access", request.reason)
        self.store.allow(request.dataset, requester)
        return JobReply(status="done")

    def _inputs(self, plan: Plan, requester: str, seen: dict[str, tuple[DatasetRow, torch.Tensor]] | None = None
                ) -> tuple[list[torch.Tensor], list[Source]]:
        """A plan's input tensors, validated against it, and the datasets they come from
        (``seen``: datasets already looked up by this job, e.g. for x when reading y)."""
        seen = {} if seen is None else seen
        inputs, specs, sources = [], [], []
        for ref in plan.inputs:
            if ref.kind == "dataset":
                if ref.name not in seen:
                    seen[ref.name] = self.store.dataset(ref.name)
                row, tensor = seen[ref.name]
                sources.append(Source(ref.name, row.allowed_users))
            else:  # a kept result carries the datasets it was derived from
                obj, tensor = self.store.object(ref.name, requester)
                sources.extend(Source(n, self.store.dataset_row(n).allowed_users) for n in obj.sources)
            inputs.append(tensor)
            specs.append(TensorSpec(shape=tuple(tensor.shape), dtype=dtype_name(tensor.dtype)))
        validate(plan, specs)
        return inputs, sources

    def _xy_inputs(self, job: TrainJob | EvalJob, requester: str
                   ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[Source]]:
        """The inputs of a model job's x and y plans, and the datasets they come from (x and
        y are most often columns of one table: it is looked up once)."""
        seen: dict[str, tuple[DatasetRow, torch.Tensor]] = {}
        x_inputs, x_sources = self._inputs(job.x, requester, seen)
        y_inputs, y_sources = self._inputs(job.y, requester, seen)
        return x_inputs, y_inputs, x_sources + y_sources

    def _run(self, requester: str, job_id: str, job: RunJob, approved: bool
             ) -> tuple[JobReply, PendingCharge | None]:
        inputs, sources = self._inputs(job.plan, requester)
        door = authorize(requester, job.release, sources, self.node_id, self.approval, approved=approved,
                         job_id=job_id)
        datasets = sorted({s.dataset for s in sources})
        if door == "park":
            raise Parked(job_kind(requester, job.release, sources), datasets, job.plan.describe(),
                         _describe(job.release))
        calibrated = None
        if isinstance(job.release, DPRelease):
            calibrated = calibrate_release(job.plan, job.release, [self.store.dataset_row(r.name).meta
                                                                   for r in job.plan.inputs if r.kind == "dataset"])
            self.ledger.precheck(requester, datasets, calibrated.charge, job_id)  # before any work
        result = evaluate(job.plan, inputs)
        if calibrated is not None:
            noisy = add_noise(result, calibrated.charge)
            return (JobReply(status="done", value=self._seal(requester, noisy), noise=calibrated.noise),
                    PendingCharge(datasets, calibrated.charge))
        if door == "keep":
            return JobReply(status="done", ticket=self._keep(requester, job_id, result, datasets)), None
        return JobReply(status="done", value=self._seal(requester, result)), None

    def _keep(self, requester: str, job_id: str, result: torch.Tensor, datasets: list[str]) -> PointerTicket:
        object_id = "obj-" + hashlib.sha256(job_id.encode()).hexdigest()[:32]  # safe as a file name
        obj = self.store.put_object(object_id, job_id, requester, result, datasets)
        return PointerTicket(node=self.node_id, object_id=obj.id, job_id=job_id,
                             shape=tuple(obj.shape), dtype=obj.dtype, sources=obj.sources)

    def _train(self, requester: str, job_id: str, job: TrainJob, approved: bool
               ) -> tuple[JobReply, PendingCharge | None]:
        """Train the model on (x, y) here; keep the weights, or release them by the policy's
        door — with DP-SGD, the DP door, charged to the budget (checked before training)."""
        x_inputs, y_inputs, sources = self._xy_inputs(job, requester)
        kept: torch.Tensor | None = None
        if job.start is not None:  # continue from weights trained and kept here: they carry their datasets
            obj, kept = self.store.object(job.start, requester)
            sources.extend(Source(n, self.store.dataset_row(n).allowed_users) for n in obj.sources)
        datasets = sorted({s.dataset for s in sources})
        x, y = evaluate(job.x, x_inputs), evaluate(job.y, y_inputs)
        charge = dp_charge(job.config, job.dp, len(x)) if job.dp else None
        release = job.release if charge is None or isinstance(job.release, KeepRelease) else \
            DPRelease(epsilon=max(charge.epsilon, 1e-12), delta=charge.delta)
        door = authorize(requester, release, sources, self.node_id, self.approval, approved=approved,
                         job_id=job_id, training=True)
        if door == "park":
            raise Parked(job_kind(requester, release, sources, training=True), datasets,
                         f"train a model of {len(job.model.layers)} layers, {job.config.epochs} epoch(s), on\n"
                         f"x: {job.x.describe()}\ny: {job.y.describe()}", _describe(job.release) + " weights")
        with self.models.lend(job.model, give_back=job.dp is None) as model:
            if kept is None:  # sealed weights are taken from the broker only now: a parked job finds them once approved
                if job.weights is None:
                    raise InvalidRequest("a training job sends its starting weights, or names kept ones (start)")
                kept = decode_tensor(self._unseal(job.weights))
            load_state(model, unflatten_state(kept, model.state_dict()))
            if door == "dp" and charge is not None:
                self.ledger.precheck(requester, datasets, charge, job_id)  # exhausted: refused before any work
            metrics = train(model, x, y, job.config, job.dp)
            trained = flatten_state(model.state_dict())
        sealed = metrics.sealed_to(self.keyring[requester])  # figures of private data: for the requester only
        if door == "keep":
            reply = JobReply(status="done", ticket=self._keep(requester, job_id, trained, datasets), metrics=sealed)
            return reply, None
        if job.secure is not None:
            reply = JobReply(status="done", shares=self._shares(job_id, job.secure, trained, metrics.samples),
                             metrics=sealed)
        else:
            reply = JobReply(status="done", value=self._seal(requester, trained), metrics=sealed)
        return reply, (PendingCharge(datasets, charge) if door == "dp" and charge is not None else None)

    def _evaluate(self, requester: str, job_id: str, job: EvalJob, approved: bool) -> JobReply:
        """The weights' loss and accuracy on (x, y) here: metrics of private data, released
        by the door trained weights would leave by (never by DP: they carry no noise)."""
        x_inputs, y_inputs, sources = self._xy_inputs(job, requester)
        datasets = sorted({s.dataset for s in sources})
        door = authorize(requester, RawRelease(), sources, self.node_id, self.approval, approved=approved,
                         job_id=job_id, training=True)
        if door == "park":
            raise Parked(job_kind(requester, RawRelease(), sources, training=True), datasets,
                         f"evaluate a model of {len(job.model.layers)} layers ({job.loss} loss) on\n"
                         f"x: {job.x.describe()}\ny: {job.y.describe()}", "raw loss and accuracy")
        x, y = evaluate(job.x, x_inputs), evaluate(job.y, y_inputs)
        with self.models.lend(job.model) as model:
            load_state(model, unflatten_state(decode_tensor(self._unseal(job.weights)), model.state_dict()))
            metrics = score(model, x, y, job.loss)
        return JobReply(status="done", metrics=metrics.sealed_to(self.keyring[requester]))

    def _shares(self, job_id: str, secure: SecureAggregation, trained: torch.Tensor, samples: int) -> dict[str, str]:
        """The update weighted by its sample count, in fixed point, split into one additive
        share per aggregation party, each sealed to it and signed by this node."""
        encoded = FixedPoint(secure.frac_bits).encode(trained.to(torch.float64) * samples)
        parts = share(encoded, len(secure.aggregators))
        label = aggregation_label(secure.round, self.node_id)
        return {party: self.claim_check(seal_signed(self.identity, self.node_key(party), label, pack({"s": part})))
                for party, part in zip(secure.aggregators, parts, strict=True)}

    def _unseal(self, value: SealedValue) -> bytes:
        if value.claim_check is not None:
            data = value.checked(self.claim_take(value.claim_check))
        elif value.sealed is not None:
            data = base64.b64decode(value.sealed)
        else:
            raise InvalidRequest("a sealed value must carry its bytes or a claim-check key")
        return self.identity.unseal(data)

    def _seal(self, requester: str, value: torch.Tensor) -> SealedValue:
        sealed = self.keyring[requester].seal(encode_tensor(value))
        if len(sealed) > CLAIM_CHECK_THRESHOLD:
            return SealedValue.left(self.claim_check(sealed), sealed)
        return SealedValue(sealed=base64.b64encode(sealed).decode(), size=len(sealed))

    def _sign(self, recipient: str, job_id: str, reply: JobReply) -> dict[str, Any]:
        env = seal_envelope(self.identity, recipient=recipient, kind=reply.kind, job_id=job_id,
                            body=reply.model_dump(mode="json"), now=time.time())
        return env.model_dump(mode="json")


def _describe(release: KeepRelease | RawRelease | DPRelease) -> str:
    if isinstance(release, DPRelease):
        return f"dp (ε={release.epsilon:g}" + (f", δ={release.delta:g})" if release.delta else ")")
    return release.door


def _failure(exc: GridError, job_id: str) -> JobReply:
    error = WireError(code=exc.code, message=exc.message[:4096], job_id=job_id)
    if isinstance(exc, PermissionDenied | AuthenticationError):
        return JobReply(status="denied", error=error)
    return JobReply(status="failed", error=error)
