"""Broker permissions per role (ops/acl.py) on a real grid: Redis with one ACL user per role
and the ``default`` user off, the demo nodes, the MPC pool and Flower each connecting as
their role. A scientist's connection is refused what would let it wreck or spy on the grid
(NOPERM), other roles are refused what is not theirs, and the three use cases still pass —
with no ACL denial at all logged by Redis while they run."""

from __future__ import annotations

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
from typer.testing import CliRunner

from ops.cli import app as cli
from ops.demo import prepare
from ops.local import LocalGrid, free_port
from protocol.contract import CLAIM_CHECK_PREFIX, GATEWAY_IDENTITY_KEY, MPC_MODELS_KEY
from protocol.errors import PermissionDenied
from workers.datasets import load_table

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


def refused(call: Any, *args: Any, **kwargs: Any) -> None:
    with pytest.raises(redis.exceptions.NoPermissionError):  # Redis answered NOPERM
        call(*args, **kwargs)


# --- the broker is closed to anyone without a role --------------------------------------------------


def test_users_and_files(acl_grid: LocalGrid, admin: redis.Redis) -> None:
    users = {u.decode() if isinstance(u, bytes) else u for u in admin.acl_users()}
    assert users == {"default", "gateway", "node", "mpc", "scientist", "flower", "admin"}
    assert "off" in admin.acl_getuser("default")["flags"]
    folder = acl_grid.home / "broker"
    for path in (folder / "users.acl", *(folder / f"{r}.url" for r in ("gateway", "node", "scientist"))):
        assert path.stat().st_mode & 0o777 == 0o600
    assert acl_grid.url_for("scientist").startswith("redis://scientist:")
    # passwords go to processes by their environment, never their command line (`ps` shows it to everyone)
    secrets = [urlsplit(acl_grid.url_for(r)).password for r in ("gateway", "node", "mpc", "scientist", "flower")]
    for name, proc in acl_grid.procs.items():
        argv = Path(f"/proc/{proc.pid}/cmdline").read_text()
        assert not any(s and s in argv for s in secrets), name


def test_the_default_user_can_do_nothing(acl_grid: LocalGrid) -> None:
    port = int(acl_grid.url.rsplit(":", 1)[1].split("/")[0])
    anonymous = redis.Redis(port=port)
    with pytest.raises(redis.exceptions.AuthenticationError):
        anonymous.ping()
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis(port=port, username="scientist", password="guess").ping()
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis(port=port, username="default", password="").ping()


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
    for role in ("gateway", "node", "mpc", "flower"):
        other = client(acl_grid, role)
        try:
            refused(other.flushall)
            refused(other.keys, "*")
            if role != "mpc":  # only an MPC host publishes model cards
                refused(other.hset, MPC_MODELS_KEY, "triage", "{}")
            if role != "gateway":  # only the gateway posts its key
                refused(other.set, GATEWAY_IDENTITY_KEY, "x")
            refused(other.hgetall, "unacked")
            refused(other.set, "anything", "x")
        finally:
            other.close()
    node, mpc, gateway, flower = (client(acl_grid, r) for r in ("node", "mpc", "gateway", "flower"))
    try:
        refused(node.brpop, ["mpc.company"], 1)  # a node's worker serves node queues only …
        refused(node.brpop, ["gateway"], 1)
        refused(node.publish, "/0.celery.pidbox", b"{}")  # … and cannot command other workers
        refused(mpc.brpop, ["node.hospital"], 1)
        refused(mpc.brpop, ["gateway"], 1)
        refused(gateway.brpop, ["node.hospital"], 1)
        refused(gateway.getdel, f"{CLAIM_CHECK_PREFIX}{'c' * 32}")  # the gateway never handles sealed values
        refused(flower.brpop, ["node.hospital"], 1)  # the operator watches, does not take jobs
        refused(flower.getdel, f"{CLAIM_CHECK_PREFIX}{'c' * 32}")
        refused(flower.set, "celery-task-meta-x", "forged", ex=10)
    finally:
        for c in (node, mpc, gateway, flower):
            c.close()


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


def test_secure_aggregation_through_the_mpc_user(mpc_pool: LocalGrid, no_denials: None) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10))
    with mpc_pool.connect("alice") as grid:
        found = grid.search("#digits")
        data = [(found[n][0][:, :64], found[n][0][:, 64]) for n in ("hospital", "clinic")]
        result = grid.fit(model, data, rounds=1, lr=0.05, progress=False, secure_aggregation=True,
                          aggregators=["company", "public"])
    assert [r.nodes for r in result.rounds()] == [2]


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
                            lambda w: any(k.startswith("hospital@") for k in w))
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
