"""The first use case, as told in the issue: publish → search → remote statistics →
release only to allowed users. Numbers are checked against the hospital's own computation."""

from __future__ import annotations

import time

import pytest
import torch

from ops.local import LocalGrid
from orchestrator.pointer import DataPointer
from protocol.errors import NotFound, PermissionDenied, WrongRecipient
from protocol.plan import InputRef


def test_search_finds_the_dataset_by_tags_and_shows_metadata_only(local_grid: LocalGrid, births_feb):
    with local_grid.connect("carol") as grid:
        found = grid.search("#birth-records", "#february")
        assert set(found) == {"hospital", "clinic"}
        births = found["hospital"][0]
        assert births.name == "birth-records-feb"
        assert births.shape == tuple(births_feb.shape) == (240, 2)
        assert births.dtype == "float64"  # a CSV's decimals as written (issue 14)
        assert "float64" in repr(births)  # what a scientist sees of a search result shows it
        assert births.columns == ("weight", "height")
        assert "weight (kg)" in births.description
        assert set(births.tags) == {"#february", "#birth-records"}
        assert grid.search("#march").keys() == {"clinic"}
        assert grid.search("#birth-records", words=["clinic", "march"])["clinic"][0].name == "birth-records-mar"
        assert grid.search("#no-such-tag") == {}
        assert {n.node for n in grid.nodes()} >= {"hospital", "clinic"}


def test_not_allowed_user_computes_remotely_but_gets_nothing(local_grid: LocalGrid, births_feb):
    with local_grid.connect("carol") as grid:
        births = grid.search("#birth-records", "#february")["hospital"][0]
        with pytest.raises(PermissionDenied, match="carol.*birth-records-feb"):
            births.get()
        sums, means = births.sum(dim=0).submit(), births.mean(dim=0).submit()
        assert sums.wait().status == "done" and means.wait().status == "done"
        mean_ptr = means.result()
        assert mean_ptr.shape == (2,) and mean_ptr.kind == "object"
        # every result derived from the dataset stays closed to her, however far it goes
        for derived in (mean_ptr, mean_ptr * 2 + 1, (mean_ptr[0] > 3).to("float32"),
                        births["weight"].max(), births.count()):
            with pytest.raises(PermissionDenied):
                derived.get()
        ticket_id = sums.id
    with local_grid.connect("alice") as alice:
        # carol's reply is addressed to carol: alice cannot take it over
        with pytest.raises(WrongRecipient):
            alice.ticket(ticket_id).wait()
        # and carol's result object does not exist for her, even though she may see the data
        other = alice.search("#birth-records", "#february")["hospital"][0]
        ptr = DataPointer(alice, "hospital", InputRef(kind="object", name=mean_ptr.name), mean_ptr.spec)
        with pytest.raises(NotFound):
            ptr.get()
        assert other.shape == (240, 2)


def test_allowed_user_gets_exactly_what_the_hospital_computes(local_grid: LocalGrid, births_feb):
    with local_grid.connect("alice") as grid:
        births = grid.search("#birth-records", "#february")["hospital"][0]
        weight, height = births["weight"].mean().get(), births["height"].mean().get()
        assert weight.item() == births_feb[:, 0].mean().item()
        assert height.item() == births_feb[:, 1].mean().item()
        sums = births.sum(dim=0).submit().result()
        assert torch.equal(sums.get(), births_feb.sum(dim=0))
        assert torch.equal(births.get(), births_feb)  # raw access: she is an allowed user
        assert torch.equal((sums / 240.0).get(), births_feb.sum(dim=0) / 240.0)
        stats = (births[:, 0] > 4.0).count().get()
        assert stats.item() == int((births_feb[:, 0] > 4.0).sum())


def test_a_dataset_published_from_python_is_searchable_and_computable(local_grid: LocalGrid, hospital_admin):
    node = hospital_admin
    data = torch.arange(12, dtype=torch.float32).reshape(6, 2)
    meta = node.publish("tiny", data, columns=["a", "b"], tags=["#tiny"], allowed_users=["bob"],
                        description="six rows")
    assert meta.shape == (6, 2)
    assert "tiny" in [d.name for d in node.datasets()]
    with local_grid.connect("bob") as grid:
        ptr = _eventually(lambda: grid.search("#tiny").get("hospital"))[0]
        assert torch.equal(ptr["b"].sum().get(), torch.tensor(36.0))  # 1 + 3 + 5 + 7 + 9 + 11
        node.unpublish("tiny")
        _eventually(lambda: grid.search("#tiny") == {})
        with pytest.raises(NotFound):
            ptr.get()


def _eventually(check, timeout: float = 10.0):  # type: ignore[no-untyped-def]
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def test_tickets_report_status_and_can_be_picked_up_again(local_grid: LocalGrid, births_feb):
    with local_grid.connect("alice") as grid:
        births = grid.search("#birth-records", "#february")["hospital"][0]
        ticket = births.var(dim=0).submit()
        assert ticket.status in {"queued", "running", "done"}
        ticket.wait()
        assert ticket.status == "done"
        job_id = ticket.id
        # a job for a node the gateway does not know fails at once, naming the known ones
        nowhere = DataPointer(grid, "nowhere", InputRef(kind="dataset", name="x"), births.spec)
        with pytest.raises(NotFound, match="'nowhere' is not registered at the gateway; registered: .*hospital"):
            nowhere.sum().submit()
        # a ticket for a job never sent is NotFound at once (issue 16), not 'queued' until a timeout
        started = time.monotonic()
        with pytest.raises(NotFound, match="no job hospital:0{32} was sent on this broker"):
            grid.ticket("hospital:" + "0" * 32)
        assert time.monotonic() - started < 2
    with local_grid.connect("alice") as again:  # as from a new process: only the id is needed
        picked = again.ticket(job_id)
        assert picked.status == "done"
        assert torch.allclose(picked.result().get(), births_feb.var(dim=0))
