"""Only enrolled nodes take part, and old node messages stay old — on a real grid whose broker
has one ACL user per role, attacked through the scientist's own broker user (which may push
onto the gateway's queue, as every search does):

* a node of the scientist's own (a lure dataset for alice's search) is refused, naming the
  operator's `gridq enrol`;
* a node id the operator enrolled cannot be claimed with another key, before the real node
  starts or after;
* a publication captured on its way and sent again after its dataset was withdrawn is refused,
  also after the gateway restarted (its nonces are in its database), and one held back and
  released after the withdrawal is refused as stale — the dataset stays withdrawn."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from ops.demo import prepare
from ops.local import LocalGrid
from orchestrator.grid import Grid
from protocol.contract import GATEWAY, GATEWAY_QUEUE, Tasks
from protocol.envelope import seal_envelope
from protocol.identity import Identity
from protocol.messages import DatasetMeta, GatewayReply, PublishDataset, RegisterNode
from workers.node import Node

ANNEX_CONFIG = """
[node]
id = "annex"
broker = "${GRIDQ_BROKER}"
store = "${GRIDQ_HOME}/annex"
identity = "${GRIDQ_HOME}/keys/annex.key"

[users.alice]
public_key_file = "${GRIDQ_HOME}/keys/alice.pub"

[[datasets]]
name = "annex-births"
path = "${GRIDQ_HOME}/data/hospital_births_feb.csv"
tags = ["#annex"]
allowed_users = ["alice"]
bounds = { weight = [0.0, 7.0], height = [20.0, 65.0] }
"""


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalGrid]:
    home = tmp_path_factory.mktemp("enrolment-grid")
    hospital = prepare(home)[0]
    with LocalGrid(home, acl=True) as lg:
        lg.start([hospital])
        yield lg


def to_gateway(scientist: Grid, task: str, envelope: dict[str, Any]) -> GatewayReply:
    """Push ``envelope`` onto the gateway's queue with the scientist's broker user; the reply."""
    job_id = uuid.uuid4().hex
    scientist.transport.app.send_task(task, args=[envelope], queue=GATEWAY_QUEUE, task_id=job_id)
    found = scientist.transport.result(job_id, 60)
    assert found is not None, "the gateway did not answer"
    reply = GatewayReply.model_validate(json.loads(found[1]["body"]))
    assert found[1]["sender"] == GATEWAY
    return reply


def signed(who: Identity, body: RegisterNode | PublishDataset) -> dict[str, Any]:
    return seal_envelope(who, recipient=GATEWAY, kind=body.kind, job_id=uuid.uuid4().hex,
                         body=body.model_dump(mode="json"), now=time.time()).model_dump(mode="json")


def bait(node: str) -> DatasetMeta:
    return DatasetMeta(node=node, name="births-feb-full", shape=(240, 2), dtype="float32",
                       description="Monthly birth records: weight (kg), height (cm) — complete, no DP",
                       tags=["#birth-records", "#february"])


def error(reply: GatewayReply) -> tuple[str, str]:
    assert reply.error is not None, "accepted"
    return reply.error.code, reply.error.message


def test_a_scientist_cannot_bring_in_a_node_of_its_own(grid: LocalGrid) -> None:
    lure = Identity.generate("lure")
    with grid.connect("carol") as carol:
        code, message = error(to_gateway(carol, Tasks.REGISTER, signed(lure, RegisterNode(
            public_key=lure.public.text(), datasets=[bait("lure")]))))
        assert code == "not_enrolled" and "gridq enrol lure --key lure.pub" in message
        code, _ = error(to_gateway(carol, Tasks.PUBLISH, signed(lure, PublishDataset(dataset=bait("lure")))))
        assert code == "not_enrolled"
    with grid.connect("alice") as alice:
        assert set(alice.search("#birth-records", "#february")) == {"hospital"}
        assert "lure" not in {n.node for n in alice.nodes()}


def test_an_enrolled_node_id_cannot_be_claimed_with_another_key(grid: LocalGrid) -> None:
    grid.enrol("annex")  # the operator enrols the annex; its node has not started yet
    with grid.connect("carol") as carol:
        for node in ("annex", "hospital"):
            squatter = Identity.generate(node)
            code, message = error(to_gateway(carol, Tasks.REGISTER, signed(squatter, RegisterNode(
                public_key=squatter.public.text(), datasets=[bait(node)]))))
            assert code == "not_enrolled" and f"gridq enrol {node} --key {node}.pub --replace" in message
    config = grid.home / "annex.toml"
    config.write_text(ANNEX_CONFIG)
    grid.start_node(config, "annex")
    try:
        grid.wait_ready(["annex"])
        with grid.connect("alice") as alice:
            listed = {n.node: n.public_key for n in alice.nodes()}
            assert listed["annex"] == (grid.keys / "annex.pub").read_text().strip()
            assert [p.name for p in alice.search("#annex")["annex"]] == ["annex-births"]
            assert [p.name for p in alice.search("#birth-records", "#february")["hospital"]] == ["birth-records-feb"]
            assert "annex" not in alice.search("#birth-records", "#february")
    finally:
        grid.kill("annex")


def _listed(grid: LocalGrid, tag: str, present: bool, timeout: float = 30.0) -> bool:
    with grid.connect("alice") as alice:
        deadline = time.monotonic() + timeout
        while ("hospital" in alice.search(tag)) != present and time.monotonic() < deadline:
            time.sleep(0.2)
        return "hospital" in alice.search(tag)


class Captured:
    """What the owner's node sends to the gateway, as anyone reading the broker would see it;
    ``withhold`` keeps the next message from the broker (someone popped it off the queue)."""

    def __init__(self, owner: Node) -> None:
        self.sent: list[dict[str, Any]] = []
        self.withhold = False
        self._send = owner.app.send_task
        owner.app.send_task = self  # type: ignore[method-assign]

    def __call__(self, name: str, args: list[Any], **options: Any) -> Any:
        self.sent.append(args[0])
        if self.withhold:
            self.withhold = False
            return None
        return self._send(name, args=args, **options)


def test_a_withdrawn_dataset_stays_withdrawn(grid: LocalGrid) -> None:
    owner = grid.owner(grid.home / "nodes" / "hospital.toml")
    try:
        capture = Captured(owner)
        data = torch.arange(6.0).reshape(3, 2)
        owner.publish("replay-probe", data, columns=["a", "b"], tags=["#replay-probe"], allowed_users=["alice"])
        assert _listed(grid, "#replay-probe", True)
        (published,) = capture.sent
        capture.withhold = True  # a revision the gateway never receives …
        owner.publish("replay-probe", data * 2, columns=["a", "b"], tags=["#replay-probe"], allowed_users=["alice"],
                      replace=True)
        withheld = capture.sent[-1]
        owner.unpublish("replay-probe")  # … then the owner withdraws the dataset
        assert not _listed(grid, "#replay-probe", False)
    finally:
        owner.close()
    with grid.connect("carol") as carol:
        assert error(to_gateway(carol, Tasks.PUBLISH, published))[0] == "replayed_nonce"
        code, message = error(to_gateway(carol, Tasks.PUBLISH, withheld))
        assert code == "stale_message" and "older than one the gateway accepted" in message
    grid.kill("gateway")
    grid.start_gateway()  # nonces and stamps are in its database, not its memory
    with grid.connect("carol") as carol:
        assert error(to_gateway(carol, Tasks.PUBLISH, published))[0] == "replayed_nonce"
        assert error(to_gateway(carol, Tasks.PUBLISH, withheld))[0] == "replayed_nonce"  # now seen, too
    assert not _listed(grid, "#replay-probe", True, timeout=2)
