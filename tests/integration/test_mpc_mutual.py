"""No task waits on work queued behind its own (issue 16, point 3), on real MPC worker
processes with one process per pool: two nodes that host models for each other, serving
and answering at the same time, both finish — and long before the round timeout, which is
where they ended when a host's task waited for its parties' tasks in the same one-process
pool. Two hosts sending sessions to the same two parties at once both finish too: sessions
reach every party in one order (the dispatch lock), so no two sessions each hold one party
while waiting for the other."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import pytest
import torch

from ops.local import LocalGrid

NODES = ("north", "south", "east", "west")
ROUND_TIMEOUT = 20.0
CONFIG = """
[node]
id = "{name}"
broker = "${{GRIDQ_BROKER}}"
store = "${{GRIDQ_HOME}}/{name}"
identity = "${{GRIDQ_HOME}}/keys/{name}.key"

[users.dana]
public_key_file = "${{GRIDQ_HOME}}/keys/dana.pub"
[users.bob]
public_key_file = "${{GRIDQ_HOME}}/keys/bob.pub"

[mpc]
round_timeout = {timeout}
# sessions = 1: one process serves other nodes' workers (the default)
"""
T = TypeVar("T")


@pytest.fixture(scope="module")
def ring(local_grid: LocalGrid) -> Iterator[LocalGrid]:
    local_grid.ensure_keys("dana", "bob")
    for name in NODES:
        config = local_grid.home / f"{name}.toml"
        config.write_text(CONFIG.format(name=name, timeout=ROUND_TIMEOUT))
        local_grid.start_mpc(config)
    local_grid.wait_ready(list(NODES), timeout=120, workers=[f"{n}-mpc" for n in NODES])
    yield local_grid
    for name in NODES:
        local_grid.kill(f"{name}-mpc")


def model(seed: int) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))


def at_once(*calls: Callable[[], T]) -> tuple[list[T], float]:
    """Run ``calls`` in threads at the same moment; their results and the seconds it took."""
    start = time.monotonic()
    with ThreadPoolExecutor(len(calls)) as pool:
        results = [f.result() for f in [pool.submit(c) for c in calls]]
    return results, time.monotonic() - start


def serve(lg: LocalGrid, name: str, net: torch.nn.Module, host: str, parties: list[str], provider: str) -> None:
    with lg.connect("dana") as owner:
        owner.serve(net, name=name, parties=parties, crypto_provider=provider, host=host, queriers=["bob"])


def query(lg: LocalGrid, name: str, x: torch.Tensor) -> torch.Tensor:
    with lg.connect("bob") as grid:
        return grid.query(name, x)


def test_two_nodes_that_host_for_each_other_serve_and_answer_at_once(ring: LocalGrid) -> None:
    """north hosts a model of which south holds a share, south one of which north does: each
    host waits on the other's party work while the other waits on its own."""
    nets = {"by-north": model(1), "by-south": model(2)}
    _, took = at_once(lambda: serve(ring, "by-north", nets["by-north"], "north", ["south", "east"], "west"),
                      lambda: serve(ring, "by-south", nets["by-south"], "south", ["north", "east"], "west"))
    assert took < ROUND_TIMEOUT / 2, f"serving took {took:.1f} s: a host waited out its parties"
    x = torch.tensor([[1.0, -2.0, 0.5, 3.0], [0.25, 0.0, -1.5, 2.0]])
    for _ in range(3):  # the first ones with cold dealer pools, the rest warm
        (north, south), took = at_once(lambda: query(ring, "by-north", x), lambda: query(ring, "by-south", x))
        assert took < ROUND_TIMEOUT / 2, f"two queries took {took:.1f} s: a host waited out its parties"
        with torch.no_grad():
            assert (north - nets["by-north"](x)).abs().max().item() < 1e-3
            assert (south - nets["by-south"](x)).abs().max().item() < 1e-3


def test_two_hosts_sending_sessions_to_the_same_parties_at_once_both_finish(ring: LocalGrid) -> None:
    """east and west each run one session at a time, and north sends its sessions to east
    first, south to west first; yet they reach both in one order, so neither runs one host's
    session while the other's holds its peer."""
    nets = {"cross-n": model(3), "cross-s": model(4)}
    serve(ring, "cross-n", nets["cross-n"], "north", ["east", "west"], "south")
    serve(ring, "cross-s", nets["cross-s"], "south", ["west", "east"], "north")  # sent to west first
    x = torch.tensor([[0.5, 1.0, -1.0, 2.0]])
    calls = [lambda name=name: query(ring, name, x) for name in ("cross-n", "cross-s") * 4]
    results, took = at_once(*calls)
    assert took < ROUND_TIMEOUT, f"eight queries took {took:.1f} s"
    with torch.no_grad():
        for name, y in zip(("cross-n", "cross-s") * 4, results, strict=True):
            assert (y - nets[name](x)).abs().max().item() < 1e-3


def test_the_dispatch_lock_is_held_by_one_at_a_time_and_never_blocks_for_long(local_grid: LocalGrid) -> None:
    """The lock the hosts share (workers.locks, no scripts): one holder at a time; a holder's
    release never frees a lock that expired and was taken by another; a lock nobody releases
    stops blocking after ``wait`` (a node that keeps it only slows the others down)."""
    import redis

    from workers.locks import held

    client = redis.Redis.from_url(local_grid.url)
    key = "gridq:test:lock"
    with held(client, key, ttl=5.0, wait=0.0) as first:
        assert first
        with held(client, key, ttl=5.0, wait=0.2) as second:
            assert not second  # taken: waited 0.2 s in vain, and goes on without it
        assert client.get(key) is not None  # the one that did not take it released nothing
    assert client.get(key) is None  # released by its holder
    with held(client, key, ttl=0.2, wait=0.0) as mine:
        assert mine
        time.sleep(0.3)  # it expired while held…
        with held(client, key, ttl=5.0, wait=0.0) as theirs:  # … and someone else took it
            assert theirs
            token = client.get(key)
        client.set(key, token, px=5000)  # (their hold, still on)
    assert client.get(key) == token  # the first holder's release left the other's lock alone
    client.delete(key)
    client.close()
