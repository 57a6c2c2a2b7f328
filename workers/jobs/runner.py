"""Running one job at the node: verify → authorize → validate → run → keep or release.

:class:`JobRunner` serves the node's queue through the grid's one serving path
(:mod:`protocol.serving`): every message, good or bad, is answered with a reply envelope
signed by this node, so a hostile message costs one reply and the worker goes on serving.
A job id is run once: a redelivered job answers with the reply recorded the first time.
Model-free jobs are :mod:`workers.jobs.compute`'s, model jobs :mod:`workers.jobs.model_jobs`'.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded

from protocol.cancel import STARTED, cancelled_by
from protocol.envelope import MAX_TTL_SECONDS, Envelope
from protocol.errors import (
    AuthenticationError,
    BudgetExhausted,
    GridError,
    JobCancelled,
    JobFailed,
    NodeUnavailable,
    PermissionDenied,
)
from protocol.messages import (
    AccessRequest,
    BudgetQuery,
    CancelRequest,
    EvalJob,
    JobReply,
    JobStatus,
    MockRequest,
    MyRequests,
    RunJob,
    TrainJob,
    WireError,
)
from protocol.serving import DEFERRED, Answer, EnvelopeServer, Route, Signed, claimed
from workers import audit
from workers.jobs.compute import ComputeJobs
from workers.jobs.context import Job, NodeContext, Outcome
from workers.jobs.model_jobs import ModelJobs
from workers.jobs.slots import Slots
from workers.policy.approvals import OwnRequests, Parked, Requests, refusal
from workers.storage.retention import Pruner
from workers.storage.store import FINISHED, RequestRow

log = logging.getLogger(__name__)


class JobRunner:
    def __init__(self, node: NodeContext, deliver: Callable[[str, Signed], None] | None = None) -> None:
        self.node = node
        self.store = node.store
        self.requests = Requests(node.store, node.approval.expire_after)
        self.deliver = deliver  # stores a signed answer under a job's id in the result backend (workers.node)
        self.own = OwnRequests(self.requests, self.close_request)
        self.compute = ComputeJobs(node)
        self.model_jobs = ModelJobs(node)
        self.server = EnvelopeServer(node.identity, node.store, failure, passthrough=(Parked,),
                                     time_limits=(SoftTimeLimitExceeded,), reply_ttl=node.retention.results)
        self.slots = Slots(node.store.folder / "slots", node.slots_per_user)
        self.pruner = Pruner(node.store, node.retention)

    def answer(self, task: str, raw: Any, delivery_id: str) -> Answer:
        """Answer one delivered message (whatever task carried it: a node has one), in a slot
        of the requester it names; deferred if all of theirs are taken. Which requester is
        decided before the message is verified — a forger can only delay the real one's jobs
        by running jobs as them, which takes their key."""
        with self.slots.take(claimed(raw)[0]) as held:
            if not held:
                return DEFERRED
            answer = self.server.open_and_answer(raw, delivery_id, self.node.keyring, self._once)
        self.pruner.tick()  # now and then: replies past the node's retention go
        return answer

    def run_approved(self, job_id: str) -> Signed:
        """Run a job the owner approved, as it was asked (its envelope was verified on arrival)."""
        env = Envelope.model_validate(self.requests.get(job_id).envelope)
        return self._record(env.sender, env.job_id, self._outcome(env, approved=True), env, approved=True)

    def repark(self, job_id: str, requester: str) -> Signed | None:
        """The word that a parked job waits for its owner, signed again (valid a day from now)
        and recorded as the job's reply; None if it was decided meanwhile."""
        signed = self.server.sign(requester, job_id, JobReply(status=JobStatus.PENDING_APPROVAL), MAX_TTL_SECONDS)
        return signed if self.store.repark_job(job_id, signed) else None

    def refuse(self, job_id: str, error: GridError) -> Signed:
        """Answer a parked job with the owner's refusal."""
        request = self.requests.get(job_id)
        return self._record(request.requester, job_id, Outcome(failure(error, job_id)))

    def close_request(self, request: RequestRow) -> None:
        """Answer a parked job that will not run (cancelled, expired): its refusal recorded,
        and delivered to its requester's ticket if this runner can (else the node's sweep and
        its next start do: ``Node.expire_requests``, ``Node.resume_decisions``)."""
        signed = self.refuse(request.job_id, refusal(request, self.node.node_id))
        if self.deliver is not None:
            try:
                self.deliver(request.job_id, signed)
            except GridError as exc:  # the broker is down: the node's next start sends it
                log.warning("request %s closed (%s), its answer not delivered: %s", request.job_id, request.status,
                            exc)

    def _once(self, env: Envelope) -> Answer:
        try:
            job = self.store.begin_job(env.job_id, env.sender)
        except GridError as exc:  # another requester's job id: answered, not recorded
            return Answer(self.server.sign(env.sender, env.job_id, failure(exc, env.job_id)))
        if job.reply is not None:
            log.info("job %s delivered again; answering with its recorded reply", env.job_id)
            return Answer(job.reply, parked=job.status == JobStatus.PENDING_APPROVAL)
        if job.status in FINISHED:  # its reply was pruned ([retention] replies): answered, never run again
            answered = JobFailed(f"job {env.job_id} was answered ({job.status}) more than "
                                 f"{self.node.retention.replies:.0f} s ago; its answer is no longer kept. Send the "
                                 "work again as a new job", job_id=env.job_id)
            return Answer(self.server.sign(env.sender, env.job_id, failure(answered, env.job_id)))
        try:
            cancelled = self._cancelled(env)
        except NodeUnavailable as exc:  # whether it was cancelled is unknown: it does not run (fails closed)
            return Answer(self._record(env.sender, env.job_id, Outcome(failure(exc, env.job_id))))
        if cancelled:  # nothing of it runs: no plan read, nothing charged, kept or parked
            log.info("job %s of %r was cancelled by its requester before it started", env.job_id, env.sender)
            refused = JobCancelled(f"{env.sender} cancelled this job before {self.node.node_id!r} started it: it "
                                   "did not run", job_id=env.job_id)
            return Answer(self._record(env.sender, env.job_id, Outcome(failure(refused, env.job_id))))
        try:
            outcome = self._outcome(env, approved=False)
        except Parked as parked:
            self.requests.park(env.job_id, env.sender, env.model_dump(mode="json"), parked)
            log.info("job %s of %r waits for the owner's approval (%s)", env.job_id, env.sender, parked.kind)
            outcome = Outcome(JobReply(status=JobStatus.PENDING_APPROVAL))
        return Answer(self._record(env.sender, env.job_id, outcome, env),
                      parked=outcome.reply.status == JobStatus.PENDING_APPROVAL)

    def _cancelled(self, env: Envelope) -> bool:
        """Whether the job's requester cancelled it before this node took it up (its signed
        cancellation came first, :mod:`protocol.cancel`); if not, the job is now marked
        started and no cancellation can come any more. One that the job's sender did not
        sign is ignored."""
        if not env.job_id.startswith(f"{self.node.node_id}:"):  # not a client's id: none can cancel it
            return False
        first = self.node.take_up(env.job_id)
        if first is None or first == STARTED:
            return False
        key = self.node.keyring.get(env.sender)
        if key is not None and cancelled_by(first, key, env.job_id):
            return True
        log.warning("job %s of %r: its cancel key holds a mark %r did not sign; the job runs", env.job_id,
                    env.sender, env.sender)
        return False

    def _outcome(self, env: Envelope, *, approved: bool) -> Outcome:
        """The verified message run by its route; every failure is an outcome (Parked excepted)."""
        job = Job(env.sender, env.job_id, approved)

        def route(body: type[Any], run: Any) -> Route:
            return Route(body, lambda _env, parsed: run(job, parsed))

        compute, models = self.compute, self.model_jobs
        routes = {"budget": route(BudgetQuery, compute.budgets), "access": route(AccessRequest, compute.access),
                  "mock": route(MockRequest, compute.mock), "run": route(RunJob, compute.run),
                  "train": route(TrainJob, models.train), "evaluate": route(EvalJob, models.evaluate),
                  "requests": route(MyRequests, self.own.list), "cancel": route(CancelRequest, self.own.cancel)}
        return self.server.guarded(lambda: self.server.route(env, routes), env.job_id,
                                   lambda exc, job_id: Outcome(failure(exc, job_id)))

    def _record(self, requester: str, job_id: str, outcome: Outcome, env: Envelope | None = None,
                approved: bool = False) -> Signed:
        """Sign the reply and record it as the job's (with its charge, for a DP release; with
        its entry in the audit log of releases, for a value released raw or approved). Word
        that a job is parked stays valid as long as an envelope may (a day): the owner's
        decision may take that long; an answer, as long as the result backend keeps it."""
        parked = outcome.reply.status == JobStatus.PENDING_APPROVAL
        signed = self.server.sign(requester, job_id, outcome.reply, MAX_TTL_SECONDS if parked else None)
        if outcome.charge is not None:  # a DP release leaves only if its charge is recorded with it
            charge = outcome.charge
            try:
                self.node.ledger.charge_with_reply(job_id, requester, charge.datasets, charge.charge,
                                                   outcome.reply.status, signed)
                return signed
            except BudgetExhausted as exc:
                outcome = Outcome(failure(exc, job_id))
                signed = self.server.sign(requester, job_id, outcome.reply)
        released = self._released(env, outcome.reply, approved) if env is not None else None
        if released is None:
            self.store.finish_job(job_id, outcome.reply.status, signed)
            return signed
        with self.store.session() as s:  # the release is logged if, and only if, its reply is recorded
            self.store.finish_job(job_id, outcome.reply.status, signed, s)
            audit.record(s, job_id, requester, released, time.time())
        return signed

    def _released(self, env: Envelope, reply: JobReply, approved: bool) -> audit.Released | None:
        """What the reply releases by the raw or approved door (None: nothing, or by DP)."""
        if reply.status != "done" or (reply.value is None and reply.metrics is None and not reply.shares):
            return None  # kept at the node, or an answer about budgets and requests: nothing leaves
        try:
            return audit.released(env, reply, approved, self.store)
        except Exception:  # never fails the job: its answer is what the requester waits for
            log.exception("job %s: its release could not be logged for the audit", env.job_id)
            return None


def failure(exc: GridError, job_id: str) -> JobReply:
    """A refusal (``denied``: the requester may not) or a failure, as a job reply."""
    error = WireError(code=exc.code, message=exc.message[:4096], job_id=job_id)
    if isinstance(exc, PermissionDenied | AuthenticationError):
        return JobReply(status=JobStatus.DENIED, error=error)
    return JobReply(status=JobStatus.FAILED, error=error)
