"""Data never in the broker: record every command Redis receives during the use case
(MONITOR) and look for the private values in it — raw, and inside every JSON, base64 and
msgpack layer that Celery and kombu wrap around payloads. A positive control checks that
the search does find a value that is leaked on purpose."""

from __future__ import annotations

import base64
import binascii
import json
import socket
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
import torch
from safetensors.torch import save

from ops.local import LocalGrid
from protocol.errors import PermissionDenied

PROBE_QUEUE = "capture.probe"


class Monitor:
    """A raw MONITOR connection that collects every command's arguments as bytes."""

    def __init__(self, url: str) -> None:
        host, port = url.split("//")[1].split("/")[0].split(":")
        self.sock = socket.create_connection((host, int(port)))
        self.sock.sendall(b"MONITOR\r\n")
        self.commands: list[list[bytes]] = []
        self._buf = b""
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = self.sock.recv(1 << 20)
            except OSError:
                return
            if not chunk:
                return
            self._buf += chunk
            *lines, self._buf = self._buf.split(b"\r\n")
            for line in lines:
                if line.startswith(b"+") and b'"' in line:
                    self.commands.append(_args(line))

    def wait_for(self, needle: bytes, verb: bytes | None = None, timeout: float = 10.0) -> None:
        """MONITOR lines arrive a little after the commands: wait until ``needle`` is seen (in
        a command ``verb``, e.g. LPUSH: a queue's name shows in kombu's bindings and in task
        events before the message itself is pushed)."""
        deadline = time.monotonic() + timeout
        while not any(needle in arg for command in list(self.commands) for arg in command
                      if verb is None or (command and command[0].upper() == verb)):
            assert time.monotonic() < deadline, f"MONITOR never showed {needle!r}"
            time.sleep(0.05)

    def stop(self) -> list[list[bytes]]:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._thread.join(timeout=5)
        return self.commands


def _args(line: bytes) -> list[bytes]:
    """Undo redis' sdscatrepr quoting of each argument of a MONITOR line."""
    out, i, n = [], line.index(b'"'), len(line)
    escapes = {ord("n"): b"\n", ord("r"): b"\r", ord("t"): b"\t", ord("a"): b"\a", ord("b"): b"\b"}
    while i < n:
        if line[i] != ord('"'):
            i += 1
            continue
        i += 1
        arg = bytearray()
        while line[i] != ord('"'):
            if line[i] == ord("\\"):
                nxt = line[i + 1]
                if nxt == ord("x"):
                    arg.append(int(line[i + 2:i + 4], 16))
                    i += 4
                    continue
                arg += escapes.get(nxt, bytes([nxt]))
                i += 2
                continue
            arg.append(line[i])
            i += 1
        out.append(bytes(arg))
        i += 1
    return out


def layers(blob: bytes, depth: int = 0) -> Iterator[bytes]:
    """The blob, and every payload nested in it as JSON, base64 or msgpack."""
    yield blob
    if depth > 6 or len(blob) < 8:
        return
    for decoded in _decodings(blob):
        for value in _walk(decoded):
            yield from layers(value, depth + 1)


def _decodings(blob: bytes) -> Iterator[Any]:
    try:
        yield json.loads(blob)
    except (ValueError, UnicodeDecodeError):
        pass
    try:
        yield base64.b64decode(blob, validate=True)
    except (binascii.Error, ValueError):
        pass
    try:
        yield msgpack.unpackb(blob, raw=False, strict_map_key=False)
    except Exception:  # noqa: BLE001 - not msgpack is the common case
        pass


def _walk(obj: Any) -> Iterator[bytes]:
    if isinstance(obj, bytes):
        yield obj
    elif isinstance(obj, str):
        yield obj.encode()
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _walk(v)
    elif isinstance(obj, list | tuple):
        for v in obj:
            yield from _walk(v)


def private_patterns(table: torch.Tensor, csv_text: str) -> list[bytes]:
    rows = [encoding for row in table for encoding in binary(row)]  # ≥ 8 bytes: negligible chance hits
    lines = [line.encode() for line in csv_text.splitlines()[1:] if line]
    return rows + lines


def binary(values: torch.Tensor) -> set[bytes]:
    """The values' bytes as the node stores them (a CSV's table is float64) and as float32,
    which a cast on the way out would make them."""
    return {values.contiguous().numpy().tobytes(), struct.pack(f"<{values.numel()}f", *map(float, values))}


def found_in(commands: list[list[bytes]], patterns: list[bytes]) -> list[bytes]:
    hits = set()
    for command in commands:
        for arg in command:
            for layer in layers(arg):
                hits.update(p for p in patterns if p in layer)
    return sorted(hits)


def test_private_values_never_cross_the_broker(local_grid: LocalGrid, births_feb, hospital_admin):
    csv_text = (local_grid.home / "data" / "hospital_births_feb.csv").read_text()
    big = torch.rand(100_000, 2) * 10  # large enough to be released by claim-check
    hospital_admin.publish("capture-big", big, tags=["#capture"], allowed_users=["alice"])
    monitor = Monitor(local_grid.url)
    try:
        with local_grid.connect("carol") as grid:
            births = grid.search("#birth-records", "#february")["hospital"][0]
            with pytest.raises(PermissionDenied):
                births.get()
            means = births.mean(dim=0).submit().result()
            with pytest.raises(PermissionDenied):
                means.get()
        with local_grid.connect("alice") as grid:
            births = grid.search("#birth-records", "#february")["hospital"][0]
            released = {
                "weight": births["weight"].mean().get(), "height": births["height"].mean().get(),
                "sums": births.sum(dim=0).submit().result().get(),
                "table": births.get(),  # the whole table crosses the broker, sealed to alice
            }
            assert torch.equal(released["table"], births_feb)
            big_ptr = grid.search("#capture")["hospital"][0]
            assert torch.equal(big_ptr.get(), big)  # by claim-check
            # positive control: the same search must find a value leaked on purpose
            grid.app.send_task("capture.leak", args=[save({"t": births_feb[:3]})], queue=PROBE_QUEUE)
            monitor.wait_for(PROBE_QUEUE.encode(), verb=b"LPUSH")
    finally:
        commands = monitor.stop()
    probe = [c for c in commands if any(PROBE_QUEUE.encode() in a for a in c)]
    rest = [c for c in commands if c not in probe]
    assert len(rest) > 100, "the capture saw the use case's traffic"
    assert any(b"gridq.node.run_job" in layer for c in rest for a in c for layer in layers(a))
    patterns = private_patterns(births_feb, csv_text) + private_patterns(big[:2000], "")
    # (no 4-byte patterns: ~1 MB of ciphertext would match one by chance with p ≈ 2e-4)
    patterns += [repr(released[k].item()).encode() for k in ("weight", "height")]
    patterns += sorted(binary(released["sums"]))
    assert found_in(probe, patterns), "the positive control must find the leaked rows"
    assert found_in(rest, patterns) == []
