"""`gridq flower` ends when told to, even after its broker is gone.

Flower stops its loop on SIGTERM, but Python then waits for Flower's thread pool, whose
threads retry the dead broker for ever: the process stayed up until SIGKILL (an operator's
`docker compose stop` waits 10 s for it, every time). A real redis-server, killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from ops.local import free_port, redis_server_binary


def _answers(url: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return True
        except OSError:
            time.sleep(0.5)
    return False


def test_flower_exits_on_sigterm_when_its_broker_is_gone(tmp_path: Path) -> None:
    port, web = free_port(), free_port()
    redis = subprocess.Popen([redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no", "--dir", str(tmp_path)], stdout=subprocess.DEVNULL)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("FLOWER_")}, "GRIDQ_HOME": str(tmp_path)}
    with open(tmp_path / "flower.log", "wb") as log:
        flower = subprocess.Popen([sys.executable, "-m", "ops.cli", "flower", "--broker",
                                   f"redis://127.0.0.1:{port}/0", "--port", str(web)],
                                  stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        assert _answers(f"http://127.0.0.1:{web}/api/workers", 40), (tmp_path / "flower.log").read_text()
        time.sleep(6)  # Flower asks the workers to enable events every 5 s, from its thread pool, over one connection
        redis.kill()
        redis.wait(timeout=10)
        time.sleep(7)  # … which it now retries, for as long as kombu's retry policy says (long)
        flower.send_signal(signal.SIGTERM)
        try:
            code = flower.wait(timeout=15)
        except subprocess.TimeoutExpired:
            code = None
        assert code == 0, f"Flower still running 15 s after SIGTERM:\n{(tmp_path / 'flower.log').read_text()[-2000:]}"
    finally:
        if flower.poll() is None:
            os.killpg(flower.pid, signal.SIGKILL)
            flower.wait(timeout=15)
        if redis.poll() is None:
            redis.kill()
            redis.wait(timeout=10)
