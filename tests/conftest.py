"""Shared fixtures. Integration tests run a real local grid: its own redis-server on a free
loopback port (never 6379) and real Celery worker processes — no in-memory stand-ins."""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from ops.demo import prepare
from ops.local import LocalGrid

# No test writes the real ~/.gridq (keys, pinned gateway keys, run history): one that does
# not point GRIDQ_HOME at a home of its own gets this temporary one (so do its subprocesses).
if not os.environ.get("GRIDQ_HOME"):
    os.environ["GRIDQ_HOME"] = tempfile.mkdtemp(prefix="gridq-test-home-")
    atexit.register(shutil.rmtree, os.environ["GRIDQ_HOME"], ignore_errors=True)


@pytest.fixture(scope="session")
def local_grid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalGrid]:
    """The demo grid (gateway, hospital, clinic), shared by the integration tests."""
    home = tmp_path_factory.mktemp("grid")
    configs = prepare(home)
    with LocalGrid(home) as lg:
        lg.start(configs)
        yield lg


class DemoMpcPool:
    """The demo's MPC pool on the session's grid: company hosts models, hospital, public and
    clinic hold shares, the university deals. Started by the first test that asks for it and
    kept while the tests that follow ask for it too (``pytest_collection_modifyitems`` puts
    them together), then stopped: its workers take longer to start than most tests run, and
    tests that start a node's MPC worker of their own must not find a second one there."""

    NODES = ("company", "university", "hospital", "public", "clinic")

    def __init__(self) -> None:
        self.grid: LocalGrid | None = None

    def ensure(self, lg: LocalGrid) -> LocalGrid:
        """Every worker of the pool up: those a test killed are started again."""
        from ops.local import NODE_CONFIGS

        missing = [n for n in self.NODES if f"{n}-mpc" not in lg.procs]
        if missing:
            lg.ensure_keys(*self.NODES, "dana", "bob", "eve", "mallory")
            for node in missing:
                lg.start_mpc(NODE_CONFIGS / f"{node}.toml")
            lg.wait_ready(list(missing), timeout=90, workers=[f"{n}-mpc" for n in missing])
        self.grid = lg
        return lg

    def stop(self) -> None:
        if self.grid is not None:
            for node in self.NODES:
                if f"{node}-mpc" in self.grid.procs:
                    self.grid.kill(f"{node}-mpc")  # SIGKILL, as each module's own pool was before: no drain to wait for
            self.grid = None


DEMO_MPC_POOL = DemoMpcPool()


@pytest.fixture(scope="module")
def demo_mpc_pool(local_grid: LocalGrid) -> LocalGrid:
    """The session's grid with the demo's MPC pool up as a module starts (see DemoMpcPool):
    a worker a test of the module kills stays down for the module's later tests."""
    return DEMO_MPC_POOL.ensure(local_grid)


def _uses_pool(item: pytest.Item) -> bool:
    return "demo_mpc_pool" in getattr(item, "fixturenames", ())


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests that use the demo MPC pool run one after the other, from where the first of
    them is, so that the pool starts once (each module keeps its own order)."""
    pooled = [item for item in items if _uses_pool(item)]
    if pooled:
        first = items.index(pooled[0])
        rest = [item for item in items if not _uses_pool(item)]
        items[:] = rest[:first] + pooled + rest[first:]


@pytest.hookimpl(trylast=True)  # after the test's own fixtures are torn down
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    if _uses_pool(item) and (nextitem is None or not _uses_pool(nextitem)):
        DEMO_MPC_POOL.stop()


@pytest.fixture(scope="session")
def births_feb(local_grid: LocalGrid):  # type: ignore[no-untyped-def]
    """The hospital's February table, as the hospital itself reads it."""
    from workers.storage.datasets import load_table

    table, columns = load_table(Path(local_grid.home) / "data" / "hospital_births_feb.csv")
    assert columns == ["weight", "height"]
    return table


@pytest.fixture()
def hospital_admin(local_grid: LocalGrid, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """The hospital's admin API (workers.Node), as the owner uses it from Python."""
    from ops.local import NODE_CONFIGS
    from workers import Node

    monkeypatch.setenv("GRIDQ_HOME", str(local_grid.home))
    monkeypatch.setenv("GRIDQ_BROKER", local_grid.url)
    node = Node.from_config(NODE_CONFIGS / "hospital.toml")
    yield node
    node.close()


WARD_CONFIG = """
[node]
id = "ward"
broker = "${GRIDQ_BROKER}"
store = "${GRIDQ_HOME}/ward"
identity = "${GRIDQ_HOME}/keys/ward.key"

[users.alice]
public_key_file = "${GRIDQ_HOME}/keys/alice.pub"
[users.carol]
public_key_file = "${GRIDQ_HOME}/keys/carol.pub"

[approval]
default = "manual"            # every job waits for the owner …
auto = ["raw_if_allowed"]     # … except allowed users' own data

[[datasets]]
name = "ward-births"
path = "${GRIDQ_HOME}/data/hospital_births_feb.csv"
tags = ["#ward"]
allowed_users = ["alice"]
bounds = { weight = [0.0, 7.0], height = [20.0, 65.0] }
"""


@pytest.fixture(scope="session")
def ward(local_grid: LocalGrid):  # type: ignore[no-untyped-def]
    """A manual-approval node: every job waits for the owner, but an allowed user's own data."""
    config = local_grid.home / "ward.toml"
    config.write_text(WARD_CONFIG)
    local_grid.start_node(config, "ward")
    local_grid.wait_ready(["ward"])
    yield config
    if "ward" in local_grid.procs:
        local_grid.stop_worker("ward")


@pytest.fixture(scope="session")
def poll_json():  # type: ignore[no-untyped-def]
    """``poll(url, ok, timeout)``: GET ``url`` every 0.5 s until its JSON satisfies ``ok`` (a
    Flower API, say); AssertionError with the last answer if it never does."""
    import json
    import time
    import urllib.request

    def poll(url: str, ok, timeout: float = 40.0):  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    last = json.loads(response.read())
                if ok(last):
                    return last
            except OSError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"{url} never answered as expected; last answer: {str(last)[:500]}")

    return poll


MANUAL_NODE_CONFIG = """
[node]
id = "{name}"
broker = "${{GRIDQ_BROKER}}"
store = "${{GRIDQ_HOME}}/{name}"
identity = "${{GRIDQ_HOME}}/keys/{name}.key"

[users.alice]
public_key_file = "${{GRIDQ_HOME}}/keys/alice.pub"
[users.bob]
public_key_file = "${{GRIDQ_HOME}}/keys/bob.pub"
[users.carol]
public_key_file = "${{GRIDQ_HOME}}/keys/carol.pub"

[approval]
default = "manual"            # every job waits for the owner …
auto = ["raw_if_allowed"]     # … except allowed users' own data
{expiry}

[[datasets]]
name = "{name}-births"
path = "${{GRIDQ_HOME}}/data/hospital_births_feb.csv"
tags = ["#{name}"]
allowed_users = ["alice"]
bounds = {{ weight = [0.0, 7.0], height = [20.0, 65.0] }}
"""


@pytest.fixture(scope="session")
def manual_node(local_grid: LocalGrid):  # type: ignore[no-untyped-def]
    """Start a manual-approval node of the local grid: ``yield from manual_node(name,
    expiry)`` in a fixture gives its config while it runs and stops it after. Alice, bob and
    carol are its users; alice may see its ``<name>-births`` raw; ``expiry`` is a TOML line
    of its [approval] section (e.g. ``expire_after = 3``)."""

    def start(name: str, expiry: str = "") -> Iterator[Path]:
        local_grid.ensure_keys("alice", "bob", "carol")  # the node reads its users' keys when it starts
        config = local_grid.home / f"{name}.toml"
        config.write_text(MANUAL_NODE_CONFIG.format(name=name, expiry=expiry))
        local_grid.start_node(config, name)
        local_grid.wait_ready([name])
        yield config
        if name in local_grid.procs:  # stopped as an owner stops it: its worker says it is down
            local_grid.kill(name, signal.SIGTERM)

    return start
