"""The operator's tools against real servers (issue 19, points 4 and 7): `gridq status --watch`,
`gridq purge` of a dead node's queue, `gridq up` keeping its broker's port across restarts
(and its env.sh putting gridq on PATH), output piped at 80 columns. Servers listen on
127.0.0.1 only; every wait is bounded."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
import redis
from typer.testing import CliRunner

from ops.acl import SEP
from ops.cli import app
from ops.local import BROKER_PORT_FILE, LocalGrid, kept_broker_port
from protocol.contract import alive_key, dead_letter_key, in_flight_keys
from protocol.errors import NodeUnavailable

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
PIPED_80 = {"COLUMNS": "80"}  # CliRunner's output is not a terminal: as `gridq … | less` or `> file`
LONG_NODE = "a-node-whose-identifier-is-quite-long-indeed-0123456789abcdefghi"
LONG_ID = "6f1c2e9a7b3d4c5e8f0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f6"


class Broker(NamedTuple):
    url: str
    client: redis.Redis


@pytest.fixture()
def bare_broker(tmp_path: Path) -> Iterator[Broker]:
    """A Redis of its own (no workers): queues, in-flight jobs and liveness keys are set by hand,
    as a node's worker would leave them."""
    with LocalGrid(tmp_path / "home") as lg:
        lg.start_redis()
        client = redis.Redis.from_url(lg.url)
        try:
            yield Broker(lg.url, client)
        finally:
            client.close()


def rows(output: str) -> dict[tuple[str, str], str]:
    """The table's rows by (node, queue): each row on one line."""
    return {tuple(c.strip() for c in line.split("│")[1:3]): line for line in output.splitlines()  # type: ignore[misc]
            if line.count("│") > 3}


# --- gridq status --------------------------------------------------------------------------------


def test_status_piped_at_80_columns_keeps_rows_whole_and_says_what_waits(local_grid: LocalGrid) -> None:
    result = CliRunner().invoke(app, ["status", "--broker", local_grid.url], env=PIPED_80)
    assert result.exit_code == 0, result.output
    table = rows(result.output)
    assert "up" in table[("hospital", "node.hospital")] and "birth-records-feb" in table[("hospital", "node.hospital")]
    assert "…" not in result.output
    waiting = sum(int(line.split("│")[3]) for line in table.values() if line.split("│")[3].strip().isdigit())
    if waiting:
        assert f"{waiting} job{'' if waiting == 1 else 's'} waiting" in result.output
    else:
        assert "no jobs waiting in any queue" in result.output


def test_status_watch_refreshes_until_its_count(local_grid: LocalGrid) -> None:
    t0 = time.monotonic()
    result = CliRunner().invoke(app, ["status", "--broker", local_grid.url, "--watch", "--interval", "0.2",
                                      "--count", "3"], env=PIPED_80)
    assert result.exit_code == 0, result.output
    assert [int(n) for n in re.findall(r"refresh (\d) of 3", result.output)] == [1, 2, 3]
    assert len([line for line in result.output.splitlines() if "node.hospital" in line]) == 3
    assert time.monotonic() - t0 < 60


def test_status_watch_stops_cleanly_on_ctrl_c(local_grid: LocalGrid, tmp_path: Path) -> None:
    out = tmp_path / "watch.out"
    with open(out, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "ops.cli", "status", "--broker", local_grid.url, "--watch",
                                 "--interval", "0.2"], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, **PIPED_80}, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while out.read_text().count("Ctrl-C stops") < 2:
            assert proc.poll() is None, out.read_text()
            assert time.monotonic() < deadline, f"no two refreshes in 60 s:\n{out.read_text()}"
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=30) == 0, out.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert "Traceback" not in out.read_text() and "Aborted" not in out.read_text()


# --- gridq dead-letters, at 80 columns ---------------------------------------------------------


def test_dead_letters_piped_at_80_columns_show_long_ids_whole(bare_broker: Broker) -> None:
    queue = f"node.{LONG_NODE}"
    bare_broker.client.lpush(dead_letter_key(queue), json.dumps({"queue": queue, "at": time.time(), "task":
                                                           "gridq.node.run_job", "id": LONG_ID,
                                                           "reason": "given up after 5 deliveries"}))
    result = CliRunner().invoke(app, ["dead-letters", queue, "--broker", bare_broker.url], env=PIPED_80)
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if LONG_ID in line)
    assert queue in row and "gridq.node.run_job" in row and "given up after 5 deliveries" in row
    empty = CliRunner().invoke(app, ["dead-letters", "node.other", "--broker", bare_broker.url], env=PIPED_80)
    assert empty.exit_code == 0 and empty.output.strip() == "no dead letters in node.other"


# --- gridq purge -----------------------------------------------------------------------------------


def fill(client: redis.Redis, queue: str, waiting: int, taken: int = 0) -> None:
    """Messages as kombu leaves them: on the queue (and a priority list), and taken but not
    acknowledged (its in-flight hash and index)."""
    keys = in_flight_keys(queue)
    for n in range(waiting):
        client.lpush(queue if n % 2 else f"{queue}{SEP}3", json.dumps({"body": f"job {n}"}))
    for n in range(taken):
        client.hset(keys["unacked_key"], f"tag{n}", json.dumps([{"body": f"taken {n}"}, "", queue]))
        client.zadd(keys["unacked_index_key"], {f"tag{n}": time.time()})


def jobs(client: redis.Redis, queue: str) -> int:
    return sum(client.llen(k) for k in [queue, *(f"{queue}{SEP}{p}" for p in range(1, 10))]) + \
        client.hlen(in_flight_keys(queue)["unacked_key"])


def test_purge_asks_then_removes_a_dead_queues_jobs(bare_broker: Broker) -> None:
    url, client = bare_broker
    fill(client, "node.ghost", waiting=3, taken=2)
    fill(client, "node.other", waiting=1)

    kept = CliRunner().invoke(app, ["purge", "node.ghost", "--broker", url], input="n\n")
    assert kept.exit_code == 1, kept.output
    assert "node.ghost: 3 jobs waiting, 2 taken by a worker that stopped before finishing" in kept.output
    assert "Remove them all? [y/N]" in kept.output and "nothing removed" in kept.output
    assert jobs(client, "node.ghost") == 5

    no_answer = CliRunner().invoke(app, ["purge", "node.ghost", "--broker", url], input="")  # stdin closed
    assert no_answer.exit_code == 1 and "nothing removed" in no_answer.output
    assert jobs(client, "node.ghost") == 5

    purged = CliRunner().invoke(app, ["purge", "node.ghost", "--broker", url], input="y\n")
    assert purged.exit_code == 0, purged.output
    assert "removed 5 jobs from node.ghost (3 waiting, 2 taken)" in purged.output
    assert jobs(client, "node.ghost") == 0
    assert not client.exists(in_flight_keys("node.ghost")["unacked_index_key"])
    assert jobs(client, "node.other") == 1  # another queue is left alone

    again = CliRunner().invoke(app, ["purge", "node.ghost", "--broker", url, "--yes"])
    assert again.exit_code == 0 and "node.ghost is empty (no jobs waiting, none taken): nothing to purge" in \
        again.output

    once = CliRunner().invoke(app, ["purge", "node.other", "--broker", url, "--yes"])
    assert once.exit_code == 0 and "removed 1 job from node.other" in once.output


def test_purge_refuses_a_queue_a_worker_serves(bare_broker: Broker) -> None:
    url, client = bare_broker
    fill(client, "node.busy", waiting=2)
    client.setex(alive_key("node.busy"), 20, "4242")  # what a live worker's beacon keeps set
    refused = CliRunner().invoke(app, ["purge", "node.busy", "--broker", url, "--yes"])
    assert refused.exit_code == 1
    assert "error: InvalidRequest: a worker serves node.busy" in refused.output and "stop it first" in refused.output
    assert jobs(client, "node.busy") == 2

    for junk in ("gridq:sent:abc", "node.", "node.a*", "hospital"):  # only a node's queues, never any key
        wrong = CliRunner().invoke(app, ["purge", junk, "--broker", url, "--yes"])
        assert wrong.exit_code == 1 and "is not a node's queue" in wrong.output, junk


def test_purge_refuses_a_live_nodes_queue(local_grid: LocalGrid) -> None:
    refused = CliRunner().invoke(app, ["purge", "node.hospital", "--broker", local_grid.url, "--yes"])
    assert refused.exit_code == 1 and "a worker serves node.hospital" in refused.output, refused.output


# --- gridq up: the same broker URL across restarts, gridq on PATH --------------------------------


class Up:
    """`gridq up --no-mpc` as a person runs it, in a home of its own, stopped with Ctrl-C (what
    these tests check of it — the broker, its port, its users — does not need the MPC pool,
    whose four workers take most of its start)."""

    def __init__(self, home: Path, log: Path) -> None:
        self.home, self.log = home, log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "ops.cli", "up", "--home", str(home), "--edge-port",
                                          "0", "--no-mpc"], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True, env={**os.environ, "COLUMNS": "200"})

    def wait_up(self, timeout: float = 240) -> str:
        """env.sh, once the grid is up."""
        deadline = time.monotonic() + timeout
        while not (self.home / "env.sh").exists():
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"gridq up did not come up in {timeout:.0f} s"
            time.sleep(0.5)
        time.sleep(0.2)  # written in one call; let it land
        return (self.home / "env.sh").read_text()

    def stop(self) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)  # Ctrl-C: it stops its own grid
        try:
            return self.proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            raise


def sourced(env_sh: Path) -> dict[str, str]:
    """What a second shell gets from `. env.sh`."""
    shown = subprocess.run(["bash", "-c", '. "$1" && printf "%s\\n%s\\n" "$GRIDQ_BROKER" "$GRIDQ_HOME" && '
                            "command -v gridq", "-", str(env_sh)], capture_output=True, text=True, timeout=10,
                           env={"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp")})
    assert shown.returncode == 0, shown.stderr
    broker, home, gridq = shown.stdout.splitlines()
    return {"GRIDQ_BROKER": broker, "GRIDQ_HOME": home, "gridq": gridq}


@pytest.mark.timeout(600)
def test_gridq_up_keeps_its_broker_url_across_restarts(tmp_path: Path) -> None:
    home = tmp_path / "home"
    first = Up(home, tmp_path / "up.log")
    try:
        first.wait_up()
        before = sourced(home / "env.sh")
    finally:
        assert first.stop() == 0, (tmp_path / "up.log").read_text()[-3000:]
    assert not (home / "env.sh").exists()
    port = int((home / BROKER_PORT_FILE).read_text())
    assert before["GRIDQ_BROKER"].startswith("redis://scientist:") and f"@127.0.0.1:{port}/" in before["GRIDQ_BROKER"]
    assert before["GRIDQ_HOME"] == str(home)
    assert Path(before["gridq"]).parent == Path(sys.prefix) / "bin"  # the project's gridq, on PATH

    second = Up(home, tmp_path / "up.log")
    try:
        second.wait_up()
        after = sourced(home / "env.sh")
        assert after == before  # the same URL: an exported GRIDQ_BROKER, Flower, a node started by hand still work
        with redis.Redis.from_url(before["GRIDQ_BROKER"], socket_timeout=5) as scientist:
            assert scientist.ping()
        shown = subprocess.run([after["gridq"], "status"], capture_output=True, text=True, timeout=120,
                               env={**os.environ, "GRIDQ_HOME": after["GRIDQ_HOME"], "GRIDQ_BROKER":
                                    after["GRIDQ_BROKER"], "COLUMNS": "80"})
        assert shown.returncode == 0, shown.stderr
        assert "node.hospital" in shown.stdout and "node.clinic" in shown.stdout
    finally:
        assert second.stop() == 0, (tmp_path / "up.log").read_text()[-3000:]
    assert "broker on port " + str(port) in (tmp_path / "up.log").read_text()
    assert "the MPC pool is not started (--no-mpc)" in (tmp_path / "up.log").read_text()


def test_a_kept_port_held_by_this_homes_own_redis_is_named(tmp_path: Path) -> None:
    """An earlier `gridq up` killed outright leaves its Redis running: starting again says so
    (a second Redis on the same append-only file would corrupt it) rather than picking a port."""
    home = tmp_path / "home"
    port, _ = kept_broker_port(home)
    with LocalGrid(home, acl=True) as lg:
        lg.start_redis(port)
        pid = lg.procs["redis"].pid
        with pytest.raises(NodeUnavailable, match=rf"port {port} .* this home's own Redis \(process {pid}\)"):
            kept_broker_port(home)
    assert kept_broker_port(home) == (port, "")  # stopped: the port is its again
