"""The gateway's registry over SQLite: only enrolled nodes register, with their enrolled key;
searches match every tag and every word, and publishing, unpublishing or registering again
changes what is found."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import workers.gateway.registry as registry_module
from protocol.errors import AuthenticationError, NotEnrolled, NotFound
from protocol.identity import Identity
from protocol.messages import DatasetMeta
from workers.gateway.registry import Registry


def _meta(node: str, name: str, description: str = "", tags: tuple[str, ...] = ()) -> DatasetMeta:
    return DatasetMeta(node=node, name=name, shape=(10, 2), dtype="float32", description=description, tags=list(tags))


BIRTHS = _meta("ward", "births", "Births in the maternity ward, 2024", ("#ward", "#Births"))
DEATHS = _meta("ward", "deaths", "Deaths on the ward", ("#ward", "#mortality"))
VISITS = _meta("clinic", "visits", "Outpatient visits and births referred", ("#clinic", "#births"))
KEYS = {name: Identity.generate(name).public.text() for name in ("ward", "clinic", "mallory")}
_sent = iter(range(1, 10_000))


def sent() -> dict[str, Any]:
    """A fresh envelope's issue time and nonce, newer than every one before."""
    n = next(_sent)
    return {"issued_at": float(n), "nonce": f"{n:032x}"}


@pytest.fixture
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Registry]:
    clock = iter(float(t) for t in range(1000, 2000))
    monkeypatch.setattr(registry_module, "time", SimpleNamespace(time=lambda: next(clock)))
    reg = Registry(f"sqlite:///{tmp_path / 'gateway.db'}")
    reg.enrol("ward", KEYS["ward"])
    reg.enrol("clinic", KEYS["clinic"])
    reg.register("ward", KEYS["ward"], [BIRTHS, DEATHS], **sent())
    reg.register("clinic", KEYS["clinic"], [VISITS], **sent())
    yield reg
    reg.engine.dispose()


def _names(found: list[DatasetMeta]) -> list[str]:
    return [f"{m.node}/{m.name}" for m in found]


@pytest.mark.parametrize("tags, words, node, expected", [
    ([], [], None, ["clinic/visits", "ward/births", "ward/deaths"]),  # everything, by node then name
    (["#ward"], [], None, ["ward/births", "ward/deaths"]),
    (["#births"], [], None, ["clinic/visits", "ward/births"]),  # tags match in any case
    (["#ward", "#births"], [], None, ["ward/births"]),  # every tag, not any
    (["#ward", "#nowhere"], [], None, []),
    ([], ["BIRTHS"], None, ["clinic/visits", "ward/births"]),  # words: name or description, any case
    ([], ["births", "2024"], None, ["ward/births"]),  # every word
    ([], ["deaths"], None, ["ward/deaths"]),  # in the name only
    ([], ["outpatient"], None, ["clinic/visits"]),  # in the description only
    (["#births"], [], "clinic", ["clinic/visits"]),
    ([], [], "ward", ["ward/births", "ward/deaths"]),
    ([], [], "nowhere", []),
])
def test_search(registry: Registry, tags: list[str], words: list[str], node: str | None, expected: list[str]) -> None:
    assert _names(registry.search(tags, words, node)) == expected


def test_search_returns_the_metadata_as_published(registry: Registry) -> None:
    (found,) = registry.search(["#mortality"], [], "ward")
    assert found == DEATHS


def test_publish_and_unpublish_change_what_is_found(registry: Registry) -> None:
    registry.publish("clinic", _meta("clinic", "labs", "Lab results", ("#clinic",)), **sent())
    assert _names(registry.search(["#clinic"], [], None)) == ["clinic/labs", "clinic/visits"]
    registry.publish("ward", _meta("ward", "births", "Births, revised", ("#ward",)), **sent())  # again: replaces
    assert _names(registry.search(["#births"], [], None)) == ["clinic/visits"]
    assert registry.search([], ["revised"], None)[0].description == "Births, revised"
    registry.unpublish("ward", "deaths", **sent())
    assert _names(registry.search([], [], "ward")) == ["ward/births"]
    with pytest.raises(NotFound, match="'deaths'"):
        registry.unpublish("ward", "deaths", **sent())


def test_a_node_must_register_before_it_publishes(registry: Registry) -> None:
    with pytest.raises(NotFound, match="'stranger' publishes before it registered"):
        registry.publish("stranger", _meta("stranger", "labs"), **sent())
    assert registry.search([], [], "stranger") == []


def test_publishing_touches_the_node(registry: Registry) -> None:
    before = {n.node: n.last_seen for n in registry.nodes()}
    registry.publish("ward", _meta("ward", "labs"), **sent())
    after = {n.node: n.last_seen for n in registry.nodes()}
    assert after["ward"] > before["ward"] and after["clinic"] == before["clinic"]


def test_a_node_publishes_only_its_own_datasets(registry: Registry) -> None:
    with pytest.raises(AuthenticationError, match="'clinic' cannot publish a dataset of node 'ward'"):
        registry.publish("clinic", _meta("ward", "forged"), **sent())
    with pytest.raises(AuthenticationError):
        registry.register("clinic", KEYS["clinic"], [_meta("ward", "forged")], **sent())
    assert registry.search([], ["forged"], None) == []
    assert _names(registry.search([], [], "clinic")) == ["clinic/visits"]


def test_registering_again_replaces_the_datasets(registry: Registry) -> None:
    registry.register("ward", KEYS["ward"], [_meta("ward", "admissions", tags=("#ward",))], **sent())
    assert _names(registry.search(["#ward"], [], None)) == ["ward/admissions"]
    registry.register("ward", KEYS["ward"], [], **sent())
    assert registry.search([], [], "ward") == [] and [n.node for n in registry.nodes()] == ["clinic", "ward"]


def test_only_the_enrolled_key_registers(registry: Registry) -> None:
    with pytest.raises(NotEnrolled, match="'ward' presents key .* enrolled with .*gridq enrol ward --key ward.pub "
                                          "--replace"):
        registry.register("ward", KEYS["mallory"], [], **sent())
    assert registry.enrolled_key("ward") == KEYS["ward"] and registry.enrolled_key("nowhere") is None
    assert _names(registry.search([], [], "ward")) == ["ward/births", "ward/deaths"]  # the refusal changed nothing
    with pytest.raises(NotEnrolled, match="'mallory' is not enrolled .*`gridq enrol mallory --key mallory.pub`"):
        registry.register("mallory", KEYS["mallory"], [_meta("mallory", "lure", tags=("#births",))], **sent())
    assert registry.search([], [], "mallory") == [] and "mallory" not in {n.node for n in registry.nodes()}


def test_nodes_are_listed_by_id_with_their_queue(registry: Registry) -> None:
    listed: list[dict[str, Any]] = [n.model_dump() for n in registry.nodes()]
    assert [(n["node"], n["public_key"], n["queue"]) for n in listed] == [
        ("clinic", KEYS["clinic"], "node.clinic"), ("ward", KEYS["ward"], "node.ward")]
    assert listed[0]["last_seen"] > listed[1]["last_seen"]  # clinic registered after ward
