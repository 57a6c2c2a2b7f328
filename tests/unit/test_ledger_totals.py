"""The privacy ledger keeps running totals: a charge costs the same work at the 20,000th
release as at the 100th (counted in SQLite virtual-machine steps, not timed), the totals
are the sums of the charge rows, and a database from before the totals gets them."""

from __future__ import annotations

import math
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from sqlalchemy import event, func, insert, select

from protocol.dp import Charge
from protocol.errors import BudgetExhausted
from protocol.messages import DatasetMeta
from workers.config import BudgetSection
from workers.policy.ledger import Ledger
from workers.storage.store import Store
from workers.storage.tables import ChargeRow, ChargeTotalRow

STEP = 10  # SQLite calls the progress handler every STEP virtual-machine instructions


class Steps:
    """SQLite VM instructions run by this store's connections (a deterministic measure of
    the rows a statement reads: a SUM over n rows runs ~n × a few instructions)."""

    def __init__(self) -> None:
        self.count = 0

    def tick(self) -> int:
        self.count += STEP
        return 0  # go on

    def install(self, dbapi: sqlite3.Connection, _record: Any) -> None:
        dbapi.set_progress_handler(self.tick, STEP)


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[tuple[Ledger, Store, Steps]]:
    store = Store(tmp_path / "store", f"sqlite:///{tmp_path / 'node.db'}")
    for name in ("d", "e"):
        store.put_dataset(DatasetMeta(node="n", name=name, shape=(3,), dtype="float32"), torch.zeros(3), [])
    steps = Steps()
    event.listen(store.engine, "connect", steps.install)
    store.engine.dispose()  # every connection from now on counts
    yield Ledger(store, "n", BudgetSection(default_epsilon=1e9, default_delta=1e-3)), store, steps
    store.close()


def _charge(ledger: Ledger, store: Store, job: str, user: str, datasets: list[str], charge: Charge) -> None:
    store.begin_job(job, user)
    ledger.charge_with_reply(job, user, datasets, charge, "done", {"job": job})


def _history(store: Store, user: str, dataset: str, releases: int, first: int = 0) -> None:
    """``releases`` past charges written straight into the charge rows (fast), then the totals
    made their sums, as a node does once for a database from before the totals."""
    with store.session() as s:
        s.execute(insert(ChargeRow), [
            {"job_id": f"past-{first + i}", "dataset": dataset, "user": user, "mechanism": "laplace",
             "epsilon": 0.01, "delta": 0.0, "rho": 0.0, "scale": 1.0, "created_at": time.time()}
            for i in range(releases)])


def _cost(ledger: Ledger, store: Store, steps: Steps, user: str, jobs: range) -> float:
    """Median VM steps of one precheck + charge (the two budget reads and the charge of a DP job)."""
    counts = []
    for i in jobs:
        before = steps.count
        ledger.precheck(user, ["d"], Charge("laplace", 0.01, 0.0), f"j{i}")
        _charge(ledger, store, f"j{i}", user, ["d"], Charge("laplace", 0.01, 0.0))
        counts.append(steps.count - before)
    return sorted(counts)[len(counts) // 2]


def test_a_charge_costs_the_same_after_20000_releases_as_after_100(ledger: tuple[Ledger, Store, Steps]) -> None:
    led, store, steps = ledger
    _history(store, "carol", "d", 100)
    led.rebuild_totals()
    few = _cost(led, store, steps, "carol", range(0, 21))
    _history(store, "carol", "d", 19_900, first=100)
    led.rebuild_totals()
    assert led.info("carol", "d").releases == 20_000 + 21
    many = _cost(led, store, steps, "carol", range(21, 42))
    # Summing the charge rows on each check ran ~200× the steps here; a running total is
    # one row whatever the history (a B-tree a level deeper costs a few steps, not rows).
    print(f"VM steps per DP charge: {few:.0f} after 100 releases, {many:.0f} after 20,000")
    assert many < 1.5 * few + 2 * STEP, (few, many)


def test_totals_are_the_sums_of_the_charge_rows(ledger: tuple[Ledger, Store, Steps]) -> None:
    led, store, _ = ledger
    charges = [Charge("laplace", 0.1, 0.0), Charge("gaussian", 0.2, 1e-7, rho=0.003),
               Charge("dpsgd", 0.05, 1e-8), Charge("laplace", 0.3, 0.0)]
    for i in range(60):
        user = ("carol", "dana")[i % 2]
        datasets = [["d"], ["e"], ["d", "e"]][i % 3]
        _charge(led, store, f"j{i}", user, datasets, charges[(i // 2) % len(charges)])
    # charged again under the same job id (a decision answered twice): no second charge
    led.charge_with_reply("j0", "carol", ["d"], charges[0], "done", {"job": "j0"})
    with store.session() as s:
        sums = {(u, d, m): (e, dl, r, n) for u, d, m, e, dl, r, n in s.execute(
            select(ChargeRow.user, ChargeRow.dataset, ChargeRow.mechanism, func.sum(ChargeRow.epsilon),
                   func.sum(ChargeRow.delta), func.sum(ChargeRow.rho), func.count())
            .group_by(ChargeRow.user, ChargeRow.dataset, ChargeRow.mechanism))}
        totals = {(t.user, t.dataset, t.mechanism): (t.epsilon, t.delta, t.rho, t.releases)
                  for t in s.scalars(select(ChargeTotalRow))}
    assert sums.keys() == totals.keys() and len(totals) == 2 * 2 * 3
    for key, (eps, delta, rho, n) in sums.items():
        total = totals[key]
        assert total[3] == n
        assert all(math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-18) for a, b in zip(total[:3], (eps, delta, rho),
                                                                                      strict=True)), key
    assert led.info("carol", "d").releases == sum(n for (u, d, _), (*_, n) in sums.items() if (u, d) == ("carol", "d"))


def test_the_budget_check_reads_the_totals(ledger: tuple[Ledger, Store, Steps]) -> None:
    led, store, _ = ledger
    led.set("carol", "d", 1.0, 1e-6)
    for i in range(10):
        _charge(led, store, f"j{i}", "carol", ["d"], Charge("laplace", 0.1, 0.0))
    with pytest.raises(BudgetExhausted, match="after 10 releases"):
        _charge(led, store, "j10", "carol", ["d"], Charge("laplace", 0.1, 0.0))
    assert store.job("j10") is not None and store.job("j10").reply is None  # type: ignore[union-attr]
    info = led.info("carol", "d")
    assert info.releases == 10 and info.spent_epsilon == 1.0


def test_a_database_from_before_the_totals_gets_them_once(tmp_path: Path) -> None:
    store = Store(tmp_path / "store", f"sqlite:///{tmp_path / 'node.db'}")
    _history(store, "carol", "d", 250)  # charges written by a node from before the totals
    with store.session() as s:
        assert s.scalar(select(func.count()).select_from(ChargeTotalRow)) == 0
    ledger = Ledger(store, "n", BudgetSection(default_epsilon=10.0))  # a node starting with this database
    info = ledger.info("carol", "d")
    assert info.releases == 250 and info.spent_epsilon == pytest.approx(2.5)
    Ledger(store, "n", BudgetSection(default_epsilon=10.0))  # the next start changes nothing
    assert ledger.info("carol", "d").releases == 250
    store.close()
