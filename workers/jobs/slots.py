"""Fair shares of a node's worker processes: one requester holds at most ``per_user`` of
them at a time, so with more processes than that, another requester's job always finds
one free however heavy the first one's plans are.

A slot is an exclusive ``flock`` on a file under ``<store>/slots/`` held for the length of
a job. The kernel lets go of it when the process holding it dies (a SIGKILL, the OOM
killer), so no slot outlives its job and nothing needs sweeping. A message whose
requester has no free slot is *deferred*: put back at the far end of the queue
(``workers.tasks``), unopened — its nonce is not spent — behind whatever else waits.

    slots = Slots(store.folder / "slots", per_user=1)
    with slots.take("alice") as held:
        if held: run()  # else: defer
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class Slots:
    def __init__(self, folder: Path, per_user: int) -> None:
        self.folder = Path(folder)
        self.per_user = per_user

    @contextmanager
    def take(self, requester: str) -> Iterator[bool]:
        """Hold one of ``requester``'s slots for the block (True), or none is free (False).
        With ``per_user`` 0 there is no cap: always True."""
        if self.per_user <= 0:
            yield True
            return
        self.folder.mkdir(mode=0o700, exist_ok=True)
        name = hashlib.sha256(requester.encode()).hexdigest()[:24]  # a claimed name: never a path
        for index in range(self.per_user):
            fd = os.open(self.folder / f"{name}.{index}", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            try:
                yield True
            finally:
                os.close(fd)  # closing the file releases the lock
            return
        yield False
