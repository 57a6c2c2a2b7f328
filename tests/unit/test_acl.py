"""The broker ACL generator (ops/acl.py): files, modes, idempotence, and rules that fit the
keys the code really uses. Loading the file into a real Redis is tested in
tests/integration/test_broker_acl.py."""

from __future__ import annotations

import fnmatch
import hashlib
import re
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from ops.acl import ROLES, acl_line, ensure_broker_users, role_url, rules, rules_table
from protocol.contract import (
    CLAIM_CHECK_PREFIX,
    GATEWAY_IDENTITY_KEY,
    MPC_MODELS_KEY,
    mpc_aggregated_key,
    mpc_bundle_key,
    mpc_pool_key,
    mpc_queue,
    mpc_session_key,
    node_queue,
)


def test_every_role_gets_a_user_a_url_and_the_default_user_is_off(tmp_path: Path) -> None:
    users = ensure_broker_users(tmp_path, "10.0.0.5", 6380)
    lines = users.acl_file.read_text().splitlines()
    names = [line.split()[1] for line in lines]
    assert names == ["default", *ROLES]
    assert set(ROLES) == {"gateway", "node", "mpc", "scientist", "flower", "admin"}
    default = lines[0].split()
    assert "off" in default and "-@all" in default and "on" not in default
    assert not any(t.startswith((">", "#", "~", "&", "+")) or t == "nopass" for t in default[2:] if t != "-@all")
    for role in ROLES:
        url = users.urls[role]
        parts = urlsplit(url)
        assert (parts.username, parts.hostname, parts.port, parts.path) == (role, "10.0.0.5", 6380, "/0")
        assert parts.password and len(parts.password) >= 40
        assert (users.folder / f"{role}.url").read_text().strip() == url
        line = next(x for x in lines if x.split()[1] == role)
        # the ACL file holds the password's hash, never the password
        assert f"#{hashlib.sha256(parts.password.encode()).hexdigest()}" in line.split()
        assert parts.password not in users.acl_file.read_text()
        assert " on " in line and "resetkeys" in line and "-@all" in line
    assert len({urlsplit(u).password for u in users.urls.values()}) == len(ROLES)


def test_secret_files_are_0600_in_a_0700_folder(tmp_path: Path) -> None:
    users = ensure_broker_users(tmp_path)
    assert users.folder == tmp_path / "broker"
    assert users.folder.stat().st_mode & 0o777 == 0o700
    for path in (users.acl_file, *(users.folder / f"{r}.url" for r in ROLES)):
        assert path.stat().st_mode & 0o777 == 0o600, path


def test_idempotent_passwords_survive_a_new_port(tmp_path: Path) -> None:
    first = ensure_broker_users(tmp_path, port=6379)
    acl = first.acl_file.read_text()
    again = ensure_broker_users(tmp_path, port=6379)
    assert again.urls == first.urls and again.acl_file.read_text() == acl
    moved = ensure_broker_users(tmp_path, port=7000)
    assert {r: urlsplit(u).password for r, u in moved.urls.items()} == \
           {r: urlsplit(u).password for r, u in first.urls.items()}
    assert all(urlsplit(u).port == 7000 for u in moved.urls.values())
    assert moved.acl_file.read_text() == acl  # the server's file does not depend on where it listens


def test_role_url_reads_back_what_was_written(tmp_path: Path) -> None:
    assert role_url(tmp_path, "node") is None  # a grid without ACLs
    users = ensure_broker_users(tmp_path, port=6390)
    assert {r: role_url(tmp_path, r) for r in ROLES} == users.urls
    with pytest.raises(ValueError):
        role_url(tmp_path, "../keys/alice")


def test_a_lost_url_file_gets_a_new_password_the_others_are_kept(tmp_path: Path) -> None:
    first = ensure_broker_users(tmp_path)
    (first.folder / "node.url").unlink()
    again = ensure_broker_users(tmp_path)
    assert again.urls["node"] != first.urls["node"]
    assert {r: u for r, u in again.urls.items() if r != "node"} == {r: u for r, u in first.urls.items() if r != "node"}


def test_every_rule_says_why_and_the_table_lists_them(tmp_path: Path) -> None:
    for role in ROLES:
        assert rules(role), role
        for rule in rules(role):
            assert len(rule.why) > 10, rule
    table = rules_table()
    for role in ROLES:
        assert f"## {role}:" in table
    ensure_broker_users(tmp_path)
    assert (tmp_path / "broker" / "users.rules.md").read_text() == table
    with pytest.raises(ValueError, match="unknown role"):
        rules("root")


def _selectors(role: str, db: int = 0) -> list[tuple[list[str], list[str], set[str]]]:
    """(key patterns with their %R/%W/RW prefix, channel patterns, commands) of each selector."""
    out = []
    for rule in rules(role, db):
        text = rule.rule
        if not text.startswith("("):
            continue
        tokens = text.strip("()").split()
        keys = [t for t in tokens if "~" in t]
        channels = [t[1:] for t in tokens if t.startswith("&")]
        commands = {t[1:] for t in tokens if t.startswith("+")}
        out.append((keys, channels, commands))
    return out


def allows(role: str, command: str, key: str | None = None, *, write: bool = False, read: bool = False,
           channel: str | None = None) -> bool:
    """Whether one selector of ``role`` allows ``command`` on ``key`` (with the access it needs) or
    on ``channel``; mirrors Redis' matching closely enough to check our own patterns."""
    if role == "admin":
        return True
    for keys, channels, commands in _selectors(role):
        if command not in commands:
            continue
        if channel is not None:
            if any(fnmatch.fnmatchcase(channel, p) or p == channel for p in channels):
                return True
            continue
        for pattern in keys:
            kind, glob = pattern.split("~", 1)
            can_read, can_write = kind in ("", "%RW", "%R"), kind in ("", "%RW", "%W")
            if fnmatch.fnmatchcase(key or "", glob) and (can_read or not read) and (can_write or not write):
                return True
    return False


def test_rules_fit_the_keys_the_code_builds() -> None:
    blob = f"{CLAIM_CHECK_PREFIX}{'a' * 32}"
    hospital = node_queue("hospital")
    # a scientist sends to every worker queue, never takes from one
    for queue in ("gateway", hospital, mpc_queue("company")):
        assert allows("scientist", "lpush", queue, write=True)
        assert not allows("scientist", "brpop", queue, read=True, write=True)
        assert not allows("scientist", "lpop", queue, read=True, write=True)
    assert allows("scientist", "getdel", blob, read=True, write=True)
    assert allows("scientist", "set", blob, write=True)
    assert not allows("scientist", "set", hospital, write=True)  # SET is for blobs, not queues
    assert not allows("scientist", "del", blob, write=True)
    assert allows("scientist", "get", GATEWAY_IDENTITY_KEY, read=True)
    assert not allows("scientist", "set", GATEWAY_IDENTITY_KEY, write=True)
    assert allows("scientist", "hgetall", MPC_MODELS_KEY, read=True)
    assert not allows("scientist", "hset", MPC_MODELS_KEY, write=True)
    assert allows("scientist", "get", "celery-task-meta-hospital:" + "0" * 32, read=True)
    assert not allows("scientist", "set", "celery-task-meta-hospital:" + "0" * 32, write=True)
    assert allows("scientist", "subscribe", channel="celery-task-meta-x")
    assert not allows("scientist", "publish", channel="/0.celery.pidbox")
    # only the gateway posts its key; only MPC hosts post model cards
    assert [r for r in ROLES if allows(r, "set", GATEWAY_IDENTITY_KEY, write=True)] == ["gateway", "admin"]
    assert [r for r in ROLES if allows(r, "hset", MPC_MODELS_KEY, write=True)] == ["mpc", "admin"]
    # consumers: each role its own queues
    assert [r for r in ROLES if allows(r, "brpop", hospital, read=True, write=True)] == ["node", "admin"]
    assert [r for r in ROLES if allows(r, "brpop", "mpc.company", read=True, write=True)] == ["mpc", "admin"]
    assert [r for r in ROLES if allows(r, "brpop", "gateway", read=True, write=True)] == ["gateway", "admin"]
    # MPC rounds, pools and bundles are the MPC workers' alone
    for key in (mpc_session_key("s" * 32, "hospital", "up"),
                mpc_pool_key("university", ["a", "b"], 16, "matmul:(1,4):(4,2)"), mpc_bundle_key("f" * 32, "hospital")):
        assert [r for r in ROLES if any(allows(r, c, key, read=True, write=True)
                                        for c in ("blpop", "getdel", "lpop"))] == ["mpc", "admin"]
    aggregated = mpc_aggregated_key("hospital", "f" * 32)
    assert [r for r in ROLES if allows(r, "set", aggregated, write=True)] == ["mpc", "admin"]
    # only the operator and the admin may command workers
    assert [r for r in ROLES if allows(r, "publish", channel="/0.celery.pidbox")] == ["flower", "admin"]


def test_the_db_number_goes_into_the_pubsub_channels() -> None:
    line = acl_line("node", "pw", db=3)
    assert "&/3.celery.pidbox" in line and "&/3.celeryev/*" in line and "/0." not in line
    assert re.search(r"#[0-9a-f]{64} ", line)
