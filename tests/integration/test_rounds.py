"""Rounds party to party over a real Redis (workers.mpc.rounds): the product is right, nothing of a
round stays in the broker, a forged message is refused, a silent or failing peer ends the
session within its timeout with the peer named."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import torch

from ops.local import LocalGrid
from protocol.contract import mpc_round_channel
from protocol.errors import BadSignature, GridError, NodeUnavailable, PermissionDenied
from protocol.mpc import Dealer, FixedPoint, reconstruct, share
from protocol.mpc.beaver import Open, PartyProtocol, beaver
from protocol.mpc.nonlinear import truncate
from protocol.mpc.wire import round_message, tag_round
from workers.mpc.rounds import PartyEnd, connect

FP = FixedPoint(16)
PARTIES = ["north", "south", "east"]


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with LocalGrid(Path(tmp_path_factory.mktemp("rounds"))) as lg:
        yield lg.start_redis()


def product(i: int, x: torch.Tensor, y: torch.Tensor, m: dict[str, Any]) -> PartyProtocol:
    z = yield from beaver(i, x, y, m["triple"], torch.mul)
    return (yield from truncate(i, z, m["trunc"], FP.frac_bits))


def dealt(n: int, shape: tuple[int, ...]) -> list[dict[str, Any]]:
    dealer = Dealer(n)
    return [{"triple": t.materialize(), "trunc": u.materialize()}
            for t, u in zip(dealer.triple(shape, shape, "mul"), dealer.trunc(shape, FP.frac_bits), strict=True)]


def run_parties(url: str, names: list[str], work: Callable[[int, PartyEnd], torch.Tensor], key: bytes,
                timeout: float = 10.0, session: str | None = None) -> list[torch.Tensor | GridError]:
    """Each party in a thread of its own, with its own connection, as pool processes are."""
    session = session or secrets.token_hex(16)
    out: list[torch.Tensor | GridError] = [GridError("did not run")] * len(names)

    def party(i: int) -> None:
        client = connect(url, timeout)
        try:
            with PartyEnd(client, "host", session, names, names[i], key, timeout) as end:
                try:
                    out[i] = work(i, end)
                except GridError as exc:
                    end.abort(exc)
                    out[i] = exc
        finally:
            client.close()

    threads = [threading.Thread(target=party, args=(i,)) for i in range(len(names))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 30)
    return out


@pytest.mark.parametrize("n", [2, 3])
def test_a_product_through_the_broker_equals_plaintext_and_leaves_nothing_there(url: str, n: int) -> None:
    broker = redis.Redis.from_url(url)
    before = set(broker.keys())
    x, y = torch.randn(1000), torch.randn(1000)
    xs, ys = share(FP.encode(x), n), share(FP.encode(y), n)
    material = dealt(n, (1000,))
    out = run_parties(url, PARTIES[:n], lambda i, end: end.run(product(i, xs[i], ys[i], material[i])),
                      secrets.token_bytes(32))
    assert all(isinstance(o, torch.Tensor) for o in out), out
    assert (FP.decode(reconstruct(out)) - x * y).abs().max() < 1e-3  # type: ignore[arg-type]
    assert set(broker.keys()) == before  # pub/sub: a round is delivered, never stored
    broker.close()


def test_a_forged_round_message_is_refused_not_computed_on(url: str) -> None:
    session, key = secrets.token_hex(16), secrets.token_bytes(32)
    forger = redis.Redis.from_url(url)
    x = share(FP.encode(torch.ones(4)), 2)
    material = dealt(2, (4,))

    def work(i: int, end: PartyEnd) -> torch.Tensor:
        if i == 1:  # before south's first read, someone without the key writes on north's channel to it
            channel = mpc_round_channel("host", session, "north", "south")
            forged = bytes(tag_round(b"x" * 32, f"{channel}:0", round_message({}, {"kind": "hello"})))
            while not forger.publish(channel, forged):
                time.sleep(0.001)
        return end.run(product(i, x[i], x[i], material[i]))

    out = run_parties(url, PARTIES[:2], work, key, timeout=3, session=session)
    assert isinstance(out[1], BadSignature) and "fails its MAC" in out[1].message
    forger.close()


def test_a_peer_that_never_joins_is_named_within_the_timeout(url: str) -> None:
    started = time.monotonic()
    client = connect(url, 1)
    with PartyEnd(client, "host", secrets.token_hex(16), PARTIES[:2], "north", secrets.token_bytes(32), 1.0) as end, \
            pytest.raises(NodeUnavailable, match="party 'south' did not answer the start of the session within 1 s"):
        end.join()
    assert time.monotonic() - started < 3
    client.close()


def test_a_peer_that_stops_tells_the_others_at_once(url: str) -> None:
    def opening() -> PartyProtocol:
        opened = yield Open([torch.zeros(2, dtype=torch.int64)])
        return opened[0]

    def work(i: int, end: PartyEnd) -> torch.Tensor:
        if i == 0:  # north refuses before its first round
            raise PermissionDenied("north will not go on")
        return end.run(opening())  # south waits for north's hello

    started = time.monotonic()
    out = run_parties(url, PARTIES[:2], work, secrets.token_bytes(32), timeout=20)
    assert isinstance(out[1], PermissionDenied) and "party 'north': north will not go on" in out[1].message
    assert time.monotonic() - started < 5  # not the 20 s timeout
