"""A node worker killed with SIGKILL in the middle of a job: after a restart the job is
handed out again (acks_late + visibility timeout) and completes — once: one result object,
one reply, two recorded attempts; a DP release is charged once, and the ledger survives."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis

from ops.local import LocalGrid
from protocol.contract import celery_settings, in_flight_keys, node_queue
from workers.storage.store import Store
from workers.storage.tables import ChargeRow

CONFIG = """
[node]
id = "lab"
broker = "${GRIDQ_BROKER}"
store = "${GRIDQ_HOME}/lab"
identity = "${GRIDQ_HOME}/keys/lab.key"

[users.alice]
public_key_file = "${GRIDQ_HOME}/keys/alice.pub"
[users.carol]
public_key_file = "${GRIDQ_HOME}/keys/carol.pub"

[worker]
time_limit = 25            # the slow jobs below take a few seconds (more on a busy machine)
visibility_timeout = 30    # > time_limit: a job is handed out again 30 s after its delivery
restore_interval = 1

[[datasets]]
name = "square"
path = "${GRIDQ_HOME}/data/square.npy"
tags = ["#lab"]
allowed_users = ["alice"]

[[datasets]]
name = "long"
path = "${GRIDQ_HOME}/data/long.npy"
tags = ["#lab-long"]
bounds = [0.0, 1.0]
"""

SIZE, ROUNDS = 1536, 40


@pytest.fixture()
def lab(local_grid: LocalGrid) -> Iterator[tuple[Path, Store]]:
    rng = np.random.default_rng(0)
    np.save(local_grid.home / "data" / "square.npy", rng.random((SIZE, SIZE), dtype=np.float32) / SIZE)
    np.save(local_grid.home / "data" / "long.npy", rng.random(8_000_000, dtype=np.float32))
    config = local_grid.home / "lab.toml"
    config.write_text(CONFIG)
    local_grid.start_node(config, "lab")
    local_grid.wait_ready(["lab"])
    store = Store(local_grid.home / "lab", f"sqlite:///{local_grid.home / 'lab' / 'node.db'}")
    yield config, store
    store.close()
    if "lab" in local_grid.procs:
        local_grid.stop_worker("lab")


def _kill_mid_jobs(local_grid: LocalGrid, config: Path, store: Store, job_ids: list[str]) -> None:
    """SIGKILL the node while every job of ``job_ids`` runs (one process each), as if it died in
    the middle of a restore pass too: the lock a dying worker leaves must not hold up the
    restarted one's restores for long (kombu's default lock lives 300 s)."""
    deadline = time.monotonic() + 30
    while any((job := store.job(j)) is None or job.status != "running" for j in job_ids):
        assert time.monotonic() < deadline, "the jobs never all started"
        time.sleep(0.02)
    time.sleep(0.3)
    local_grid.kill("lab")  # SIGKILL to the worker and its pool, mid-job
    assert all(store.job(j).status == "running" for j in job_ids)
    options = celery_settings()["broker_transport_options"]
    admin = redis.Redis.from_url(local_grid.url)
    admin.set(in_flight_keys(node_queue("lab"))["unacked_mutex_key"], "the killed worker's",
              ex=options["unacked_mutex_expire"])
    admin.close()
    local_grid.start_node(config, "lab")


def test_jobs_of_a_killed_worker_complete_once_after_restart_and_a_dp_release_is_charged_once(
        local_grid: LocalGrid, lab):
    """Two jobs in flight when the node dies (the node runs two processes): a plain one and a
    DP release. Each is handed out again and completes once; the release is charged once."""
    config, store = lab
    with local_grid.connect("alice", timeout=90) as alice, local_grid.connect("carol", timeout=90) as carol:
        x = alice.search("#lab")["lab"][0]
        slow = x
        for _ in range(ROUNDS):
            slow = (slow @ x).clamp(-1.0, 1.0)
        plain = slow.sum().submit()
        y = carol.search("#lab-long")["lab"][0]
        slow = y
        for _ in range(60):  # a few seconds of bounded arithmetic on 8M values
            slow = (slow * 1.0).clamp(0.0, 1.0)
        release = slow.mean().submit(epsilon=0.5)
        _kill_mid_jobs(local_grid, config, store, [plain.id, release.id])
        result = plain.result(timeout=90)
        assert result.shape == ()
        assert plain.status == "done"
        released = release.private_value(timeout=90)
        assert released.noise.scale == pytest.approx(1.0 / 8_000_000 / 0.5)
        (budget,) = carol.budget("lab", "long")  # the ledger, read by the restarted worker
    assert budget.releases == 1 and budget.spent_epsilon == pytest.approx(0.5)
    for ticket in (plain, release):
        job = store.job(ticket.id)
        assert job is not None and job.status == "done"
        assert job.attempts == 2  # the killed attempt and the redelivered one
    assert store.count_objects(plain.id) == 1
    with store.session() as s:
        assert s.query(ChargeRow).filter_by(job_id=release.id).count() == 1
