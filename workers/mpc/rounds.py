"""Rounds of an MPC session, party to party through Redis pub/sub.

Each party publishes its parts of a round once to each other party, on a channel named for
the pair (``mpc_round_channel``: the broker's ACLs let a node publish only as itself and
subscribe only to what is sent to it, so the dealer, who knows the masks, never sees a
round), and adds up what the others sent. No relay copies a round through a list, and
nothing of a round is written to the broker's append-only file or left in its memory:
pub/sub is delivered, not stored. The host only starts the session and hears its end
(``workers.mpc.host``).

Each message carries a Poly1305 tag under a one-time key derived from the session's round
key (sealed by the host to each party) and the message's place — channel and number — so
nothing can be injected, replayed or reordered by anyone outside the session. Pub/sub keeps
no backlog: before its first round a party says hello on each of its channels until the
broker reports the peer subscribed. A silent peer is detected by a bounded wait: never a hang.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import redis
import torch
from redis.client import PubSub
from redis.connection import Encoder, PythonRespSerializer

from protocol.contract import mpc_round_channel
from protocol.errors import GridError, JobFailed, NodeUnavailable, error_from_wire
from protocol.mpc.beaver import PartyProtocol, combine_parts
from protocol.mpc.wire import open_round, round_message, tag_round
from protocol.spans import Tally
from workers.broker import redis_client

MAX_ROUNDS = 10_000


def connect(url: str, timeout: float) -> redis.Redis:
    """A Redis client for rounds: blocking pops may wait ``timeout`` seconds (redis-py's
    default 5 s socket timeout would cut them short), and big values go out without the
    copy hiredis' command packer makes (measured: RPUSH of 16 MB 55 → 28 ms)."""
    packer = PythonRespSerializer(6000, Encoder("utf-8", "strict", False).encode)
    return redis_client(url, socket_timeout=timeout + 10, command_packer=packer, socket_read_size=1 << 20)


def pop(client: redis.Redis, key: str, timeout: float) -> bytes | None:
    """The next message on a list, waiting at most ``timeout`` seconds."""
    got = client.blpop([key], timeout=timeout)
    if got is None:
        return None
    value = got[1]
    return value.encode() if isinstance(value, str) else bytes(value)


class PartyEnd:
    """One party's end of ``host``'s ``session`` among ``parties``."""

    def __init__(self, client: redis.Redis, host: str, session: str, parties: list[str], me: str, key: bytes,
                 timeout: float) -> None:
        self.client, self.key, self.timeout, self.me = client, key, timeout, me
        self.peers = [p for p in parties if p != me]
        self.outbox = {p: mpc_round_channel(host, session, me, p) for p in self.peers}
        self.incoming = {p: mpc_round_channel(host, session, p, me) for p in self.peers}
        self.inbox = {channel: p for p, channel in self.incoming.items()}
        self.sent = dict.fromkeys(self.peers, 0)  # messages sent to each peer: 0 is the hello
        self.received = dict.fromkeys(self.peers, 0)  # messages taken from each peer, the hello included
        self.waiting: dict[str, deque[bytes]] = {p: deque() for p in self.peers}  # arrived, not yet read
        self.sub: PubSub | None = None
        self.step = 0

    def __enter__(self) -> PartyEnd:
        self.sub = self.client.pubsub(ignore_subscribe_messages=True)
        self.sub.subscribe(*self.inbox)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.sub is not None:
            self.sub.close()

    def join(self) -> None:
        """Say hello to each peer until it is subscribed, then wait for every peer's hello:
        from here on nothing sent is lost. A peer that stops before it says hello says why."""
        deadline = time.monotonic() + self.timeout
        for peer in self.peers:
            if not self._deliver(peer, {"kind": "hello"}, deadline, listen=True):
                raise NodeUnavailable(f"party {peer!r} did not answer the start of the session within "
                                      f"{self.timeout:g} s")
        for peer in self.peers:
            if not self.received[peer]:
                self._receive(peer, deadline)

    def _deliver(self, peer: str, meta: dict[str, str], deadline: float, listen: bool = False) -> bool:
        """Publish a small first message until the broker counts a receiver (pub/sub keeps no
        backlog for a peer not yet subscribed); ``listen``: meanwhile read the peers' first
        messages (a peer's error is raised: it may have stopped, and will never subscribe)."""
        channel, pause = self.outbox[peer], 0.0005
        message = tag_round(self.key, f"{channel}:0", round_message({}, meta))
        while not self.client.publish(channel, memoryview(message)):
            if time.monotonic() > deadline:
                return False
            if listen:
                self._listen(pause, deadline)
            else:
                time.sleep(pause)
            pause = min(pause * 2, 0.02)
        self.sent[peer] = 1
        return True

    def _listen(self, seconds: float, deadline: float) -> None:
        """Read what arrives within ``seconds``, and take each peer's first message (a hello,
        or the error it stopped with: raised)."""
        self._file(self._next(seconds))
        for peer in self.peers:
            if self.waiting[peer] and not self.received[peer]:
                self._receive(peer, deadline)

    def send(self, meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> None:
        """One message to every peer: framed once, tagged for each peer in place and published
        before the next tag overwrites it (PUBLISH returns once Redis has the whole message)."""
        message = round_message(tensors, meta)
        for peer, channel in self.outbox.items():
            self.client.publish(channel, memoryview(tag_round(self.key, f"{channel}:{self.sent[peer]}", message)))
            self.sent[peer] += 1

    def abort(self, error: GridError) -> None:
        """Tell the peers this party stops, rather than let them wait out their timeout (best
        effort: a peer not subscribed within a second will time out)."""
        meta = {"kind": "error", "code": error.code, "message": error.message[:500]}
        deadline = time.monotonic() + 1.0
        try:
            for peer, channel in self.outbox.items():
                if self.sent[peer]:
                    self.client.publish(channel, memoryview(tag_round(self.key, f"{channel}:{self.sent[peer]}",
                                                                      round_message({}, meta))))
                else:
                    self._deliver(peer, meta, deadline)
        except redis.RedisError:
            pass

    def run(self, protocol: PartyProtocol) -> torch.Tensor:
        """Drive this party's protocol to its end; returns its output share."""
        tally = Tally()
        self.join()
        tally.lap("join: hello to every peer")
        request = next(protocol)
        try:
            for self.step in range(MAX_ROUNDS):
                tally.lap("rounds: compute")
                mine = [request.parts]
                self.send({"kind": "open"}, {str(k): v for k, v in enumerate(request.parts)})
                tally.lap("rounds: pack, tag, publish")
                deadline = time.monotonic() + self.timeout
                for peer in self.peers:
                    tensors, meta = self._receive(peer, deadline, tally)
                    if meta.get("kind") != "open" or len(tensors) != len(request.parts):
                        raise JobFailed(f"party {peer!r} fell out of step at round {self.step}")
                    mine.append([tensors[str(k)] for k in range(len(tensors))])
                opened = combine_parts(mine, request.xor)
                tally.lap("rounds: add up the parts")
                try:
                    request = protocol.send(opened)
                except StopIteration as done:
                    tally.lap("rounds: compute")
                    output: torch.Tensor = done.value
                    return output
            raise JobFailed(f"the protocol did not finish in {MAX_ROUNDS} rounds")
        finally:
            tally.flush()

    def _next(self, seconds: float) -> dict[str, Any] | None:
        assert self.sub is not None, "a PartyEnd is used in a with block"
        return self.sub.get_message(timeout=seconds)

    def _file(self, got: dict[str, Any] | None) -> None:
        """Queue a message under the peer whose channel it came on (anything else is dropped)."""
        if got is not None and got.get("type") == "message":
            sender = self.inbox.get(_text(got["channel"]))
            if sender is not None:
                self.waiting[sender].append(got["data"])

    def _receive(self, peer: str, deadline: float, tally: Tally | None = None
                 ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """``peer``'s next message, checked; a peer's error is raised as its own."""
        queue = self.waiting[peer]
        while not queue:
            left = deadline - time.monotonic()
            if left <= 0:
                what = f"round {self.step}" if self.received[peer] else "the start of the session"
                raise NodeUnavailable(f"party {peer!r} did not answer {what} within {self.timeout:g} s; "
                                      "the computation is abandoned")
            self._file(self._next(left))
        if tally is not None:
            tally.lap("rounds: wait for and read the peers' parts")
        label = f"{self.incoming[peer]}:{self.received[peer]}"
        tensors, meta = open_round(self.key, label, queue.popleft())
        if tally is not None:
            tally.lap("rounds: check tag, unpack")
        self.received[peer] += 1
        if meta.get("kind") == "error":
            raise error_from_wire({"code": meta.get("code", "job_failed"),
                                   "message": f"party {peer!r}: {meta.get('message', '')}"})
        return tensors, meta


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
