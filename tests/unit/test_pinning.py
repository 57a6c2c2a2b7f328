"""Gateway keys pinned on first contact (protocol.pinning), kept in a participant's
known_gateways file (orchestrator.known_gateways) or a node's database (workers.storage.store)."""

from __future__ import annotations

import json
import multiprocessing
import stat
from pathlib import Path

import pytest

from orchestrator.known_gateways import KnownGateways
from protocol.errors import GatewayKeyChanged, InvalidRequest
from protocol.identity import Identity
from protocol.pinning import MemoryPins, broker_address, fingerprint, posted_gateway_key, shown, trust_on_first_use

KEY = Identity.generate("gateway").public.text()
OTHER = Identity.generate("gateway").public.text()


@pytest.mark.parametrize(("url", "address"), [
    ("redis://127.0.0.1:6379/0", "127.0.0.1:6379/0"),
    ("redis://scientist:s3cret@127.0.0.1:6379/0", "127.0.0.1:6379/0"),  # every broker user: one gateway
    ("redis://Broker.Example", "broker.example:6379/0"),
    ("rediss://[::1]:7000/2", "[::1]:7000/2"),
    ("redis://h:1/?db=4", "h:1/4"),
    ("unix:///run/redis.sock?db=3", "unix:/run/redis.sock/3"),
])
def test_a_pin_is_keyed_by_the_brokers_address_without_credentials(url: str, address: str) -> None:
    assert broker_address(url) == address


@pytest.mark.parametrize("url", ["http://x:1/0", "redis://h:1/zero", "redis:///0"])
def test_a_url_that_is_no_broker_is_refused(url: str) -> None:
    with pytest.raises(InvalidRequest):
        broker_address(url)


def test_shown_urls_hide_the_password() -> None:
    assert shown("redis://node:s3cret@h:1/0") == "redis://node:***@h:1/0"
    assert shown("redis://h:1/0") == "redis://h:1/0"


def test_the_first_key_is_pinned_and_a_changed_one_refused_naming_the_fix() -> None:
    pins = MemoryPins()
    assert trust_on_first_use(pins, "h:1/0", KEY, accept="`gridq trust-gateway redis://h:1/0`") == KEY
    assert trust_on_first_use(pins, "h:1/0", KEY, accept="unused") == KEY
    with pytest.raises(GatewayKeyChanged) as info:
        trust_on_first_use(pins, "h:1/0", OTHER, accept="`gridq trust-gateway redis://h:1/0`")
    message = str(info.value)
    assert pins.where in message and "`gridq trust-gateway redis://h:1/0`" in message
    assert fingerprint(KEY) in message and fingerprint(OTHER) in message
    assert pins.pinned_gateway("h:1/0") == KEY  # the refusal changed nothing
    # another broker is another pin
    assert trust_on_first_use(pins, "h:2/0", OTHER, accept="") == OTHER


def test_what_is_posted_must_be_a_key() -> None:
    assert posted_gateway_key(json.dumps({"name": "gateway", "public_key": KEY}).encode(), "h:1/0") == KEY
    for junk in (b"not json", b"{}", json.dumps({"public_key": "gridq1:short"}).encode()):
        with pytest.raises(InvalidRequest, match="not a gateway's public key"):
            posted_gateway_key(junk, "h:1/0")


def test_the_file_is_the_owners_only_and_first_writer_wins(tmp_path: Path) -> None:
    home = tmp_path / "home"
    known = KnownGateways(home / "known_gateways")
    assert known.pinned_gateway("h:1/0") is None and not known.path.exists()  # reading creates nothing
    assert known.pin_gateway("h:1/0", KEY) == KEY
    assert known.pin_gateway("h:1/0", OTHER) == KEY
    assert stat.S_IMODE(known.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    assert known.pin_gateway("h:1/0", OTHER, replace=True) == OTHER
    assert KnownGateways(known.path).read() == {"h:1/0": OTHER}
    assert stat.S_IMODE(known.path.stat().st_mode) == 0o600  # replaced whole, still 0600


def test_a_damaged_line_names_the_file_and_the_line(tmp_path: Path) -> None:
    file = tmp_path / "known_gateways"
    file.write_text(f"# comment\nh:1/0 {KEY}\nh:2/0\n")
    with pytest.raises(InvalidRequest, match=r"known_gateways, line 3"):
        KnownGateways(file).pinned_gateway("h:1/0")


def _pin(args: tuple[str, str]) -> str:
    path, key = args
    return KnownGateways(Path(path)).pin_gateway("h:1/0", key)


def test_concurrent_first_contacts_keep_one_pin(tmp_path: Path) -> None:
    keys = [Identity.generate("gateway").public.text() for _ in range(6)]
    with multiprocessing.get_context("fork").Pool(6) as pool:
        got = pool.map(_pin, [(str(tmp_path / "known_gateways"), k) for k in keys])
    assert len(set(got)) == 1 and got[0] in keys
    assert KnownGateways(tmp_path / "known_gateways").read() == {"h:1/0": got[0]}


def test_a_node_pins_in_its_own_database(tmp_path: Path) -> None:
    from workers.storage.store import Store

    store = Store(tmp_path / "store", f"sqlite:///{tmp_path / 'store' / 'node.db'}")
    try:
        assert store.pinned_gateway("h:1/0") is None
        assert trust_on_first_use(store, "h:1/0", KEY, accept="`gridq trust-gateway --node n`") == KEY
        with pytest.raises(GatewayKeyChanged, match=r"node's database .*--node n"):
            trust_on_first_use(store, "h:1/0", OTHER, accept="`gridq trust-gateway --node n`")
        assert store.pin_gateway("h:1/0", OTHER, replace=True) == OTHER
        assert store.pinned_gateway("h:1/0") == OTHER
    finally:
        store.close()
