"""A participant's pinned gateway keys, as ssh's ``known_hosts``: ``$GRIDQ_HOME/known_gateways``,
one line per broker, ``host:port/db gridq1:…`` (the rules are ``protocol.pinning``'s).

``Grid.connect`` pins the key a broker posts on first contact and refuses a changed one;
``gridq trust-gateway`` replaces a pin once its operator has announced a rotation. The file
is the owner's only (0600, in a 0700 folder): anyone who could edit it could pin their own
gateway. Writers take a lock and replace the file whole, so concurrent first contacts from
several processes keep one pin and a reader never sees half a file.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from protocol.contract import gridq_home
from protocol.errors import InvalidRequest

KNOWN_GATEWAYS = "known_gateways"
HEADER = ("# gridq: the gateway key pinned for each broker (host:port/db) on first contact.\n"
          "# `gridq trust-gateway URL` replaces one when the gateway's operator rotates its key.\n")


class KnownGateways:
    """The pins in one file (default ``$GRIDQ_HOME/known_gateways``): a ``GatewayPins``."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path if path is not None else gridq_home() / KNOWN_GATEWAYS

    @property
    def where(self) -> str:
        return str(self.path)

    def pinned_gateway(self, address: str) -> str | None:
        return self.read().get(address)

    def pin_gateway(self, address: str, key: str, *, replace: bool = False) -> str:
        """Pin ``key`` for ``address`` if none is (or, with ``replace``, whatever is); the key
        pinned now."""
        with self._locked():
            pins = self.read()
            if replace or address not in pins:
                pins[address] = key
                self._write(pins)
            return pins[address]

    def read(self) -> dict[str, str]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise self._unusable("read", exc) from None
        pins: dict[str, str] = {}
        for number, line in enumerate(text.splitlines(), 1):
            fields = line.split()
            if not fields or fields[0].startswith("#"):
                continue
            if len(fields) != 2:
                raise InvalidRequest(f"{self.path}, line {number}, is not 'host:port/db gridq1:…'; fix or delete "
                                     "that line (the next connection pins the broker's key again)")
            pins[fields[0]] = fields[1]
        return pins

    @contextmanager
    def _locked(self) -> Iterator[None]:
        folder = self.path.parent
        try:
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            if folder.stat().st_uid == os.getuid():
                folder.chmod(0o700)
            fd = os.open(folder / f".{self.path.name}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise self._unusable("write", exc) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _write(self, pins: dict[str, str]) -> None:
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        text = HEADER + "".join(f"{address} {key}\n" for address, key in sorted(pins.items()))
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, self.path)
        except OSError as exc:
            temporary.unlink(missing_ok=True)
            raise self._unusable("write", exc) from None

    def _unusable(self, doing: str, exc: OSError) -> InvalidRequest:
        return InvalidRequest(f"cannot {doing} the pinned gateway keys in {self.path}: {exc.strerror}. Set "
                              "GRIDQ_HOME to a folder of yours, or pin the key yourself: "
                              "Grid.connect(..., gateway_key=\"gridq1:…\")")
