"""Jobs on a node's data that involve no model: plans run on pointers, budget queries,
access requests and mock twins."""

from __future__ import annotations

import hashlib

import torch

from protocol.codec import parse_dtype
from protocol.dp import add_noise
from protocol.dp_release import run_release
from protocol.errors import NotFound
from protocol.interpret import evaluate
from protocol.messages import (
    AccessRequest,
    BudgetQuery,
    DatasetMeta,
    DPRelease,
    JobKind,
    JobReply,
    JobStatus,
    MockRequest,
    RunJob,
)
from workers.jobs.context import Job, NodeContext, Outcome, describe
from workers.policy.approvals import Parked
from workers.policy.doors import Door, job_kind
from workers.policy.release import PendingCharge, calibrate_release, declared_rows


class ComputeJobs:
    def __init__(self, node: NodeContext) -> None:
        self.node = node

    def run(self, job: Job, body: RunJob) -> Outcome:
        """Run a plan; keep its result here, or release it by the policy's door (DP: charged
        to the budget, checked before any work)."""
        node = self.node
        inputs, sources = node.inputs(body.plan, job.requester)
        door = node.door(job, body.release, sources)
        datasets = sorted({s.dataset for s in sources})
        if door is Door.PARK:
            raise Parked(job_kind(job.requester, body.release, sources), datasets, body.plan.describe(),
                         describe(body.release))
        if isinstance(body.release, DPRelease):
            metas = [node.store.dataset_row(r.name).meta for r in body.plan.inputs if r.kind == "dataset"]
            calibrated = calibrate_release(body.plan, body.release, metas)
            node.ledger.precheck(job.requester, datasets, calibrated.charge, job.job_id)
            charge = calibrated.charge
            noisy = run_release(body.plan, inputs, calibrated.analysis, lambda exact: add_noise(exact, charge))
            return Outcome(JobReply(status=JobStatus.DONE, value=node.seal(job.requester, noisy),
                                    noise=calibrated.noise), PendingCharge(datasets, charge))
        result = evaluate(body.plan, inputs)
        if door is Door.KEEP:
            return Outcome(JobReply(status=JobStatus.DONE, ticket=node.keep(job, result, datasets)))
        return Outcome(JobReply(status=JobStatus.DONE, value=node.seal(job.requester, result)))

    def budgets(self, job: Job, query: BudgetQuery) -> Outcome:
        store = self.node.store
        names = [query.dataset] if query.dataset else [row.name for row in store.dataset_rows()]
        for name in names:
            store.dataset_row(name)  # NotFound for a dataset that is not here
        return Outcome(JobReply(status=JobStatus.DONE,
                                budgets=[self.node.ledger.info(job.requester, n) for n in names]))

    def access(self, job: Job, request: AccessRequest) -> Outcome:
        """Make the requester an allowed user of a dataset: always the owner's decision."""
        store = self.node.store
        if job.requester not in store.allowed_users(request.dataset):
            if not job.approved:
                raise Parked(JobKind.ACCESS, [request.dataset], f"make {job.requester!r} an allowed user of "
                             f"{request.dataset}", "access", request.reason)
            store.allow(request.dataset, job.requester, job.job_id)
        return Outcome(JobReply(status=JobStatus.DONE))

    def mock(self, job: Job, request: MockRequest) -> Outcome:
        return Outcome(JobReply(status=JobStatus.DONE, value=self.node.seal(job.requester, self.twin(request.dataset))))

    def twin(self, dataset: str) -> torch.Tensor:
        """The owner's mock twin, or synthetic rows drawn uniformly within the declared bounds
        (seeded by the dataset's name: the same twin every time)."""
        store = self.node.store
        supplied = store.mock(dataset)
        if supplied is not None:
            return supplied
        meta = DatasetMeta.model_validate(store.dataset_row(dataset).meta)
        if meta.bounds is None or not meta.shape:
            raise NotFound(f"{dataset} has no mock twin: its owner supplied none and declared no bounds")
        rows = declared_rows(meta)
        generator = torch.Generator().manual_seed(int(hashlib.sha256(dataset.encode()).hexdigest()[:15], 16))
        draws = torch.rand(meta.shape, generator=generator, dtype=torch.float64)
        return (rows.lo + draws * (rows.hi - rows.lo)).to(parse_dtype(meta.dtype))
