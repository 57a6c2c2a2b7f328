"""The privacy-budget ledger: check and charge DP releases, per user × dataset.

The check and the charge are one transaction, together with the job's reply, so
concurrent releases can never overspend (SQLite: the transaction takes the write lock when
it begins; PostgreSQL: an advisory lock per user and dataset), a redelivered job is never
charged twice (one row per job id and dataset) and a failed job is not charged (nothing is
written unless the reply is).

What is spent is kept as running totals per user, dataset and mechanism (``charge_totals``),
updated in that same transaction: a check reads one row per mechanism, so a release costs the
same at the millionth as at the first. The charge rows stay, as the audit log; the totals
are their sums (:meth:`Ledger.rebuild_totals` makes them so from the rows, as a node whose
database predates the totals does once, at its first start).
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Sequence
from typing import Any

from sqlalchemy import delete, func, insert, select, text
from sqlalchemy.orm import Session

from protocol.dp import MECHANISMS, Charge, spent
from protocol.errors import BudgetExhausted
from protocol.messages import BudgetInfo
from workers.config import BudgetSection
from workers.storage.store import Store
from workers.storage.tables import BudgetRow, ChargeRow, ChargeTotalRow

SLACK = 1e-9  # floating-point slack: ten releases of 0.1 fit a budget of 1.0


class Ledger:
    def __init__(self, store: Store, node: str, defaults: BudgetSection) -> None:
        self.store = store
        self.node = node
        self.defaults = defaults
        self._backfill()

    # --- reading ---------------------------------------------------------------------------

    def info(self, user: str, dataset: str) -> BudgetInfo:
        with self.store.session() as s:
            epsilon, delta, totals, releases = self._state(s, user, dataset)
        used_epsilon, used_delta = spent(totals, delta)
        # rounded for people: a SQL sum of ten 0.1s is 0.9999999999999999 (the check has its slack)
        return BudgetInfo(node=self.node, dataset=dataset, user=user, epsilon=epsilon, delta=delta,
                          spent_epsilon=round(used_epsilon, 12), spent_delta=used_delta, releases=releases)

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
                if s.get(ChargeRow, (job_id, dataset)) is not None:  # charged once per job id and dataset
                    continue
                s.add(ChargeRow(job_id=job_id, dataset=dataset, user=user, mechanism=charge.mechanism,
                                epsilon=charge.epsilon, delta=charge.delta, rho=charge.rho, scale=charge.scale,
                                created_at=time.time()))
                self._add_to_total(s, user, dataset, charge)
            self.store.finish_job(job_id, status, reply, s)

    def rebuild_totals(self) -> None:
        """Set every running total to the sum of its charge rows (one transaction)."""
        with self.store.session() as s:
            self._rebuild(s)

    # --- internals ------------------------------------------------------------------------

    def _state(self, s: Session, user: str, dataset: str) -> tuple[float, float, list[Charge], int]:
        """The budget, and what is spent of it as one running total per mechanism (a row
        each: the cost does not grow with the number of past releases)."""
        row = s.get(BudgetRow, (user, dataset))
        epsilon, delta = (row.epsilon, row.delta) if row else self.defaults.for_user(user)
        spent_rows = s.scalars(select(ChargeTotalRow).where(ChargeTotalRow.user == user,
                                                             ChargeTotalRow.dataset == dataset))
        totals, releases = [], 0
        for total in spent_rows:  # DP-SGD charges carry their own δ; the others the budget's
            kind = MECHANISMS[total.mechanism]
            totals.append(Charge(kind.name, total.epsilon, kind.stored_delta(total.delta, delta), rho=total.rho))
            releases += total.releases
        return epsilon, delta, totals, releases

    @staticmethod
    def _add_to_total(s: Session, user: str, dataset: str, charge: Charge) -> None:
        """Add one charge to its running total (the caller holds the user × dataset lock)."""
        total = s.get(ChargeTotalRow, (user, dataset, charge.mechanism))
        if total is None:
            s.add(ChargeTotalRow(user=user, dataset=dataset, mechanism=charge.mechanism, epsilon=charge.epsilon,
                                 delta=charge.delta, rho=charge.rho, releases=1))
        else:
            total.epsilon += charge.epsilon
            total.delta += charge.delta
            total.rho += charge.rho
            total.releases += 1

    def _backfill(self) -> None:
        """A database whose ledger predates the running totals gets them, once: from its
        charge rows, when it has charges but no totals (checked in one transaction, which
        holds the write lock: two processes starting at once do it once)."""
        with self.store.session() as s:
            if s.execute(select(ChargeTotalRow.user).limit(1)).first() is not None:
                return
            if s.execute(select(ChargeRow.job_id).limit(1)).first() is None:
                return
            if s.bind is not None and s.bind.dialect.name == "postgresql":
                s.execute(text("LOCK TABLE charge_totals IN EXCLUSIVE MODE"))
                if s.execute(select(ChargeTotalRow.user).limit(1)).first() is not None:
                    return
            self._rebuild(s)

    @staticmethod
    def _rebuild(s: Session) -> None:
        s.execute(delete(ChargeTotalRow))
        sums = select(ChargeRow.user, ChargeRow.dataset, ChargeRow.mechanism, func.sum(ChargeRow.epsilon),
                      func.sum(ChargeRow.delta), func.sum(ChargeRow.rho), func.count()
                      ).group_by(ChargeRow.user, ChargeRow.dataset, ChargeRow.mechanism)
        s.execute(insert(ChargeTotalRow).from_select(
            ["user", "dataset", "mechanism", "epsilon", "delta", "rho", "releases"], sums))

    def _check(self, s: Session, user: str, datasets: Sequence[str], charge: Charge, job_id: str) -> None:
        for dataset in sorted(set(datasets)):
            epsilon, delta, totals, releases = self._state(s, user, dataset)
            before, _ = spent(totals, delta)
            after_epsilon, after_delta = spent([*totals, charge], delta)
            if after_epsilon > epsilon + SLACK or after_delta > delta + SLACK or charge.delta > delta + SLACK:
                asked = f"ε = {charge.epsilon:g}" + (f", δ = {charge.delta:g}" if charge.delta else "")
                raise BudgetExhausted(
                    f"{user!r} has ε = {max(0.0, epsilon - before):.4g} left of {epsilon:g} (δ = {delta:g}) on "
                    f"{self.node}/{dataset} after {releases} releases; this release asks {asked}. Ask the "
                    "owner for more budget, or release with a smaller ε", job_id=job_id)

    @staticmethod
    def _lock(s: Session, user: str, datasets: Sequence[str]) -> None:
        if s.bind is not None and s.bind.dialect.name == "postgresql":
            for dataset in sorted(set(datasets)):  # a fixed order: no deadlocks
                key = zlib.crc32(f"{user}\0{dataset}".encode()) - 2**31
                s.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": key})
        # SQLite: the transaction already holds the write lock (BEGIN IMMEDIATE)
