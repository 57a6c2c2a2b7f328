"""The operator's view: `gridq status` and Celery Flower on the grid's broker."""

from __future__ import annotations

import os
import subprocess
import sys

from typer.testing import CliRunner

from ops.cli import app
from ops.local import LocalGrid, free_port


def test_status_lists_nodes_queues_and_live_workers(local_grid: LocalGrid):
    result = CliRunner().invoke(app, ["status", "--broker", local_grid.url], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    lines = {tuple(c.strip() for c in line.split("│")[1:3]): line for line in result.output.splitlines()
             if line.count("│") > 3}
    assert "up" in lines[("hospital", "node.hospital")] and "birth-records-feb" in lines[("hospital", "node.hospital")]
    assert "up" in lines[("clinic", "node.clinic")] and "birth-records-mar" in lines[("clinic", "node.clinic")]


def test_flower_shows_the_workers_and_the_jobs(local_grid: LocalGrid, poll_json):  # type: ignore[no-untyped-def]
    port = free_port()
    env = {**os.environ, "FLOWER_UNAUTHENTICATED_API": "true"}
    flower = subprocess.Popen([sys.executable, "-m", "ops.cli", "flower", "--broker", local_grid.url,
                               "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        workers = poll_json(f"http://127.0.0.1:{port}/api/workers?refresh=1",
                            lambda w: all(any(k.startswith(f"{n}@") for k in w)  # each refresh: who answered in time
                                          for n in ("hospital", "clinic", "gateway")), timeout=30)
        assert any(k.startswith("clinic@") for k in workers) and any(k.startswith("gateway@") for k in workers)
        with local_grid.connect("alice") as grid:
            births = grid.search("#birth-records", "#february")["hospital"][0]
            ticket = births.mean(dim=0).submit()
            ticket.wait()
        tasks = poll_json(f"http://127.0.0.1:{port}/api/tasks",
                          lambda t: t.get(ticket.id, {}).get("state") == "SUCCESS", timeout=30)
        seen = tasks[ticket.id]
        assert seen["name"] == "gridq.node.run_job" and seen["state"] == "SUCCESS"
        assert "signature" in seen["args"]  # Flower shows the envelope: a plan and ids, nothing secret
    finally:
        flower.terminate()
        flower.wait(timeout=15)
