"""The privacy-budget ledger: check and charge DP releases, per user × dataset.

The check and the charge are one transaction, together with the job's reply, so
concurrent releases can never overspend (SQLite: the transaction takes the write lock when
it begins; PostgreSQL: an advisory lock per user and dataset), a redelivered job is never
charged twice (one row per job id and dataset) and a failed job is not charged (nothing is
written unless the reply is).
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Sequence
from typing import Any

from sqlalchemy import select, text, update
from sqlalchemy.orm import Session

from protocol.dp import Charge, spent
from protocol.errors import BudgetExhausted
from protocol.messages import BudgetInfo
from workers.config import BudgetSection
from workers.store import BudgetRow, ChargeRow, JobRow, Store

SLACK = 1e-9  # floating-point slack: ten releases of 0.1 fit a budget of 1.0


class Ledger:
    def __init__(self, store: Store, node: str, defaults: BudgetSection) -> None:
        self.store = store
        self.node = node
        self.defaults = defaults

    # --- reading ---------------------------------------------------------------------------

    def info(self, user: str, dataset: str) -> BudgetInfo:
        with self.store.session() as s:
            epsilon, delta, charges = self._state(s, user, dataset)
        used_epsilon, used_delta = spent(charges, delta)
        return BudgetInfo(node=self.node, dataset=dataset, user=user, epsilon=epsilon, delta=delta,
                          spent_epsilon=used_epsilon, spent_delta=used_delta, releases=len(charges))

    def set(self, user: str, dataset: str, epsilon: float, delta: float) -> None:
        with self.store.session() as s:
            s.merge(BudgetRow(user=user, dataset=dataset, epsilon=epsilon, delta=delta))

    # --- checking and charging ---------------------------------------------------------------

    def precheck(self, user: str, datasets: Sequence[str], charge: Charge, job_id: str) -> None:
        """Refuse early, before any work, a release that the budget cannot cover."""
        with self.store.session() as s:
            self._check(s, user, datasets, charge, job_id)

    def charge_with_reply(self, job_id: str, user: str, datasets: Sequence[str], charge: Charge,
                          status: str, reply: dict[str, Any]) -> None:
        """Check, charge and record the job's reply, atomically; raise BudgetExhausted and
        write nothing if the budget does not cover it."""
        with self.store.session() as s:
            self._lock(s, user, datasets)
            self._check(s, user, datasets, charge, job_id)
            for dataset in sorted(set(datasets)):
                s.merge(ChargeRow(job_id=job_id, dataset=dataset, user=user, mechanism=charge.mechanism,
                                  epsilon=charge.epsilon, delta=charge.delta, rho=charge.rho, scale=charge.scale,
                                  created_at=time.time()))
            s.execute(update(JobRow).where(JobRow.job_id == job_id)
                      .values(status=status, reply=reply, updated_at=time.time()))

    # --- internals ------------------------------------------------------------------------

    def _state(self, s: Session, user: str, dataset: str) -> tuple[float, float, list[Charge]]:
        row = s.get(BudgetRow, (user, dataset))
        epsilon, delta = (row.epsilon, row.delta) if row else self.defaults.for_user(user)
        rows = s.scalars(select(ChargeRow).where(ChargeRow.user == user, ChargeRow.dataset == dataset))
        return epsilon, delta, [Charge(r.mechanism, r.epsilon, r.delta, r.rho, r.scale) for r in rows]

    def _check(self, s: Session, user: str, datasets: Sequence[str], charge: Charge, job_id: str) -> None:
        for dataset in sorted(set(datasets)):
            epsilon, delta, charges = self._state(s, user, dataset)
            before, _ = spent(charges, delta)
            after_epsilon, after_delta = spent([*charges, charge], delta)
            if after_epsilon > epsilon + SLACK or after_delta > delta + SLACK or charge.delta > delta + SLACK:
                asked = f"ε = {charge.epsilon:g}" + (f", δ = {charge.delta:g}" if charge.delta else "")
                raise BudgetExhausted(
                    f"{user!r} has ε = {max(0.0, epsilon - before):.4g} left of {epsilon:g} (δ = {delta:g}) on "
                    f"{self.node}/{dataset} after {len(charges)} releases; this release asks {asked}. Ask the "
                    "owner for more budget, or release with a smaller ε", job_id=job_id)

    @staticmethod
    def _lock(s: Session, user: str, datasets: Sequence[str]) -> None:
        if s.bind is not None and s.bind.dialect.name == "postgresql":
            for dataset in sorted(set(datasets)):  # a fixed order: no deadlocks
                key = zlib.crc32(f"{user}\0{dataset}".encode()) - 2**31
                s.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": key})
        # SQLite: the transaction already holds the write lock (BEGIN IMMEDIATE)
