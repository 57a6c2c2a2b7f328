"""Broker permissions per identity (ops/acl.py) on a real grid: Redis with one ACL user per
enrolled node and per role, the ``default`` user off, the demo nodes, the MPC pool and
Flower each connecting as their own user. A scientist's connection is refused what would let
it wreck or spy on the grid (NOPERM), a node is refused another node's queues, in-flight
jobs, MPC rounds, pools and bundles, nobody but the admin runs scripts, and the three use
cases still pass — with no ACL denial at all logged by Redis while they run."""

from __future__ import annotations

import fnmatch
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest
import redis
import torch
from redis.backoff import NoBackoff
from redis.retry import Retry
from typer.testing import CliRunner

from ops.cli import app as cli
from ops.demo import prepare
from ops.enrol import enrolled_nodes, gateway_database, sync_broker_users
from ops.local import LocalGrid, free_port
from protocol.contract import (
    CLAIM_CHECK_PREFIX,
    GATEWAY_IDENTITY_KEY,
    MPC_MODELS_KEY,
    dead_letter_key,
    in_flight_keys,
    mpc_bundle_key,
    mpc_pool_prefix,
    mpc_queue,
    mpc_round_channel,
    node_queue,
)
from protocol.errors import BrokerUnavailable, PermissionDenied
from workers.gateway.registry import Registry
from workers.storage.datasets import load_table

MPC_NODES = ("company", "university", "hospital", "public")


@pytest.fixture(scope="module")
def acl_grid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalGrid]:
    home = tmp_path_factory.mktemp("acl-grid")
    configs = prepare(home)
    with LocalGrid(home, acl=True) as lg:
        lg.start(configs)
        yield lg


@pytest.fixture(scope="module")
def admin(acl_grid: LocalGrid) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(acl_grid.url_for("admin"))
    yield client
    client.close()


@pytest.fixture()
def no_denials(admin: redis.Redis) -> Iterator[None]:
    """Fails the test if Redis logged any ACL denial while it ran: a refusal inside a worker
    (a heartbeat, a restore, a lock) would not always surface as a failed call."""
    admin.acl_log_reset()
    yield
    denied = [(e["username"], e["reason"], e["object"]) for e in admin.acl_log(128)]
    assert denied == [], f"ACL denials during a legitimate run: {denied}"


def client(lg: LocalGrid, role: str) -> redis.Redis:
    return redis.Redis.from_url(lg.url_for(role))


def unenrol(database_url: str, node: str) -> None:
    registry = Registry(database_url)
    try:
        registry.unenrol(node)
    finally:
        registry.engine.dispose()


def refused(call: Any, *args: Any, **kwargs: Any) -> None:
    with pytest.raises(redis.exceptions.NoPermissionError):  # Redis answered NOPERM
        call(*args, **kwargs)


# --- the broker is closed to anyone without a role --------------------------------------------------


def test_users_and_files(acl_grid: LocalGrid, admin: redis.Redis) -> None:
    users = {u.decode() if isinstance(u, bytes) else u for u in admin.acl_users()}
    nodes = {f"node-{n}" for n in enrolled_nodes(gateway_database(acl_grid.home))}
    assert {"node-hospital", "node-clinic"} <= nodes  # one user per enrolled node, none shared by all of them
    assert users == {"default", "gateway", "scientist", "edge", "flower", "admin", *nodes}
    assert "off" in admin.acl_getuser("default")["flags"]
    folder = acl_grid.home / "broker"
    for path in (folder / "users.acl", *(folder / f"{r}.url" for r in ("gateway", "node-hospital", "scientist"))):
        assert path.stat().st_mode & 0o777 == 0o600
    assert acl_grid.url_for("scientist").startswith("redis://scientist:")
    assert acl_grid.url_for("node-hospital").startswith("redis://node-hospital:")
    # passwords go to processes by their environment, never their command line (`ps` shows it to everyone)
    secrets = [urlsplit(acl_grid.url_for(r)).password for r in ("gateway", "scientist", "flower", *nodes)]
    for name, proc in acl_grid.procs.items():
        argv = Path(f"/proc/{proc.pid}/cmdline").read_text()
        assert not any(s and s in argv for s in secrets), name


def test_the_default_user_can_do_nothing(acl_grid: LocalGrid) -> None:
    port = int(acl_grid.url.rsplit(":", 1)[1].split("/")[0])
    once = Retry(NoBackoff(), 0)  # redis-py retries a refused login (a ConnectionError) with backoff by default
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis(port=port, retry=once).ping()
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis(port=port, username="scientist", password="guess", retry=once).ping()
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis(port=port, username="default", password="", retry=once).ping()


# --- what a scientist may not do ----------------------------------------------------------------------


def test_a_scientist_cannot_wreck_or_spy_on_the_grid(acl_grid: LocalGrid, admin: redis.Redis) -> None:
    # real keys of the grid to aim at: another's result, a claim-check blob, a queue's binding
    with acl_grid.connect("carol") as grid:
        ticket = grid.search("#birth-records", "#february")["hospital"][0].sum(dim=0).submit()
        assert ticket.wait().status == "done"
        result_key = grid.app.backend.get_key_for_task(ticket.id).decode()
    blob = f"{CLAIM_CHECK_PREFIX}{'b' * 32}"
    admin.set(blob, b"sealed to someone else", ex=600)
    queue = "node.offline"  # a node whose worker is down: its jobs wait in its queue
    admin.lpush(queue, b"a job waiting for its node")
    before = {k: admin.dump(k) for k in (result_key, blob, GATEWAY_IDENTITY_KEY, "_kombu.binding.node.hospital",
                                         queue)}
    mallory = client(acl_grid, "scientist")
    try:
        refused(mallory.flushall)
        refused(mallory.flushdb)
        refused(mallory.keys, "*")
        refused(mallory.scan)
        refused(mallory.config_get, "*")
        refused(mallory.config_set, "appendonly", "yes")
        refused(mallory.acl_list)
        refused(mallory.client_list)
        refused(mallory.execute_command, "SHUTDOWN", "NOSAVE")
        refused(mallory.eval, "return 1", 0)
        # others' results and blobs: not deleted, not overwritten, not expired
        for key in (result_key, blob):
            refused(mallory.delete, key)
            refused(mallory.unlink, key)
            refused(mallory.expire, key, 1)
            refused(mallory.rename, key, "mine")
        refused(mallory.set, result_key, "forged")
        refused(mallory.append, blob, "x")
        # the gateway's key, the model cards, the routing tables
        refused(mallory.set, GATEWAY_IDENTITY_KEY, json.dumps({"name": "gateway", "public_key": "gridq1:evil"}))
        refused(mallory.delete, GATEWAY_IDENTITY_KEY)
        refused(mallory.hset, MPC_MODELS_KEY, "triage", "{}")
        refused(mallory.delete, MPC_MODELS_KEY)
        refused(mallory.srem, "_kombu.binding.node.hospital", "node.hospital\x06\x16\x06\x16node.hospital")
        refused(mallory.delete, "_kombu.binding.node.hospital")
        # a node's queue: push only, never pop, read, empty or overwrite
        refused(mallory.brpop, [queue], 1)
        refused(mallory.rpop, queue)
        refused(mallory.lpop, queue)
        refused(mallory.lrange, queue, 0, -1)
        refused(mallory.lmove, queue, "mine", "RIGHT", "LEFT")
        refused(mallory.delete, queue)
        refused(mallory.set, queue, "gone")
        refused(mallory.brpop, ["mpc.company", "gateway"], 1)
        # in-flight jobs and worker control
        refused(mallory.hgetall, "unacked")
        refused(mallory.hget, "unacked", "a-tag")
        refused(mallory.delete, "unacked")
        refused(mallory.publish, "/0.celery.pidbox", b"{}")  # shutdown, add_consumer, revoke…
        refused(mallory.publish, "/0.celeryev/worker.offline", b"{}")  # only its task-sent events
        # keys outside the grid's namespaces
        refused(mallory.set, "anything", "x")
        refused(mallory.get, "anything")
    finally:
        mallory.close()
    assert {k: admin.dump(k) for k in before} == before


def test_other_roles_keep_to_their_own_keys(acl_grid: LocalGrid) -> None:
    for role in ("gateway", "node-hospital", "flower"):
        other = client(acl_grid, role)
        try:
            refused(other.flushall)
            refused(other.keys, "*")
            if role != "node-hospital":  # only a node (an MPC host) publishes model cards
                refused(other.hset, MPC_MODELS_KEY, "triage", "{}")
            if role != "gateway":  # only the gateway posts its key
                refused(other.set, GATEWAY_IDENTITY_KEY, "x")
            refused(other.hgetall, "unacked")
            refused(other.set, "anything", "x")
        finally:
            other.close()
    node, gateway, flower = (client(acl_grid, r) for r in ("node-hospital", "gateway", "flower"))
    try:
        refused(node.brpop, ["mpc.company"], 1)  # a node's workers serve its own queues only …
        refused(node.brpop, ["gateway"], 1)
        refused(node.publish, "/0.celery.pidbox", b"{}")  # … and cannot command other workers
        refused(gateway.brpop, ["node.hospital"], 1)
        refused(gateway.getdel, f"{CLAIM_CHECK_PREFIX}{'c' * 32}")  # the gateway never handles sealed values
        refused(flower.brpop, ["node.hospital"], 1)  # the operator watches, does not take jobs
        refused(flower.getdel, f"{CLAIM_CHECK_PREFIX}{'c' * 32}")
        refused(flower.set, "celery-task-meta-x", "forged", ex=10)
    finally:
        for c in (node, gateway, flower):
            c.close()


# --- each node its own: queues, in-flight jobs, scripts, enrolment ---------------------------------------


def test_a_node_takes_only_its_own_jobs_and_in_flight_keys(acl_grid: LocalGrid, admin: redis.Redis) -> None:
    admin.acl_log_reset()
    with acl_grid.connect("alice") as grid:  # a job of the clinic's, kept in flight (acks_late) while it runs
        assert grid.search("#birth-records", "#february")["clinic"][0].sum(dim=0).submit().wait().status == "done"
    # no denial: the clinic's worker kept it under the only in-flight keys its user has, its own queue's
    # (kombu's shared `unacked` hash, which every queue's worker could read, is nobody's now)
    assert admin.acl_log() == []
    queue, in_flight = node_queue("clinic"), in_flight_keys(node_queue("clinic"))
    hospital = client(acl_grid, "node-hospital")
    try:  # the hospital's broker user: not one of the clinic's jobs, waiting or in flight
        refused(hospital.brpop, [queue], 1)
        refused(hospital.lpop, queue)
        refused(hospital.rpop, queue)
        refused(hospital.lrange, queue, 0, -1)
        refused(hospital.hgetall, in_flight["unacked_key"])
        refused(hospital.hget, in_flight["unacked_key"], "a-tag")
        refused(hospital.zrange, in_flight["unacked_index_key"], 0, -1)
        refused(hospital.set, in_flight["unacked_mutex_key"], "mine", nx=True, ex=60)  # nor hold its restores back
        refused(hospital.lpush, queue, b"{}")  # nor push into it (a job comes from a scientist, signed)
        refused(hospital.brpop, [mpc_queue("clinic")], 1)
        refused(hospital.hgetall, "unacked")  # kombu's shared hash: nobody's now
        refused(hospital.lrange, dead_letter_key(queue), 0, -1)
    finally:
        hospital.close()


def test_no_user_but_the_admin_runs_scripts_or_functions(acl_grid: LocalGrid, admin: redis.Redis) -> None:
    endless = "while true do end"
    sha = admin.script_load("return 1")
    for user in ("scientist", "edge", "gateway", "flower", "node-hospital", "node-clinic"):
        other = client(acl_grid, user)
        try:
            refused(other.script_load, endless)
            refused(other.eval, endless, 0)
            refused(other.evalsha, sha, 0)
            refused(other.execute_command, "EVAL_RO", "return 1", 0)
            refused(other.execute_command, "FUNCTION", "LOAD", "#!lua name=x\nredis.register_function('f', "
                                                                "function() while true do end end)")
            refused(other.execute_command, "FCALL", "f", 0)
            refused(other.execute_command, "SCRIPT", "KILL")
        finally:
            other.close()
    assert admin.ping()  # Redis is not busy: nothing ran


def test_the_broker_is_bounded_and_never_evicts(acl_grid: LocalGrid, admin: redis.Redis) -> None:
    bound = admin.config_get("maxmemory")["maxmemory"]
    assert int(bound) > 0
    assert admin.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
    mallory = client(acl_grid, "scientist")
    blob = f"{CLAIM_CHECK_PREFIX}{'d' * 32}"
    try:
        refused(mallory.set, blob, b"parked for ever")  # a blob is left with a TTL or not at all
        refused(mallory.persist, blob)
        assert mallory.setex(blob, 60, b"sealed") and 0 < admin.ttl(blob) <= 60
        with acl_grid.connect("carol") as grid:
            admin.config_set("maxmemory", 1)  # full: nothing is evicted, a write is refused
            try:
                with pytest.raises(BrokerUnavailable, match="maxmemory"):
                    grid.transport.leave(b"x" * 1000)
            finally:
                admin.config_set("maxmemory", bound)
        assert admin.get(blob) == b"sealed"
    finally:
        mallory.close()
        admin.delete(blob)


def test_scientists_push_only_to_enrolled_nodes_and_users_follow_enrolment(acl_grid: LocalGrid,
                                                                           admin: redis.Redis) -> None:
    mallory = client(acl_grid, "scientist")  # one connection throughout: the broker changes its rights live
    try:
        for queue in (node_queue("ward"), mpc_queue("ward"), "node.hospital2"):
            refused(mallory.lpush, queue, b"480 MB nobody will read")
        acl_grid.enrol("ward")
        assert mallory.lpush(node_queue("ward"), b"a job for ward") == 1
        ward = client(acl_grid, "node-ward")
        assert ward.brpop([node_queue("ward")], 1) is not None  # its own user takes its own queue
        refused(ward.brpop, [node_queue("hospital")], 1)
        unenrol(gateway_database(acl_grid.home), "ward")
        assert sync_broker_users(acl_grid.home) is not None
        refused(mallory.lpush, node_queue("ward"), b"x")
        with pytest.raises(redis.exceptions.ConnectionError):  # its user is gone, its connection closed
            ward.ping()
        assert "node-ward" not in {u.decode() if isinstance(u, bytes) else u for u in admin.acl_users()}
        assert not (acl_grid.home / "broker" / "node-ward.url").exists()
    finally:
        mallory.close()
        admin.delete(node_queue("ward"))


# --- the use cases, through the ACL'd grid ------------------------------------------------------------


def test_use_case_1_private_statistics(acl_grid: LocalGrid, no_denials: None) -> None:
    table, _ = load_table(acl_grid.home / "data" / "hospital_births_feb.csv")
    with acl_grid.connect("carol") as grid:
        found = grid.search("#birth-records", "#february")
        assert set(found) == {"hospital", "clinic"}
        births = found["hospital"][0]
        assert births.shape == (240, 2)
        with pytest.raises(PermissionDenied):
            births.get()
        means = births.mean(dim=0).submit()
        assert means.wait().status == "done"
        with pytest.raises(PermissionDenied):
            means.result().get()
    with acl_grid.connect("alice") as grid:
        births = grid.search("#birth-records", "#february")["hospital"][0]
        assert torch.allclose(births["weight"].mean().get(), table[:, 0].mean())
        assert torch.allclose(births.mean(dim=0).get(), table.mean(dim=0))


def test_the_owner_publishes_with_the_node_user(acl_grid: LocalGrid, no_denials: None) -> None:
    owner = acl_grid.owner(acl_grid.home / "nodes" / "hospital.toml")
    try:
        owner.publish("acl-probe", torch.arange(6.0).reshape(3, 2), columns=["a", "b"], tags=["#acl-probe"],
                      allowed_users=["alice"])
    finally:
        owner.close()
    with acl_grid.connect("alice") as grid:
        deadline = time.monotonic() + 30
        while "hospital" not in grid.search("#acl-probe") and time.monotonic() < deadline:
            time.sleep(0.2)
        probe = grid.search("#acl-probe")["hospital"][0]
        assert probe.sum().get().item() == 15.0


def test_use_case_2_federated_learning_over_two_nodes(acl_grid: LocalGrid, no_denials: None) -> None:
    test = np.load(acl_grid.home / "data" / "digits_test.npy")
    x_test, y_test = torch.tensor(test[:, :64]), test[:, 64]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    with acl_grid.connect("alice") as grid:
        found = grid.search("#digits")
        data = [(found[n][0][:, :64], found[n][0][:, 64]) for n in ("hospital", "clinic")]
        result = grid.fit(model, data, rounds=3, lr=0.05, batch_size=32, progress=False)
    assert [r.nodes for r in result.rounds()] == [2, 2, 2]
    with torch.no_grad():
        accuracy = float((result.model(x_test).argmax(1).numpy() == y_test).mean())
    assert accuracy > 0.5


@pytest.fixture(scope="module")
def mpc_pool(acl_grid: LocalGrid) -> Iterator[LocalGrid]:
    for node in MPC_NODES:
        acl_grid.start_mpc(acl_grid.home / "nodes" / f"{node}.toml")
    acl_grid.wait_ready(list(MPC_NODES), timeout=90, workers=[f"{n}-mpc" for n in MPC_NODES])
    yield acl_grid
    for node in MPC_NODES:
        acl_grid.kill(f"{node}-mpc")


def test_use_case_3_encrypted_serving(mpc_pool: LocalGrid, no_denials: None) -> None:
    model = torch.nn.Linear(4, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.5, -1.25, 2.0, 0.1], [-0.3, 0.7, 0.05, -2.5]]))
        model.bias.copy_(torch.tensor([0.25, -0.5]))
    x = torch.tensor([[1.0, 2.0, -0.5, 3.0], [-1.5, 0.25, 4.0, -2.0]])
    with mpc_pool.connect("dana") as owner:
        owner.serve(model, name="acl-triage", parties=["hospital", "public"], crypto_provider="university",
                    host="company", queriers=["bob"])
    with mpc_pool.connect("bob") as grid:
        assert "acl-triage" in {c.name for c in grid.models()}
        y = grid.query("acl-triage", x)
        y_again = grid.query("acl-triage", x[0])  # from the pool the provider refilled
    with torch.no_grad():
        assert (y - model(x)).abs().max().item() < 1e-3
        assert (y_again - model(x[0])).abs().max().item() < 1e-3


def test_secure_aggregation_through_the_nodes_users(mpc_pool: LocalGrid, no_denials: None) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10))
    with mpc_pool.connect("alice") as grid:
        found = grid.search("#digits")
        data = [(found[n][0][:, :64], found[n][0][:, 64]) for n in ("hospital", "clinic")]
        result = grid.fit(model, data, rounds=1, lr=0.05, progress=False, secure_aggregation=True,
                          aggregators=["company", "public"])
    assert [r.nodes for r in result.rounds()] == [2]


def test_an_mpc_member_cannot_take_another_members_rounds_pools_or_bundles(mpc_pool: LocalGrid,
                                                                          admin: redis.Redis) -> None:
    admin.acl_log_reset()
    with mpc_pool.connect("dana") as owner:
        owner.serve(torch.nn.Linear(4, 2), name="acl-members", parties=["hospital", "public"],
                    crypto_provider="university", host="company", queriers=["bob"])
    with mpc_pool.connect("bob") as grid:
        grid.query("acl-members", torch.ones(4))  # the host then has its pools refilled by the provider
    # the keys the MPC workers really use: company's pools of bundles university dealt, and their parts
    deadline = time.monotonic() + 60
    pools: list[str] = []
    while not pools and time.monotonic() < deadline:
        pools = [k.decode() for k in admin.scan_iter(match=mpc_pool_prefix("company", "university") + "*")
                 if admin.llen(k)]
        time.sleep(0.2)
    assert pools, "the host's pools were not refilled"
    pool = pools[0]
    bundle = admin.lindex(pool, 0).decode()
    parts = {p: mpc_bundle_key("university", bundle, p) for p in ("hospital", "public")}
    assert all(admin.exists(k) for k in parts.values())
    assert admin.acl_log() == []  # serving, querying and dealing ran without a denial
    session = "5" * 32  # a session of company's: hospital's round messages to public go on this channel
    to_public = mpc_round_channel("company", session, "hospital", "public")
    before = {k: admin.dump(k) for k in (pool, *parts.values())}
    users = {n: client(mpc_pool, f"node-{n}") for n in ("company", "university", "hospital", "public", "clinic")}
    try:
        for name in ("public", "university", "clinic"):  # another party, the dealer, a node outside
            refused(users[name].getdel, parts["hospital"])  # hospital's part of a bundle
            refused(users[name].get, parts["hospital"])
            refused(users[name].publish, to_public, b"injected")  # only hospital sends as hospital
        for name in ("hospital", "university", "clinic"):  # the sender, the dealer, a node outside
            refused(subscribed, users[name], to_public)  # only public hears what is sent to public
        refused(users["company"].getdel, parts["hospital"])  # the host never holds a party's material
        for name in ("hospital", "public", "university", "clinic"):  # only the host takes from its pools
            refused(users[name].lpop, pool)
            refused(users[name].lrange, pool, 0, -1)
        assert users["hospital"].publish(to_public, b"a round's masked part") == 0  # nobody listening yet
        subscribed(users["public"], to_public)
        # … while each may do its own part (a spare key: the real bundle stays for the next query)
        spare = mpc_bundle_key("university", "e" * 32, "hospital")
        admin.setex(spare, 60, b"sealed to hospital")
        assert users["hospital"].getdel(spare) == b"sealed to hospital"
        assert users["university"].setex(mpc_bundle_key("university", "e" * 32, "public"), 60, b"dealt")
    finally:
        for c in users.values():
            c.close()
        admin.delete(mpc_bundle_key("university", "e" * 32, "public"))
    assert {k: admin.dump(k) for k in before} == before


def subscribed(client: redis.Redis, channel: str) -> None:
    """Subscribe, and read the broker's answer (a refusal is raised as NOPERM)."""
    listener = client.pubsub()
    try:
        listener.subscribe(channel)
        assert listener.get_message(timeout=5)["type"] == "subscribe"
    finally:
        listener.close()


PERSISTENT = ("gateway", "node.*", "mpc.*", "_kombu.binding*", "gridq:unacked*", GATEWAY_IDENTITY_KEY, MPC_MODELS_KEY,
              "*.celery.pidbox", "celeryev.*")  # queues and routing, the gateway's key, the model listing


def test_every_blob_expires(mpc_pool: LocalGrid, admin: redis.Redis) -> None:
    """After the use cases ran: every key but queues, routing and the two listings has a TTL —
    claim-check blobs, results, MPC pools, bundles and round markers, dead letters."""
    keys = [k.decode() for k in admin.scan_iter(count=1000)]
    assert any(k.startswith(CLAIM_CHECK_PREFIX) or k.startswith("gridq:mpc:") for k in keys)
    forever = [k for k in keys if admin.ttl(k) == -1 and not any(fnmatch.fnmatchcase(k, p) for p in PERSISTENT)]
    assert forever == []


# --- the operator's view with the flower user ---------------------------------------------------------


def test_status_and_flower_with_the_flower_user(acl_grid: LocalGrid, no_denials: None,  # type: ignore[no-untyped-def]
                                                poll_json) -> None:
    url = acl_grid.url_for("flower")
    result = CliRunner().invoke(cli, ["status", "--broker", url], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "node.hospital" in result.output and "up" in result.output
    port = free_port()
    env = {**os.environ, "FLOWER_UNAUTHENTICATED_API": "true"}
    flower = subprocess.Popen([sys.executable, "-m", "ops.cli", "flower", "--broker", url, "--port", str(port)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        workers = poll_json(f"http://127.0.0.1:{port}/api/workers?refresh=1",
                            lambda w: all(any(k.startswith(f"{n}@") for k in w)  # each refresh: who answered in time
                                          for n in ("hospital", "gateway")))
        assert any(k.startswith("gateway@") for k in workers)
        with acl_grid.connect("alice") as grid:
            ticket = grid.search("#birth-records", "#february")["hospital"][0].mean(dim=0).submit()
            ticket.wait()
        tasks = poll_json(f"http://127.0.0.1:{port}/api/tasks",
                          lambda t: t.get(ticket.id, {}).get("state") == "SUCCESS")
        assert tasks[ticket.id]["name"] == "gridq.node.run_job"
    finally:
        flower.terminate()
        flower.wait(timeout=15)


# --- the HTTP edge with the edge user ------------------------------------------------------------------


def test_the_edge_relays_jobs_and_an_encrypted_query_as_its_own_user(mpc_pool: LocalGrid, admin: redis.Redis,
                                                                      no_denials: None) -> None:
    """The HTTP edge (ops/edge) logs in as `edge`: a job, a search, the model list, blobs and an
    MPC query — its input shares left and its output shares taken through the edge — all pass
    with no ACL denial; what its user may not do is refused."""
    import secrets
    import uuid

    from ops.edge.client import EdgeClient, signed_job
    from ops.keys import read_identity
    from orchestrator.mpc import find
    from orchestrator.ticket import JobTicket
    from protocol.cancel import CANCEL_TTL_SECONDS, cancellation
    from protocol.contract import Tasks, cancel_key
    from protocol.messages import RawRelease, RunJob
    from protocol.mpc.cards import Query, SignedQuery, input_label, output_label
    from protocol.mpc.ring import FixedPoint
    from protocol.mpc.sharing import reconstruct, share
    from protocol.mpc.wire import MpcReply, QueryModel, open_signed, pack, seal_signed, unpack
    from protocol.serving import parse

    url = mpc_pool.start_edge(name="edge-acl")
    model = torch.nn.Linear(4, 2)
    x = torch.tensor([[1.0, 2.0, -0.5, 3.0]])
    try:
        with mpc_pool.connect("dana") as owner:
            owner.serve(model, name="edge-triage", parties=["hospital", "public"], crypto_provider="university",
                        host="company", queriers=["bob"])
        alice, bob = (read_identity(mpc_pool.keys / f"{u}.key") for u in ("alice", "bob"))
        with mpc_pool.connect("bob") as grid, EdgeClient(url) as edge:
            assert edge.gateway()["public_key"] == mpc_pool.gateway_key()
            assert "hospital" in {meta["node"] for meta in json.loads(edge.search(["#birth-records"])[1]["body"])
                                  ["datasets"]}
            births = grid.search("#birth-records", "#february")["hospital"][0]
            job_id = edge.submit(signed_job(alice, "hospital", RunJob(plan=births["weight"].mean().plan,
                                                                      release=RawRelease())))
            state, reply = edge.reply(job_id, wait=30)
            # cancelling it now (POST /v1/jobs/{id}/cancel: SET NX, then GET) finds the node's mark: too late
            late = {"cancellation": cancellation(alice, job_id).decode()}
            assert edge.call("POST", f"/v1/jobs/{job_id}/cancel", late) == (200, {"job_id": job_id, "cancelled": False,
                                                                                  "mark": "started"})
            assert edge.call("GET", f"/v1/jobs/{job_id}")[1]["cancel_mark"] == "started"
            with mpc_pool.connect("alice") as mine:
                assert JobTicket.finished(mine, job_id, state, reply).value().item() == pytest.approx(
                    load_table(mpc_pool.home / "data" / "hospital_births_feb.csv")[0][:, 0].mean().item())
            # bob queries dana's model through the edge, as a browser would
            assert "dana/edge-triage" in edge.models()
            card = find(grid, "dana/edge-triage")
            fp = FixedPoint(card.plan.frac_bits)
            query = Query(querier="bob", owner=card.owner, model=card.name, card=card.digest(), batch=1,
                          id=secrets.token_hex(16), issued_at=time.time())
            inputs = {}
            for party, piece in zip(card.parties, share(fp.encode(x), len(card.parties)), strict=True):
                sealed = seal_signed(bob, grid.transport.node_key(party), input_label(query.id, party),
                                     pack({"x": piece}))
                inputs[party] = json.loads(edge.raw("POST", "/v1/blobs", sealed)[2])["key"]
            request = signed_job(bob, card.host, QueryModel(query=SignedQuery.sign(bob, query), inputs=inputs),
                                 task=Tasks.MPC_QUERY, job_id=uuid.uuid4().hex)
            assert edge.call("POST", "/v1/jobs", request)[1]["queue"] == "mpc.company"
            state, reply = edge.reply(request["envelope"]["job_id"], wait=30)
            answer = parse(MpcReply, grid.transport.verify(reply, card.host, request["envelope"]["job_id"]).body_json())
            outputs = [unpack(open_signed(bob, grid.transport.node_key(p), output_label(query.id, p),
                                          edge.raw("GET", f"/v1/blobs/{answer.outputs[p]}")[2]))[0]["y"]
                       for p in card.parties]
        with torch.no_grad():
            assert (fp.decode(reconstruct(outputs)) - model(x)).abs().max().item() < 1e-3
        assert admin.acl_log(128) == []  # the relaying needed nothing its user may not do; now, what it may not:
        edge_user = client(mpc_pool, "edge")
        try:
            mark = cancel_key(f"hospital:{uuid.uuid4().hex}")  # a job the node has not taken up: the edge's SET wins
            assert edge_user.set(mark, cancellation(alice, mark.removeprefix("gridq:cancel:")), nx=True,
                                 ex=CANCEL_TTL_SECONDS)
            assert edge_user.get(mark).startswith(b"cancel alice ")
            refused(edge_user.delete, mark)  # a mark is never taken back, by the edge or through it
            refused(edge_user.brpop, ["node.hospital"], timeout=1)  # it sends jobs, never takes one
            refused(edge_user.eval, "return 1", 0)
            if not (mpc_pool.home / "broker" / "users.flat").exists():  # Redis 7: rules per key (selectors)
                refused(edge_user.getdel, mark)  # GETDEL is for blobs only
                refused(edge_user.set, "celery-task-meta-x", "forged")  # it writes no result
                refused(edge_user.get, "gridq:edge:nonce:alice:x")  # its nonces are write-only
            refused(edge_user.publish, "/0.celery.pidbox", "shutdown")
        finally:
            edge_user.close()
            admin.acl_log_reset()  # those refusals were asked for
    finally:
        mpc_pool.kill("edge-acl")
