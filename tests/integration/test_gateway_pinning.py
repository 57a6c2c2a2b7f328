"""The gateway's key is pinned on first contact (issue 15, part 7), as ssh's known_hosts:
whoever can write the broker's ``gridq:gateway:identity`` (a stolen gateway credential)
cannot make a client or a node trust another gateway, and a real rotation is accepted
with ``gridq trust-gateway``.

These tests post another key on the broker, so they run on a grid of their own.
"""

from __future__ import annotations

import json
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis
from typer.testing import CliRunner

from ops.cli import app
from ops.demo import prepare
from ops.local import LocalGrid
from orchestrator import Grid
from orchestrator.known_gateways import KnownGateways
from protocol.contract import GATEWAY_IDENTITY_KEY
from protocol.errors import GatewayKeyChanged
from protocol.identity import Identity
from protocol.pinning import broker_address, fingerprint

MALLORY = Identity.generate("gateway").public.text()


@pytest.fixture(scope="module")
def lg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalGrid]:
    home = tmp_path_factory.mktemp("pinning")
    configs = prepare(home)
    with LocalGrid(home) as grid:
        grid.start(configs[:1])  # the gateway and the hospital
        yield grid


@contextmanager
def posted(lg: LocalGrid, key: str) -> Iterator[None]:
    """``key`` posted as the gateway's (what a stolen gateway credential allows); the real
    one again after."""
    with redis.Redis.from_url(lg.url) as admin:
        admin.set(GATEWAY_IDENTITY_KEY, json.dumps({"name": "gateway", "public_key": key}))
        try:
            yield
        finally:
            admin.set(GATEWAY_IDENTITY_KEY, json.dumps({"name": "gateway", "public_key": lg.gateway_key()}))


def test_first_contact_pins_the_key_and_a_swapped_one_is_refused(lg: LocalGrid, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRIDQ_HOME", str(tmp_path / "home"))
    alice = lg.keys / "alice.key"
    with Grid.connect(lg.url, alice, timeout=30) as grid:
        assert "hospital" in grid.search("#birth-records")  # the gateway's answer, verified with the pinned key
    known = tmp_path / "home" / "known_gateways"
    assert KnownGateways(known).read() == {broker_address(lg.url): lg.gateway_key()}
    assert stat.S_IMODE(known.stat().st_mode) == 0o600
    assert stat.S_IMODE(known.parent.stat().st_mode) == 0o700
    with posted(lg, MALLORY):
        with pytest.raises(GatewayKeyChanged) as refused:
            Grid.connect(lg.url, alice, timeout=30)
        # an explicit key is trusted as given, whatever the broker posts
        with Grid.connect(lg.url, alice, timeout=30, gateway_key=lg.gateway_key()) as grid:
            assert "hospital" in grid.search("#birth-records")
    message = str(refused.value)
    assert str(known) in message and f"`gridq trust-gateway {lg.url}`" in message
    assert fingerprint(MALLORY) in message and fingerprint(lg.gateway_key()) in message
    assert KnownGateways(known).read() == {broker_address(lg.url): lg.gateway_key()}  # the pin stands
    with Grid.connect(lg.url, alice, timeout=30) as grid:  # the real key back: trusted again
        assert grid.nodes()


def test_a_rotation_is_accepted_with_trust_gateway(lg: LocalGrid, tmp_path: Path) -> None:
    env = {"GRIDQ_HOME": str(tmp_path), "GRIDQ_BROKER": lg.url, "COLUMNS": "200"}
    known = KnownGateways(tmp_path / "known_gateways")
    address = broker_address(lg.url)
    run = CliRunner().invoke
    assert run(app, ["trust-gateway", lg.url, "--yes"], env=env).exit_code == 0  # no pin yet: pins the posted key
    assert known.read() == {address: lg.gateway_key()}
    with posted(lg, MALLORY):
        declined = run(app, ["trust-gateway", lg.url], input="n\n", env=env)
        assert declined.exit_code == 1 and fingerprint(MALLORY) in declined.output
        assert known.read() == {address: lg.gateway_key()}
        accepted = run(app, ["trust-gateway"], input="y\n", env=env)  # the broker from $GRIDQ_BROKER
        assert accepted.exit_code == 0, accepted.output
        assert known.read() == {address: MALLORY}
    # the key the operator gives, pinned as given (the broker is not asked)
    back = run(app, ["trust-gateway", lg.url, "--key", lg.gateway_key(), "--yes"], env=env)
    assert back.exit_code == 0 and fingerprint(lg.gateway_key()) in back.output
    assert known.read() == {address: lg.gateway_key()}


def test_a_node_pins_the_key_in_its_database(lg: LocalGrid) -> None:
    config = lg.home / "nodes" / "hospital.toml"
    env = {"GRIDQ_HOME": str(lg.home), "GRIDQ_BROKER": lg.url, "COLUMNS": "200"}
    address = broker_address(lg.url)
    node = lg.owner(config)
    try:
        # other nodes' keys (secure aggregation, MPC) come from the gateway's signed list
        assert node._node_key("hospital") == node.identity.public
        assert node.store.pinned_gateway(address) == lg.gateway_key()
        with posted(lg, MALLORY):
            fresh = lg.owner(config)  # a new process's directory: it reads the posted key again
            try:
                with pytest.raises(GatewayKeyChanged, match=r"node's database .*`gridq trust-gateway --node hospital`"):
                    fresh._node_key("hospital")
            finally:
                fresh.close()
            accepted = CliRunner().invoke(app, ["trust-gateway", "--node", str(config), "--yes"], env=env)
            assert accepted.exit_code == 0, accepted.output
            assert node.store.pinned_gateway(address) == MALLORY
        back = CliRunner().invoke(app, ["trust-gateway", "--node", "hospital", "--key", lg.gateway_key(), "--yes"],
                                  env=env)
        assert back.exit_code == 0, back.output
        assert node.store.pinned_gateway(address) == lg.gateway_key()
    finally:
        node.close()


def test_the_embedded_grids_own_clients_pin_nothing(lg: LocalGrid, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRIDQ_HOME", str(tmp_path))
    with lg.connect("alice", timeout=30) as grid:
        assert grid.nodes()
    assert list(tmp_path.iterdir()) == []
