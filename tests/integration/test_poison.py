"""Junk, poison and over-large plans (issue 15, parts 1 and 5), pushed with the scientist's own broker
user onto a grid whose broker runs one ACL user per role: every item is screened before
kombu or Celery read it (protocol.inbox); junk goes to the queue's bounded dead-letter
list, no worker stops, and the next real job is answered. A job whose worker is killed
(SIGKILL, as the OOM killer does) at each delivery is given up after ``max_deliveries``
and its requester gets a signed JobFailed instead of waiting forever. A plan whose values
would not fit the node's memory budget is refused before it runs."""

from __future__ import annotations

import base64
import json
import os
import random
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import redis

from ops.demo import prepare
from ops.gateway import GATEWAY_TASKS, REPOST_SECONDS
from ops.local import LocalGrid
from protocol.contract import (
    DEAD_LETTER_MAX,
    GATEWAY_IDENTITY_KEY,
    GATEWAY_QUEUE,
    Tasks,
    dead_letter_key,
    in_flight_keys,
    node_queue,
)
from protocol.errors import JobFailed, LimitExceeded
from protocol.inbox import Junk, screen
from protocol.messages import KeepRelease, RawRelease, RunJob
from protocol.plan import InputRef, Plan, Ref, Step
from workers.storage.store import Store

FUZZ = 2500  # items per queue: 5,000 in all, in seconds (the bound is 2 minutes)
SERVED = {node_queue("hospital"): (Tasks.RUN_JOB,), GATEWAY_QUEUE: GATEWAY_TASKS}

LAB = """
[node]
id = "lab"
broker = "${GRIDQ_BROKER}"
store = "${GRIDQ_HOME}/lab"
identity = "${GRIDQ_HOME}/keys/lab.key"

[users.alice]
public_key_file = "${GRIDQ_HOME}/keys/alice.pub"

[worker]
time_limit = 60
max_deliveries = 2
concurrency = 1

[[datasets]]
name = "square"
path = "${GRIDQ_HOME}/data/square.npy"
tags = ["#lab"]
allowed_users = ["alice"]
"""


BRIEF = """
[node]
id = "brief"
broker = "${GRIDQ_BROKER}"
store = "${GRIDQ_HOME}/brief"
identity = "${GRIDQ_HOME}/keys/brief.key"

[users.alice]
public_key_file = "${GRIDQ_HOME}/keys/alice.pub"

[worker]
time_limit = 6             # its soft limit, 1 s, stops a plan of seconds
concurrency = 1

[[datasets]]
name = "square"
path = "${GRIDQ_HOME}/data/square.npy"
tags = ["#brief"]
allowed_users = ["alice"]
"""

FAIR = """
[node]
id = "fair"
broker = "${GRIDQ_BROKER}"
store = "${GRIDQ_HOME}/fair"
identity = "${GRIDQ_HOME}/keys/fair.key"

[users.alice]
public_key_file = "${GRIDQ_HOME}/keys/alice.pub"
[users.carol]
public_key_file = "${GRIDQ_HOME}/keys/carol.pub"

[worker]
time_limit = 60
concurrency = 2

[[datasets]]
name = "square"
path = "${GRIDQ_HOME}/data/square.npy"
tags = ["#fair"]
allowed_users = ["alice", "carol"]
"""


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalGrid]:
    home = tmp_path_factory.mktemp("poison-grid")
    configs = {Path(c).stem: c for c in prepare(home)}
    np.save(home / "data" / "square.npy", np.random.default_rng(0).random((1536, 1536), dtype=np.float32) / 1536)
    (home / "lab.toml").write_text(LAB)
    (home / "fair.toml").write_text(FAIR)
    (home / "brief.toml").write_text(BRIEF)
    with LocalGrid(home, acl=True) as lg:
        lg.start([configs["hospital"], home / "lab.toml", home / "fair.toml", home / "brief.toml"])
        yield lg


def _captured(lg: LocalGrid) -> dict[str, Any]:
    """A real job message, as alice's client writes it (sent to the queue of an enrolled node
    whose worker is not running, taken back by the broker's admin)."""
    lg.enrol("nobody")  # a scientist may send only to enrolled nodes' queues
    with lg.connect("alice") as g:  # as Transport.send writes it, to a queue whose worker is not up
        job = RunJob(plan=Plan(inputs=[InputRef(kind="dataset", name="birth-records-feb")],
                               steps=[Step(op="mean", args=[{"ref": 0}])]), release=RawRelease())
        envelope = g.transport._envelope("hospital", job, uuid.uuid4().hex, None)
        g.app.send_task(Tasks.RUN_JOB, args=[envelope], queue="node.nobody", task_id=envelope["job_id"])
    with redis.Redis.from_url(lg.url_for("admin")) as admin:
        return json.loads(admin.rpop("node.nobody"))  # type: ignore[arg-type]


def _jsonish(rng: random.Random, depth: int = 0) -> Any:
    kinds = [lambda: None, lambda: True, lambda: rng.randint(-2**63, 2**64 - 1), lambda: rng.random() * 1e300,
             lambda: "x" * rng.randrange(40), lambda: {"$gt": ""},
             lambda: rng.choice(["gridq.node.run_job", "celery.chord_unlock", "celery.backend_cleanup"]),
             lambda: [_jsonish(rng, depth + 1) for _ in range(rng.randrange(4))],
             lambda: {str(rng.randrange(9)): _jsonish(rng, depth + 1) for _ in range(rng.randrange(4))}]
    return rng.choice(kinds if depth < 3 else kinds[:-2])()


def _fuzzed(template: dict[str, Any], rng: random.Random) -> bytes:
    """One hostile item: random bytes, random JSON, or the real message with parts replaced,
    its body re-encoded with other contents, or its text flipped and cut."""
    way = rng.randrange(6)
    if way == 0:
        return rng.randbytes(rng.randrange(600))
    if way == 1:
        return json.dumps(_jsonish(rng)).encode()
    msg = json.loads(json.dumps(template))
    if way == 2:
        for _ in range(rng.randint(1, 3)):
            part = rng.choice([p for p in (msg, msg["headers"], msg["properties"]) if isinstance(p, dict)])
            part[rng.choice([*part, "extra"])] = _jsonish(rng)
    elif way == 3:
        body = rng.choice([msgpack.packb(_jsonish(rng)), json.dumps(_jsonish(rng)).encode(), rng.randbytes(50),
                           msgpack.packb([[_jsonish(rng)], {}, {}])])
        msg["body"] = base64.b64encode(body).decode()
    elif way == 4:
        msg["headers"]["timelimit"] = rng.choice([[1e9, 1e9], "x", None, [None, -1]])
        msg["headers"]["id"] = uuid.uuid4().hex  # an admitted message: answered (refused: it is a replay)
        msg["headers"]["task"] = rng.choice([Tasks.RUN_JOB, Tasks.SEARCH])  # the node's or the gateway's
    else:
        text = bytearray(json.dumps(msg).encode())
        for _ in range(rng.randint(1, 8)):
            text[rng.randrange(len(text))] = rng.randrange(256)
        return bytes(text[: rng.randrange(1, len(text) + 1)])
    return json.dumps(msg).encode()


def _mean_weight(lg: LocalGrid) -> float:
    with lg.connect("alice") as g:
        (births,) = g.search("#birth-records", "#february")["hospital"]
        return float(births[:, 0].mean().submit().result(timeout=60).get())


def _pids(lg: LocalGrid) -> dict[str, int]:
    return {name: lg.procs[name].pid for name in ("gateway", "hospital")}


def test_junk_of_any_shape_is_dead_lettered_and_no_worker_stops(grid: LocalGrid):
    template = _captured(grid)
    mean_before = _mean_weight(grid)
    rng = random.Random(15)
    builtin = json.loads(json.dumps(template))
    builtin["headers"]["task"] = "celery.chord_unlock"  # Celery's own tasks are not served
    items = [*(_fuzzed(template, rng) for _ in range(FUZZ - 1)), json.dumps(builtin).encode()]
    expected = {q: sum(isinstance(screen(i, q, tasks, "t"), Junk) for i in items) for q, tasks in SERVED.items()}
    assert all(FUZZ // 2 < n < FUZZ for n in expected.values()), expected  # the fuzz reaches both verdicts
    before = _pids(grid)
    started = time.monotonic()
    with redis.Redis.from_url(grid.url_for("scientist")) as scientist, \
            redis.Redis.from_url(grid.url_for("admin")) as admin:
        for queue in SERVED:
            admin.delete(dead_letter_key(queue))
            for at in range(0, len(items), 100):
                scientist.lpush(queue, *items[at:at + 100])  # the scientist's own user may push, not pop
        deadline = time.monotonic() + 110
        while any(admin.llen(q) or admin.hlen(in_flight_keys(q)["unacked_key"]) for q in SERVED):
            assert time.monotonic() < deadline, {q: admin.llen(q) for q in SERVED}
            assert all(grid.procs[n].poll() is None for n in before), grid._crashed()
            time.sleep(0.2)
        dead = {q: admin.llen(dead_letter_key(q)) for q in SERVED}
        entries = [json.loads(e) for e in admin.lrange(dead_letter_key(node_queue("hospital")), 0, -1)]
    took = time.monotonic() - started
    assert dead == {q: min(n, DEAD_LETTER_MAX) for q, n in expected.items()}
    assert all(e["reason"] and e["queue"] == node_queue("hospital") for e in entries)
    assert "'celery.chord_unlock' is not served here" in entries[0]["reason"]  # the newest: pushed last
    assert _pids(grid) == before and all(grid.procs[n].poll() is None for n in before)
    for name in before:
        assert "Unrecoverable error" not in (grid.logs / f"{name}.log").read_text()
    assert _mean_weight(grid) == mean_before  # and they go on serving
    print(f"{2 * FUZZ} items in {took:.1f} s; dead-lettered {dead}")


def _heavy(pointer: Any) -> Any:
    slow = pointer
    for _ in range(60):
        slow = (slow @ pointer).clamp(-1.0, 1.0)
    return slow.sum()


def test_one_requesters_heavy_plans_cannot_hold_every_worker_process(grid: LocalGrid):
    """Two processes at the node, two heavy plans from alice: one runs, the other waits its
    turn behind carol's small job, which is answered while alice's first plan still runs."""
    store = Store(grid.home / "fair", f"sqlite:///{grid.home / 'fair' / 'node.db'}")
    try:
        with grid.connect("alice", timeout=120) as alice, grid.connect("carol", timeout=120) as carol:
            plans = [_heavy(alice.search("#fair")["fair"][0]) for _ in range(2)]  # built first: seconds each
            small_plan = carol.search("#fair")["fair"][0][0, 0]
            heavy = [plan.submit() for plan in plans]
            deadline = time.monotonic() + 60
            while not any((job := store.job(t.id)) is not None and job.status == "running" for t in heavy):
                assert time.monotonic() < deadline, "alice's plans never started"
                time.sleep(0.02)
            small = small_plan.submit()
            assert small.result(timeout=60).get().shape == ()
            states = [store.job(t.id) for t in heavy]
            assert [s is not None and s.status == "done" for s in states] == [False, False], \
                "carol's job waited for one of alice's plans"
            for ticket in heavy:  # and alice's deferred plan is not lost: it runs after the first
                assert ticket.result(timeout=120).shape == ()
    finally:
        store.close()


def _pool_child(lg: LocalGrid, name: str) -> int:
    pid = lg.procs[name].pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    assert len(children) == 1, children  # concurrency 1: the one pool process
    return int(children[0])


def test_a_job_that_keeps_killing_its_worker_is_given_up_and_its_requester_told(grid: LocalGrid):
    store = Store(grid.home / "lab", f"sqlite:///{grid.home / 'lab' / 'node.db'}")
    try:
        with grid.connect("alice", timeout=120) as g:
            x = g.search("#lab")["lab"][0]
            slow = x
            for _ in range(60):
                slow = (slow @ x).clamp(-1.0, 1.0)
            ticket = slow.sum().submit()
            for attempt in (1, 2):  # the OOM killer's SIGKILL, to the process running the job, at each delivery
                deadline = time.monotonic() + 60
                while (job := store.job(ticket.id)) is None or job.attempts < attempt or job.status != "running":
                    assert time.monotonic() < deadline, f"delivery {attempt} never started"
                    time.sleep(0.02)
                os.kill(_pool_child(grid, "lab"), signal.SIGKILL)
            with pytest.raises(JobFailed, match="delivered 2 times"):
                ticket.result(timeout=90)
        assert grid.procs["lab"].poll() is None  # the worker itself lives on
        with redis.Redis.from_url(grid.url_for("admin")) as admin:
            (entry,) = [json.loads(e) for e in admin.lrange(dead_letter_key(node_queue("lab")), 0, -1)]
        assert entry["id"] == ticket.id and "delivered 2 times" in entry["reason"]
        assert store.job(ticket.id).attempts == 2  # not run a third time
    finally:
        store.close()


def test_a_plan_over_the_nodes_memory_budget_is_refused_before_it_runs(grid: LocalGrid):
    """~40 copies of a 3844 x 3844 product of 62 values, all held until the end: GiBs from a
    tiny table, each value within the element cap. Refused on its shapes, at once; nothing ran."""
    steps = [Step(op="reshape", args=[Ref(ref=0)], params={"shape": [-1]}),
             Step(op="getitem", args=[Ref(ref=1)], params={"index": [{"start": 0, "stop": 62}]}),
             Step(op="reshape", args=[Ref(ref=2)], params={"shape": [-1, 1]}),
             Step(op="reshape", args=[Ref(ref=2)], params={"shape": [1, -1]}),
             Step(op="add", args=[Ref(ref=3), Ref(ref=4)]),
             Step(op="reshape", args=[Ref(ref=5)], params={"shape": [-1, 1]}),
             Step(op="reshape", args=[Ref(ref=5)], params={"shape": [1, -1]}),
             Step(op="add", args=[Ref(ref=6), Ref(ref=7)])]
    steps += [Step(op="mul", args=[Ref(ref=8), {"const": float(i)}]) for i in range(40)]
    steps += [Step(op="sum", args=[Ref(ref=9 + i)]) for i in range(40)]
    plan = Plan(inputs=[InputRef(kind="dataset", name="birth-records-feb")], steps=steps)
    job_id = f"hospital:{uuid.uuid4().hex}"
    with grid.connect("alice") as g:
        started = time.monotonic()
        g.transport.send("hospital", Tasks.RUN_JOB, node_queue("hospital"), RunJob(plan=plan, release=KeepRelease()),
                         job_id)
        with pytest.raises(LimitExceeded, match=r"would hold [\d.]+ GiB of values at once .* at most 2\.0 GiB"):
            g.ticket(job_id).result(timeout=60)
        assert time.monotonic() - started < 10
    assert grid.procs["hospital"].poll() is None


def test_the_nodes_time_limit_decides_not_the_clients(grid: LocalGrid):
    """A client that asks Celery for a 1000 s limit (the task message's timelimit header) still
    gets the node's: the screen drops the header, and the plan is stopped at the node's."""
    with grid.connect("alice", timeout=60) as g:
        plan = _heavy(g.search("#brief")["brief"][0]).plan
        job_id = f"brief:{uuid.uuid4().hex}"
        envelope = g.transport._envelope("brief", RunJob(plan=plan, release=KeepRelease()), job_id, None)
        g.transport.mark_sent([job_id])
        g.app.send_task(Tasks.RUN_JOB, args=[envelope], queue=node_queue("brief"), task_id=job_id,
                        time_limit=1000, soft_time_limit=1000)
        with pytest.raises(JobFailed, match="ran past this worker's time limit"):
            g.ticket(job_id).result(timeout=60)
    assert grid.procs["brief"].poll() is None


def test_the_gateway_posts_its_key_again_if_the_broker_lost_it(grid: LocalGrid):
    with redis.Redis.from_url(grid.url_for("admin")) as admin:
        posted = admin.get(GATEWAY_IDENTITY_KEY)
        admin.delete(GATEWAY_IDENTITY_KEY)  # a broker restarted without its append-only file, or flushed
        deadline = time.monotonic() + REPOST_SECONDS + 5
        while admin.get(GATEWAY_IDENTITY_KEY) is None:
            assert time.monotonic() < deadline, "the gateway did not post its key again"
            time.sleep(0.2)
        assert admin.get(GATEWAY_IDENTITY_KEY) == posted
