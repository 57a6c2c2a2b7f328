"""Ordinary mistakes of a data scientist: each is a typed GridError at once, naming the fix —
never a pydantic, redis or kombu exception, never a wait for a timeout."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from ops.local import LocalGrid
from orchestrator import Grid
from protocol.errors import BrokerUnavailable, InvalidRequest, NotFound, SensitivityUnknown


@pytest.fixture()
def alice(local_grid: LocalGrid) -> Iterator[Grid]:
    with local_grid.connect("alice", timeout=30) as grid:
        yield grid


def births(grid: Grid):  # type: ignore[no-untyped-def]
    return grid.search("#birth-records", "#february")["hospital"][0]


def test_a_tag_without_a_hash_names_the_fix(alice: Grid) -> None:
    with pytest.raises(InvalidRequest, match=r"tags start with '#'"):
        alice.search("birth-records")


def test_arithmetic_with_a_tensor_runs_at_the_node(alice: Grid, births_feb: torch.Tensor) -> None:
    shift = torch.linspace(0.0, 1.0, births_feb.shape[0])
    got = (births(alice)["weight"] + shift).sum().get()
    assert torch.allclose(got, (births_feb[:, 0] + shift).sum())
    row = torch.tensor([1.0, -2.0])
    assert torch.allclose((births(alice) * row).sum(dim=0).get(), (births_feb * row).sum(dim=0))


def test_a_varying_tensor_constant_along_the_rows_widens_each_rows_bounds(alice: Grid) -> None:
    # a public shift per row is a row map: each row's contribution lies in [0, 7] + [0, 239]
    shift = torch.arange(240.0)
    released = (births(alice)["weight"] + shift).mean().get(epsilon=0.1)
    assert released.noise.sensitivity == pytest.approx((7.0 + 239.0) / 240)
    with pytest.raises(SensitivityUnknown, match="combines rows"):
        (births(alice)["weight"][1:] * births(alice)["weight"][:-1]).sum().get(epsilon=0.1)


def test_a_missing_key_file_says_how_to_make_one(local_grid: LocalGrid, tmp_path: Path) -> None:
    with pytest.raises(NotFound, match=r"gridq keys new nobody"):
        Grid.connect(local_grid.url, tmp_path / "nobody.key")


def test_a_key_by_name_is_read_from_gridq_home(local_grid: LocalGrid, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRIDQ_HOME", str(local_grid.home))
    monkeypatch.setenv("GRIDQ_BROKER", local_grid.url)
    with Grid.connect(identity="alice") as grid:
        assert grid.identity.name == "alice"


def test_a_ticket_id_that_is_not_one_fails_at_once(alice: Grid) -> None:
    with pytest.raises(InvalidRequest, match="not a job id"):
        alice.ticket("nonsense")
    with pytest.raises(NotFound, match="not registered"):
        alice.ticket("nowhere:" + "0" * 32)


def test_an_unknown_node_fails_at_once_listing_the_known_ones(alice: Grid) -> None:
    t0 = time.monotonic()
    with pytest.raises(NotFound, match=r"registered: .*hospital"):
        alice.budget("nowhere")
    with pytest.raises(NotFound, match="not registered"):
        alice.send(torch.nn.Sequential(torch.nn.Linear(2, 2)), "nowhere")
    assert time.monotonic() - t0 < 5


def test_a_dead_broker_is_a_typed_error(local_grid: LocalGrid) -> None:
    from ops.local import free_port

    with pytest.raises(BrokerUnavailable, match=r"Is Redis running there\?"):
        Grid.connect(f"redis://127.0.0.1:{free_port()}/0", local_grid.keys / "alice.key")


def test_no_broker_url_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GRIDQ_BROKER", raising=False)
    with pytest.raises(InvalidRequest, match="GRIDQ_BROKER"):
        Grid.connect(identity="alice")
