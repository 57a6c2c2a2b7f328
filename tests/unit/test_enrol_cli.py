"""The operator's enrolment commands (`gridq enrol`, `enrolled`, `unenrol`) on the gateway's
database in $GRIDQ_HOME, and compose's `init` enrolling the demo nodes whose keys it makes."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from ops.cli import app
from ops.compose_init import enrol_demo_nodes
from ops.enrol import enrol, gateway_database
from ops.keys import write_identity
from ops.local import NODE_CONFIGS
from protocol.errors import InvalidRequest
from workers.gateway.registry import Registry


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("GRIDQ_HOME", str(tmp_path))
    return tmp_path


def enrolments(home: Path) -> list[tuple[str, str]]:
    registry = Registry(gateway_database(home))
    try:
        return registry.enrolments()
    finally:
        registry.engine.dispose()


def gridq(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})
    return result.exit_code, result.output


def test_the_operator_enrols_lists_and_unenrols_a_node(home: Path) -> None:
    key = write_identity(home / "keys", "annex").public.text()
    code, out = gridq("enrol", "annex", "--key", str(home / "keys" / "annex.pub"))
    assert code == 0 and "annex enrolled" in out
    assert enrolments(home) == [("annex", key)]  # in $GRIDQ_HOME/gateway.db, where the gateway keeps its registry
    assert "was already enrolled" in gridq("enrol", "annex", "--key", str(home / "keys" / "annex.pub"))[1]
    code, out = gridq("enrolled")
    assert code == 0 and out.split() == ["annex", key]
    other = write_identity(home / "other", "annex").public.text()
    code, _ = gridq("enrol", "annex", "--key", str(home / "other" / "annex.pub"))
    assert code != 0 and enrolments(home) == [("annex", key)]
    assert gridq("enrol", "annex", "--key", str(home / "other" / "annex.pub"), "--replace")[0] == 0
    assert enrolments(home) == [("annex", other)]
    assert gridq("unenrol", "annex")[0] == 0 and enrolments(home) == []


def test_a_secret_key_file_is_refused(home: Path) -> None:
    write_identity(home / "keys", "annex")
    with pytest.raises(InvalidRequest, match="is a secret key file; enrol a node with its public key"):
        enrol(gateway_database(home), "annex", home / "keys" / "annex.key")
    assert enrolments(home) == []


def test_compose_init_enrols_the_demo_nodes_once(home: Path) -> None:
    nodes = sorted(c.stem for c in NODE_CONFIGS.glob("*.toml"))
    for node in nodes:
        write_identity(home / "keys", node)
    assert enrol_demo_nodes(home) == nodes
    first = enrolments(home)
    assert [n for n, _ in first] == nodes
    assert [k for _, k in first] == [(home / "keys" / f"{n}.pub").read_text().strip() for n in nodes]
    enrol_demo_nodes(home)  # a re-run of init changes nothing
    assert enrolments(home) == first


def test_enrolment_gives_and_takes_a_nodes_broker_user(home: Path) -> None:
    """On the gateway's host the broker's users follow enrolment: `gridq enrol` writes the new
    node's user and URL and tells the broker — here a broker that is down, which is said
    (the file is written for its next start), not hidden."""
    from ops.broker_users import ensure_broker_users
    from ops.local import free_port
    from protocol.errors import BrokerUnavailable

    ensure_broker_users(home, port=free_port())  # nobody listens there
    write_identity(home / "keys", "annex")
    result = CliRunner().invoke(app, ["enrol", "annex", "--key", str(home / "keys" / "annex.pub")])
    assert result.exit_code != 0 and isinstance(result.exception, BrokerUnavailable)
    assert "users.acl is written" in str(result.exception) and "--aclfile" in str(result.exception)
    assert enrolments(home)[0][0] == "annex"  # the enrolment itself stands
    assert (home / "broker" / "node-annex.url").read_text().startswith("redis://node-annex:")
    assert "user node-annex on #" in (home / "broker" / "users.acl").read_text()
    assert "%W~node.annex" in (home / "broker" / "users.acl").read_text()  # scientists may now send to it
    CliRunner().invoke(app, ["unenrol", "annex"])
    assert not (home / "broker" / "node-annex.url").exists()
    assert "node-annex" not in (home / "broker" / "users.acl").read_text()
    assert "node.annex" not in (home / "broker" / "users.acl").read_text()


def test_without_broker_acls_a_node_gets_the_open_url(home: Path) -> None:
    from ops.broker_users import open_broker_urls

    open_broker_urls(home, "redis://127.0.0.1:6390/0")
    write_identity(home / "keys", "annex")
    assert gridq("enrol", "annex", "--key", str(home / "keys" / "annex.pub"))[0] == 0
    assert (home / "broker" / "node-annex.url").read_text().strip() == "redis://127.0.0.1:6390/0"
    assert gridq("unenrol", "annex")[0] == 0 and not (home / "broker" / "node-annex.url").exists()
