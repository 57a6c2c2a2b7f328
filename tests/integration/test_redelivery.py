"""A node worker killed with SIGKILL in the middle of a job: after a restart the job is
handed out again (acks_late + visibility timeout) and completes — once: one result object,
one reply, two recorded attempts."""

from __future__ import annotations

import time

import numpy as np

from ops.local import LocalGrid
from workers.store import Store

CONFIG = """
[node]
id = "lab"
broker = "${GRIDQ_BROKER}"
store = "${GRIDQ_HOME}/lab"
identity = "${GRIDQ_HOME}/keys/lab.key"

[users.alice]
public_key_file = "${GRIDQ_HOME}/keys/alice.pub"

[worker]
time_limit = 15            # the slow job below takes ~2-4 s
visibility_timeout = 20    # > time_limit: a job is handed out again 20 s after its delivery
restore_interval = 1

[[datasets]]
name = "square"
path = "${GRIDQ_HOME}/data/square.npy"
tags = ["#lab"]
allowed_users = ["alice"]
"""

SIZE, ROUNDS = 1536, 40


def test_killed_worker_job_completes_once_after_restart(local_grid: LocalGrid):
    rng = np.random.default_rng(0)
    np.save(local_grid.home / "data" / "square.npy", rng.random((SIZE, SIZE), dtype=np.float32) / SIZE)
    config = local_grid.home / "lab.toml"
    config.write_text(CONFIG)
    local_grid.start_node(config, "lab")
    local_grid.wait_ready(["lab"])
    store = Store(local_grid.home / "lab", f"sqlite:///{local_grid.home / 'lab' / 'node.db'}")
    try:
        with local_grid.connect("alice", timeout=90) as grid:
            x = grid.search("#lab")["lab"][0]
            slow = x
            for _ in range(ROUNDS):
                slow = (slow @ x).clamp(-1.0, 1.0)
            ticket = slow.sum().submit()
            deadline = time.monotonic() + 30
            while (job := store.job(ticket.id)) is None or job.status != "running":
                assert time.monotonic() < deadline, "the job never started"
                time.sleep(0.02)
            time.sleep(0.3)
            local_grid.kill("lab")  # SIGKILL to the worker and its pool, mid-job
            assert store.job(ticket.id).status == "running"
            local_grid.start_node(config, "lab")
            result = ticket.result(timeout=90)
            assert result.shape == ()
            assert ticket.status == "done"
        job = store.job(ticket.id)
        assert job is not None and job.status == "done"
        assert job.attempts == 2  # the killed attempt and the redelivered one
        assert store.count_objects(ticket.id) == 1
    finally:
        store.close()
        if "lab" in local_grid.procs:
            local_grid.kill("lab")
