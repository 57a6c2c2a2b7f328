"""`gridq flower --auth-file`: Flower on the local grid's broker asks for the password that
compose's `init` writes (no credentials, or wrong ones: 401), and what it shows of a finished
job is its name and state, not its reply."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from ops.compose_init import flower_auth
from ops.local import LocalGrid, free_port


def get(url: str, credential: str | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(url)
    if credential is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(credential.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            body = response.read()
            return response.status, json.loads(body) if "json" in response.headers.get("Content-Type", "") else body
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def poll(url: str, credential: str, ok, timeout: float = 30.0) -> Any:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            status, last = get(url, credential)
            if status == 200 and ok(last):
                return last
        except OSError:  # not listening yet
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} never answered as expected; last answer: {str(last)[:500]}")


def test_flower_asks_for_the_password_init_wrote(local_grid: LocalGrid, tmp_path: Path):
    credential = flower_auth(tmp_path).read_text().strip()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWER_")}
    with open(tmp_path / "flower.log", "wb") as log:
        flower = subprocess.Popen([sys.executable, "-m", "ops.cli", "flower", "--broker", local_grid.url,
                                   "--port", str(port), "--auth-file", str(tmp_path / "flower.auth")],
                                  env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        # each refresh lists the workers that answered its broadcast in time: poll until both have
        workers = poll(f"{base}/api/workers?refresh=1", credential,
                       lambda w: all(any(k.startswith(f"{n}@") for k in w) for n in ("hospital", "gateway")))
        assert any(k.startswith("gateway@") for k in workers)
        for path in ("/api/workers", "/api/tasks", "/"):
            assert get(base + path)[0] == 401, path
            assert get(base + path, "operator:not-the-password")[0] == 401, path
        assert get(base + "/", credential)[0] == 200
        with local_grid.connect("alice") as grid:
            births = grid.search("#birth-records", "#february")["hospital"][0]
            ticket = births.mean(dim=0).submit()
            ticket.wait()
        tasks = poll(f"{base}/api/tasks", credential, lambda t: t.get(ticket.id, {}).get("state") == "SUCCESS")
        shown = tasks[ticket.id]
        assert shown["name"] == "gridq.node.run_job"
        assert "signature" not in str(shown["result"]) and len(str(shown["result"])) <= 8  # not the reply envelope
    finally:
        os.killpg(flower.pid, signal.SIGTERM)
        try:
            flower.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(flower.pid, signal.SIGKILL)
            flower.wait(timeout=15)
