"""Running one job at the node: verify → authorize → validate → run → keep or release.

:class:`JobRunner` is the core the Celery task calls (the task itself is a shell). It
answers every message, good or bad, with a reply envelope signed by this node; it never
raises to Celery, so a hostile message costs one reply and the worker goes on serving.
A job id is run once: a redelivered job answers with the reply recorded the first time.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re
import time
from collections.abc import Callable
from typing import Any

import torch
from celery.exceptions import SoftTimeLimitExceeded

from protocol.codec import dtype_name, encode_tensor
from protocol.contract import CLAIM_CHECK_THRESHOLD, PUBLIC
from protocol.dp import add_noise
from protocol.envelope import open_envelope, seal_envelope
from protocol.errors import (
    AuthenticationError,
    BudgetExhausted,
    GridError,
    InvalidRequest,
    JobFailed,
    PermissionDenied,
)
from protocol.identity import Identity, PublicIdentity
from protocol.messages import (
    BudgetQuery,
    DPRelease,
    JobReply,
    PointerTicket,
    RunJob,
    SealedValue,
    WireError,
    parse_body,
)
from protocol.plan import TensorSpec, evaluate, validate
from workers.ledger import Ledger
from workers.policy import Source, authorize
from workers.release import PendingCharge, calibrate_release
from workers.store import Store

log = logging.getLogger(__name__)
_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")

ClaimCheck = Callable[[bytes], str]  # stores sealed bytes, returns their key


class JobRunner:
    def __init__(self, node_id: str, identity: Identity, keyring: dict[str, PublicIdentity],
                 store: Store, ledger: Ledger, claim_check: ClaimCheck) -> None:
        self.node_id = node_id
        self.identity = identity
        self.keyring = keyring
        self.store = store
        self.ledger = ledger
        self.claim_check = claim_check

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
        charge: PendingCharge | None = None
        try:
            body = parse_body(env.body_json(), env.job_id)
            if isinstance(body, BudgetQuery):
                reply = self._budgets(env.sender, body)
            elif isinstance(body, RunJob):
                reply, charge = self._run(env.sender, env.job_id, body)
            else:
                raise InvalidRequest(f"a node runs jobs; it does not take {body.kind!r} messages")
        except GridError as exc:
            reply = _failure(exc, env.job_id)
        except SoftTimeLimitExceeded:
            reply = _failure(JobFailed("the job ran past this node's time limit; split it into smaller plans"),
                             env.job_id)
        except Exception:  # a bug or a resource problem: the owner's log has the details
            log.exception("job %s failed", env.job_id)
            reply = _failure(JobFailed("the job failed at the node; the owner's log has details"),
                             env.job_id)
        signed = self._sign(env.sender, env.job_id, reply)
        if charge is not None:  # a DP release leaves only if its charge is recorded with it
            try:
                self.ledger.charge_with_reply(env.job_id, env.sender, charge.datasets, charge.charge,
                                              reply.status, signed)
                return signed
            except BudgetExhausted as exc:
                signed = self._sign(env.sender, env.job_id, _failure(exc, env.job_id))
        self.store.finish_job(env.job_id, reply.status, signed)
        return signed

    def _budgets(self, requester: str, query: BudgetQuery) -> JobReply:
        names = [query.dataset] if query.dataset else [row.name for row in self.store.dataset_rows()]
        for name in names:
            self.store.dataset_row(name)  # NotFound for a dataset that is not here
        return JobReply(status="done", budgets=[self.ledger.info(requester, name) for name in names])

    def _run(self, requester: str, job_id: str, job: RunJob) -> tuple[JobReply, PendingCharge | None]:
        inputs, specs, sources = [], [], []
        for ref in job.plan.inputs:
            if ref.kind == "dataset":
                row, tensor = self.store.dataset(ref.name)
                sources.append(Source(ref.name, row.allowed_users))
            else:  # a kept result carries the datasets it was derived from
                obj, tensor = self.store.object(ref.name, requester)
                sources.extend(Source(n, self.store.dataset_row(n).allowed_users) for n in obj.sources)
            inputs.append(tensor)
            specs.append(TensorSpec(shape=tuple(tensor.shape), dtype=dtype_name(tensor.dtype)))
        door = authorize(requester, job.release, sources, self.node_id, job_id)
        if isinstance(job.release, DPRelease):
            charge = calibrate_release(job.plan, job.release, [self.store.dataset_row(r.name).meta
                                                               for r in job.plan.inputs if r.kind == "dataset"])
            datasets = [r.name for r in job.plan.inputs]
            self.ledger.precheck(requester, datasets, charge.charge, job_id)  # before any work
        validate(job.plan, specs)
        result = evaluate(job.plan, inputs)
        if isinstance(job.release, DPRelease):
            noisy = add_noise(result, charge.charge)
            return (JobReply(status="done", value=self._seal(requester, noisy), noise=charge.noise),
                    PendingCharge(datasets, charge.charge))
        if door == "keep":
            object_id = "obj-" + hashlib.sha256(job_id.encode()).hexdigest()[:32]  # safe as a file name
            obj = self.store.put_object(object_id, job_id, requester, result,
                                        [s.dataset for s in sources])
            ticket = PointerTicket(node=self.node_id, object_id=obj.id, job_id=job_id,
                                   shape=tuple(obj.shape), dtype=obj.dtype, sources=obj.sources)
            return JobReply(status="done", ticket=ticket), None
        return JobReply(status="done", value=self._seal(requester, result)), None

    def _seal(self, requester: str, value: torch.Tensor) -> SealedValue:
        sealed = self.keyring[requester].seal(encode_tensor(value))
        if len(sealed) > CLAIM_CHECK_THRESHOLD:
            return SealedValue(claim_check=self.claim_check(sealed), size=len(sealed))
        return SealedValue(sealed=base64.b64encode(sealed).decode(), size=len(sealed))

    def _sign(self, recipient: str, job_id: str, reply: JobReply) -> dict[str, Any]:
        env = seal_envelope(self.identity, recipient=recipient, kind=reply.kind, job_id=job_id,
                            body=reply.model_dump(mode="json"), now=time.time())
        return env.model_dump(mode="json")


def _failure(exc: GridError, job_id: str) -> JobReply:
    error = WireError(code=exc.code, message=exc.message[:4096], job_id=job_id)
    if isinstance(exc, PermissionDenied | AuthenticationError):
        return JobReply(status="denied", error=error)
    return JobReply(status="failed", error=error)
