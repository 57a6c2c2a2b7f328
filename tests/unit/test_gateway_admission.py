"""Who may register and publish at the gateway, and which of their messages still count:
only enrolled nodes with their enrolled key; a nonce is refused twice even across a gateway
restart (the nonces live in the registry's database); and a message older than one accepted
about the same dataset is stale, however new its nonce. The gateway's logic is driven with
real signed envelopes over SQLite (no broker: ``tests/integration/test_enrolment.py`` has it)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from protocol.contract import GATEWAY, Tasks
from protocol.envelope import seal_envelope
from protocol.errors import InvalidRequest, NotEnrolled, NotFound, StaleMessage
from protocol.identity import Identity
from protocol.messages import DatasetMeta, GatewayReply, PublishDataset, RegisterNode, UnpublishDataset
from workers.gateway.nonces import SWEEP_EVERY, RegistryNonces
from workers.gateway.registry import Registry
from workers.gateway.service import Gateway

WARD = Identity.generate("ward")
MALLORY = Identity.generate("mallory")


def meta(name: str, node: str = "ward", tags: tuple[str, ...] = ("#ward",)) -> DatasetMeta:
    return DatasetMeta(node=node, name=name, shape=(3, 2), dtype="float32", tags=list(tags))


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'gateway.db'}"


@pytest.fixture
def registry(url: str) -> Iterator[Registry]:
    reg = Registry(url)
    reg.enrol("ward", WARD.public.text())
    yield reg
    reg.engine.dispose()


def names(reg: Registry, node: str = "ward") -> list[str]:
    return [m.name for m in reg.search([], [], node)]


# --- enrolment -------------------------------------------------------------------------------------------


def test_enrolment_is_idempotent_and_a_new_key_must_be_asked_for(registry: Registry) -> None:
    assert registry.enrol("ward", WARD.public.text() + "\n") is False  # the same key, as a .pub file holds it
    registry.register("ward", WARD.public.text(), [meta("births")], issued_at=1.0, nonce="a" * 32)
    with pytest.raises(InvalidRequest, match="enrolled with another key .*gridq enrol ward --key ward.pub --replace"):
        registry.enrol("ward", MALLORY.public.text())
    assert registry.enrolled_key("ward") == WARD.public.text() and names(registry) == ["births"]
    rekeyed = Identity.generate("ward").public.text()
    assert registry.enrol("ward", rekeyed, replace=True) is True
    # registered under the old key: dropped until the node registers with the new one
    assert registry.enrolments() == [("ward", rekeyed)] and registry.nodes() == [] and names(registry) == []


def test_enrolment_checks_the_id_and_the_key(registry: Registry) -> None:
    with pytest.raises(InvalidRequest, match="not a node id"):
        registry.enrol("ward; drop", WARD.public.text())
    with pytest.raises(InvalidRequest, match="must start with 'gridq1:'"):
        registry.enrol("clinic", "ssh-ed25519 AAAA")
    assert registry.enrolments() == [("ward", WARD.public.text())]


def test_unenrolling_takes_the_node_out_of_the_registry(registry: Registry) -> None:
    registry.register("ward", WARD.public.text(), [meta("births")], issued_at=1.0, nonce="a" * 32)
    registry.unenrol("ward")
    assert registry.enrolments() == [] and registry.nodes() == [] and names(registry) == []
    with pytest.raises(NotEnrolled, match="'ward' is not enrolled"):
        registry.register("ward", WARD.public.text(), [meta("births")], issued_at=2.0, nonce="b" * 32)
    with pytest.raises(NotFound, match="gridq enrolled"):
        registry.unenrol("ward")


# --- staleness ---------------------------------------------------------------------------------------------


class Clock:
    """Issue times and nonces of a node's successive messages."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> dict[str, Any]:
        self.t += 1.0
        return {"issued_at": self.t, "nonce": f"{int(self.t):032x}"}


def test_a_withdrawn_dataset_does_not_come_back_by_an_older_publication(registry: Registry) -> None:
    sent = Clock()
    registry.register("ward", WARD.public.text(), [], **sent())
    first = sent()
    registry.publish("ward", meta("births"), **first)
    withheld = sent()  # a republication someone held back (a new nonce: the gateway never saw it)
    registry.unpublish("ward", "births", **sent())
    with pytest.raises(StaleMessage, match="publication about dataset 'births' of node 'ward' .* older than"):
        registry.publish("ward", meta("births"), **withheld)
    with pytest.raises(StaleMessage):
        registry.publish("ward", meta("births"), issued_at=first["issued_at"], nonce="f" * 32)
    assert names(registry) == []
    registry.publish("ward", meta("births"), **sent())  # the owner publishing again: newer, accepted
    assert names(registry) == ["births"]


def test_a_withdrawal_counts_even_when_nothing_was_listed(registry: Registry) -> None:
    sent = Clock()
    registry.register("ward", WARD.public.text(), [], **sent())
    withheld = sent()  # the publication never reached the gateway …
    with pytest.raises(NotFound):
        registry.unpublish("ward", "births", **sent())  # … so its withdrawal finds nothing, but is recorded
    with pytest.raises(StaleMessage):
        registry.publish("ward", meta("births"), **withheld)
    assert names(registry) == []


def test_a_registration_replaces_every_older_publication(registry: Registry) -> None:
    sent = Clock()
    registry.register("ward", WARD.public.text(), [meta("births")], **sent())
    withheld = sent()
    registry.register("ward", WARD.public.text(), [], **sent())  # the node restarted without the dataset
    with pytest.raises(StaleMessage):
        registry.publish("ward", meta("deaths"), **withheld)
    late = sent()
    registry.publish("ward", meta("deaths"), **sent())
    with pytest.raises(StaleMessage, match="registration about node 'ward'"):  # older than a publication since
        registry.register("ward", WARD.public.text(), [meta("births")], **late)
    assert names(registry) == ["deaths"]


def test_the_same_message_redelivered_is_not_stale_and_other_datasets_do_not_interfere(registry: Registry) -> None:
    sent = Clock()
    registry.register("ward", WARD.public.text(), [], **sent())
    births = sent()
    registry.publish("ward", meta("deaths"), **sent())
    registry.publish("ward", meta("births"), **births)  # older than the deaths one, but about another dataset
    registry.publish("ward", meta("births"), **births)  # a broker redelivery: the effect of one
    assert names(registry) == ["births", "deaths"]


# --- nonces -----------------------------------------------------------------------------------------------


def test_nonces_outlive_the_gateway_process(registry: Registry, url: str) -> None:
    nonces = RegistryNonces(registry)
    later = time.time() + 600
    assert nonces.remember("ward", "n" * 32, "delivery-1", later)
    assert nonces.remember("ward", "n" * 32, "delivery-1", later)  # redelivered: not a replay
    assert not nonces.remember("ward", "n" * 32, "delivery-2", later)
    assert nonces.remember("clinic", "n" * 32, "delivery-2", later)  # nonces are per sender
    restarted = Registry(url)
    try:
        again = RegistryNonces(restarted)
        assert not again.remember("ward", "n" * 32, "delivery-3", later)
        assert again.remember("ward", "n" * 32, "delivery-1", later)
    finally:
        restarted.engine.dispose()


def test_expired_nonces_are_swept(registry: Registry) -> None:
    nonces = RegistryNonces(registry)
    now = time.time()
    assert nonces.remember("ward", "old" * 8, "d1", now - 1)  # the first remember sweeps: nothing yet
    assert nonces.remember("ward", "new" * 8, "d2", now + 600)
    assert nonces.forget_expired(now) == 1
    assert nonces.remember("ward", "old" * 8, "d3", now + 600)  # gone (its envelope is refused as expired anyway)
    assert not nonces.remember("ward", "new" * 8, "d4", now + 600)
    nonces.remember("ward", "x" * 32, "d5", now - 1)
    nonces._remembered = SWEEP_EVERY  # the next remember sweeps
    nonces.remember("ward", "y" * 32, "d6", now + 600)
    assert nonces.remember("ward", "x" * 32, "d7", now + 600)


# --- through the gateway's logic, with signed envelopes ----------------------------------------------------------


def send(gateway: Gateway, who: Identity, body: RegisterNode | PublishDataset | UnpublishDataset,
         raw: dict[str, Any] | None = None, delivery: str | None = None) -> tuple[dict[str, Any], GatewayReply]:
    """Seal ``body`` as ``who`` (or send ``raw`` as it is) and serve it; the envelope and the reply."""
    task = {"register": Tasks.REGISTER, "publish": Tasks.PUBLISH, "unpublish": Tasks.UNPUBLISH}[body.kind]
    if raw is None:
        raw = seal_envelope(who, recipient=GATEWAY, kind=body.kind, job_id=delivery or f"job-{time.monotonic_ns()}",
                            body=body.model_dump(mode="json"), now=time.time()).model_dump(mode="json")
    answer = gateway.answer(task, raw, delivery or str(raw["job_id"]) + "-again")
    return raw, GatewayReply.model_validate(json.loads(answer.signed["body"]))


def code(reply: GatewayReply) -> str | None:
    return reply.error.code if reply.error else None


def test_the_gateway_admits_enrolled_nodes_only(registry: Registry) -> None:
    gateway = Gateway(Identity.generate(GATEWAY), registry)
    lure = Identity.generate("lure")
    _, reply = send(gateway, lure, RegisterNode(public_key=lure.public.text(), datasets=[meta("bait", "lure")]))
    assert code(reply) == "not_enrolled" and "gridq enrol lure --key lure.pub" in reply.error.message  # type: ignore[union-attr]
    _, reply = send(gateway, lure, PublishDataset(dataset=meta("bait", "lure")))
    assert code(reply) == "not_enrolled"
    squatter = Identity.generate("ward")  # the enrolled id, another key
    _, reply = send(gateway, squatter, RegisterNode(public_key=squatter.public.text(), datasets=[meta("bait")]))
    assert code(reply) == "not_enrolled" and "--replace" in reply.error.message  # type: ignore[union-attr]
    _, reply = send(gateway, squatter, RegisterNode(public_key=WARD.public.text(), datasets=[meta("bait")]))
    assert code(reply) == "bad_signature"  # presenting the real key does not help: the signature is checked
    assert registry.search([], [], None) == [] and registry.nodes() == []
    _, reply = send(gateway, WARD, RegisterNode(public_key=WARD.public.text(), datasets=[meta("births")]))
    assert code(reply) is None and names(registry) == ["births"]


def test_a_captured_publication_replayed_after_a_restart_is_refused(registry: Registry, url: str) -> None:
    gateway = Gateway(Identity.generate(GATEWAY), registry)
    send(gateway, WARD, RegisterNode(public_key=WARD.public.text()))
    captured, reply = send(gateway, WARD, PublishDataset(dataset=meta("births")), delivery="publish-1")
    assert code(reply) is None
    send(gateway, WARD, UnpublishDataset(name="births"))
    assert names(registry) == []
    _, reply = send(gateway, WARD, PublishDataset(dataset=meta("births")), raw=captured, delivery="replay-1")
    assert code(reply) == "replayed_nonce"
    restarted = Registry(url)
    try:
        _, reply = send(Gateway(Identity.generate(GATEWAY), restarted), WARD, PublishDataset(dataset=meta("births")),
                        raw=captured, delivery="replay-2")
        assert code(reply) == "replayed_nonce" and names(restarted) == []
    finally:
        restarted.engine.dispose()


def test_a_registration_from_before_enrolment_is_not_listed(registry: Registry) -> None:
    from workers.gateway.registry import DatasetRow, NodeRow

    with registry.session() as s:  # what trust on first use left in an older gateway.db
        s.add(NodeRow(id="lure", public_key=MALLORY.public.text(), last_seen=1.0))
        s.flush()
        s.add(DatasetRow(node="lure", name="bait", description="", tags=["#ward"],
                         meta=meta("bait", "lure").model_dump(mode="json")))
    registry.register("ward", WARD.public.text(), [meta("births")], issued_at=1.0, nonce="a" * 32)
    assert [m.node for m in registry.search(["#ward"], [], None)] == ["ward"]
    assert [n.node for n in registry.nodes()] == ["ward"]
