"""The node store's contract, run against SQLite and PostgreSQL (any SQLAlchemy URL works):
datasets, result objects owned by their requester, job records that make redelivery
idempotent, and nonces that tell a replay from a redelivery."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from protocol.errors import InvalidRequest, NotFound
from protocol.messages import DatasetMeta
from workers.storage.store import Store


@pytest.fixture(scope="module")
def postgres_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    import pgserver

    server = pgserver.get_server(tmp_path_factory.mktemp("pg"), cleanup_mode="stop")
    yield server.get_uri().replace("postgresql://", "postgresql+psycopg://")
    server.cleanup()


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'node.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    s = Store(tmp_path / "store", url)
    yield s
    from workers.storage.tables import Base

    Base.metadata.drop_all(s.engine)
    s.close()


def _meta(name: str, shape: tuple[int, ...]) -> DatasetMeta:
    return DatasetMeta(node="n", name=name, shape=shape, dtype="float32", tags=["#t"])


def test_datasets_round_trip_and_removal(store: Store) -> None:
    data = torch.arange(6.0).reshape(3, 2)
    store.put_dataset(_meta("d", (3, 2)), data, ["alice"])
    row, tensor = store.dataset("d")
    assert torch.equal(tensor, data) and row.allowed_users == ["alice"]
    with pytest.raises(InvalidRequest, match="already published"):
        store.put_dataset(_meta("d", (2, 2)), data[:2], ["bob"])  # a name is replaced only on purpose
    store.put_dataset(_meta("d", (2, 2)), data[:2], ["bob"], replace=True)  # replaced, cache follows
    row, tensor = store.dataset("d")
    assert tensor.shape == (2, 2) and row.allowed_users == ["bob"]
    assert [r.name for r in store.dataset_rows()] == ["d"]
    store.remove_dataset("d")
    with pytest.raises(NotFound):
        store.dataset("d")
    with pytest.raises(NotFound):
        store.remove_dataset("d")


def test_objects_belong_to_their_requester(store: Store) -> None:
    store.put_object("o1", "job1", "alice", torch.ones(4), ["d", "d"])
    row, tensor = store.object("o1", "alice")
    assert torch.equal(tensor, torch.ones(4)) and row.sources == ["d"] and row.shape == [4]
    with pytest.raises(NotFound):
        store.object("o1", "carol")
    again = store.put_object("o1", "job1", "alice", torch.zeros(4), ["d"])  # idempotent by id
    assert again.id == "o1" and store.count_objects("job1") == 1


def test_jobs_record_attempts_and_keep_their_reply(store: Store) -> None:
    assert store.begin_job("j", "alice").attempts == 1
    assert store.begin_job("j", "alice").attempts == 2  # a redelivery after a crash
    store.finish_job("j", "done", {"reply": 1})
    finished = store.begin_job("j", "alice")
    assert finished.reply == {"reply": 1} and finished.attempts == 2  # answered, not rerun
    with pytest.raises(InvalidRequest):
        store.begin_job("j", "mallory")  # a job id is its requester's


def test_nonces_tell_replays_from_redeliveries(store: Store) -> None:
    far = 4_000_000_000.0
    assert store.remember("alice", "n1", "delivery-1", far)
    assert store.remember("alice", "n1", "delivery-1", far)  # the broker delivered it again
    assert not store.remember("alice", "n1", "delivery-2", far)  # the same envelope, another message
    assert store.remember("bob", "n1", "delivery-2", far)  # nonces are per sender


def test_the_ledger_never_overspends_under_concurrent_charges(store: Store) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from protocol.dp import Charge
    from protocol.errors import BudgetExhausted
    from workers.config import BudgetSection
    from workers.policy.ledger import Ledger

    ledger = Ledger(store, "n", BudgetSection(default_epsilon=1.0))
    store.put_dataset(_meta("d", (3, 2)), torch.zeros(3, 2), [])

    def charge(i: int) -> str:
        job = f"job-{i}"
        store.begin_job(job, "carol")
        try:
            ledger.charge_with_reply(job, "carol", ["d"], Charge("laplace", 0.1, 0.0), "done", {"i": i})
            return "charged"
        except BudgetExhausted:
            return "refused"

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(charge, range(32)))
    assert outcomes.count("charged") == 10 and outcomes.count("refused") == 22
    info = ledger.info("carol", "d")
    assert info.releases == 10 and info.spent_epsilon == 1.0
    ledger.set("carol", "d", 2.0, 1e-6)  # the owner raises the budget: what is spent stays spent
    assert ledger.info("carol", "d").remaining_epsilon == 1.0
