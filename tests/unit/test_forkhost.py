"""The fork host (ops.forkhost): the workers LocalGrid starts are forked from one preloaded
process. What a worker must still get as if a shell had started it: its own command, log,
environment, exit code and process group, and random generators of its own."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from ops.forkhost import ForkHost, _reseed
from ops.keys import write_identity


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ForkHost]:
    log = tmp_path_factory.mktemp("forkhost") / "forkhost.log"
    host = ForkHost(log, dict(os.environ))
    yield host
    host.close()
    assert host.proc.returncode == 0, log.read_text()


def test_a_forked_command_writes_its_own_log_and_ends_with_its_own_code(host: ForkHost, tmp_path: Path) -> None:
    log = tmp_path / "node.log"
    env = {**os.environ, "GRIDQ_HOME": str(tmp_path / "home")}
    worker = host.spawn(["node", "start", "absent.toml"], env, log, tmp_path)
    assert worker.wait(timeout=60) == 1  # `gridq node start` on a missing config: one error line, code 1
    assert worker.poll() == 1
    assert "error: InvalidRequest: node config absent.toml does not exist" in log.read_text()


def test_a_worker_that_hangs_is_waited_for_with_a_timeout_and_killed_by_its_group(host: ForkHost,
                                                                                   tmp_path: Path) -> None:
    # a node whose broker never answers keeps trying: a worker that does not end by itself
    config = tmp_path / "lab.toml"
    config.write_text('[node]\nid = "lab"\nbroker = "redis://127.0.0.1:9/0"\nstore = "store"\n'
                      'identity = "lab.key"\n')
    write_identity(tmp_path, "lab")
    worker = host.spawn(["node", "start", str(config)], dict(os.environ), tmp_path / "lab.log", tmp_path)
    os.killpg(worker.pid, 0)  # its process group exists as soon as spawn returns: LocalGrid signals groups
    if worker.poll() is None:
        with pytest.raises(subprocess.TimeoutExpired):
            worker.wait(timeout=0.5)
        os.killpg(worker.pid, signal.SIGKILL)
        assert worker.wait(timeout=30) == -signal.SIGKILL
    assert worker.poll() is not None


def test_each_forked_worker_draws_its_own_seeds() -> None:
    """Forked children share the host's generator states unless they reseed: two nodes would
    draw the same DP-SGD noise (Opacus draws from torch's default generator)."""
    torch.manual_seed(7)
    seeds = []
    for _ in range(2):
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read)
            _reseed()
            os.write(write, json.dumps([torch.initial_seed(), float(torch.rand(1))]).encode())
            os._exit(0)
        os.close(write)
        with os.fdopen(read) as pipe:
            seeds.append(tuple(json.loads(pipe.read())))
        os.waitpid(pid, 0)
    assert seeds[0] != seeds[1]
    assert 7 not in {s[0] for s in seeds}


def test_the_host_ends_when_its_stdin_closes(tmp_path: Path) -> None:
    host = ForkHost(tmp_path / "forkhost.log", dict(os.environ))
    started = time.monotonic()
    host.close(timeout=60)
    assert host.proc.returncode == 0 and time.monotonic() - started < 60
