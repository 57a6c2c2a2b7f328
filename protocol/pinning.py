"""Trust on first use for the gateway's key, as ssh's ``known_hosts``.

The gateway posts its public key in Redis (``GATEWAY_IDENTITY_KEY``) and everyone who
reads it then trusts whatever the gateway signs: search results, and the node keys that
nodes seal to each other with. Whoever can write that one Redis key (a stolen gateway
broker credential) could post their own and answer as the gateway. So the first key read
from a broker is pinned, keyed by the broker's address, and a different one later is
refused with :class:`GatewayKeyChanged`, which names where the pin is kept and the command
that accepts a rotation.

The rules live here, pure, with what both sides need of a broker URL (its address, its
password-free form); where a pin is kept is the caller's (a participant's
``$GRIDQ_HOME/known_gateways``, ``orchestrator.known_gateways``; a node's own database,
``workers.storage.store``), behind :class:`GatewayPins`.

    >>> from protocol.identity import Identity
    >>> pins = MemoryPins()
    >>> key = Identity.generate("gateway").public.text()
    >>> trust_on_first_use(pins, "127.0.0.1:6379/0", key, accept="`gridq trust-gateway URL`") == key
    True
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Protocol
from urllib.parse import unquote, urlsplit

from protocol.broker import parse_broker
from protocol.broker import shown as broker_shown
from protocol.contract import GATEWAY, GATEWAY_IDENTITY_KEY
from protocol.errors import GatewayKeyChanged, GridError, InvalidRequest
from protocol.identity import PublicIdentity

__all__ = ["GatewayPins", "MemoryPins", "broker_address", "fingerprint", "posted_gateway_key", "shown",
           "trust_on_first_use"]


class GatewayPins(Protocol):
    """Where gateway keys are pinned, one per broker address."""

    @property
    def where(self) -> str:
        """What a person is told to look at: a file, a node's database."""
        ...

    def pinned_gateway(self, address: str) -> str | None:
        """The key pinned for ``address``, if any."""
        ...

    def pin_gateway(self, address: str, key: str) -> str:
        """Pin ``key`` for ``address`` unless one is pinned already; the key pinned now
        (another process's, if it pinned first)."""
        ...


class MemoryPins:
    """Pins for this process's life only: for a process that has nowhere to keep them."""

    where = "this process's memory (it pins again when it restarts)"

    def __init__(self) -> None:
        self._pins: dict[str, str] = {}

    def pinned_gateway(self, address: str) -> str | None:
        return self._pins.get(address)

    def pin_gateway(self, address: str, key: str) -> str:
        return self._pins.setdefault(address, key)


def broker_address(url: str) -> str:
    """What a pin is keyed by: the broker's ``host:port/db`` (``unix:PATH/db`` for a socket;
    ``sentinel:GROUP@HOST:PORT,…/db`` for Sentinel), without user or password — every broker
    user of one Redis reads the same gateway key."""
    broker = parse_broker(url)
    if broker.scheme == "unix":
        return f"unix:{unquote(urlsplit(url).path)}/{broker.db}"
    where = sorted(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in broker.hosts)
    if broker.master is not None:
        return f"sentinel:{broker.master}@{','.join(where)}/{broker.db}"
    return f"{where[0]}/{broker.db}"


def shown(url: str) -> str:
    """The URL without its passwords (broker URLs carry ACL credentials), for messages."""
    return broker_shown(url)


def fingerprint(key: str) -> str:
    """A key's short form for people to compare (as ssh prints them): SHA256:<base64>."""
    digest = hashlib.sha256(key.encode("ascii", "replace")).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def posted_gateway_key(posted: bytes | str, address: str) -> str:
    """The public key in what the gateway posts at ``GATEWAY_IDENTITY_KEY``
    (``{"name": "gateway", "public_key": "gridq1:…"}``), checked to be a key."""
    try:
        text = json.loads(posted)["public_key"]
        return PublicIdentity.parse(GATEWAY, text).text()
    except (ValueError, KeyError, TypeError, GridError):
        raise InvalidRequest(f"what {address} holds at {GATEWAY_IDENTITY_KEY} is not a gateway's public key; is "
                             "a gridq gateway running on this broker?") from None


def trust_on_first_use(pins: GatewayPins, address: str, posted: str, *, accept: str) -> str:
    """The gateway key to trust on ``address``: ``posted``, pinned now if none was, and
    :class:`GatewayKeyChanged` if another one is pinned. ``accept`` says how to pin a new
    key (the error ends with it: a command, in backticks)."""
    pinned = pins.pinned_gateway(address)
    if pinned is None:
        pinned = pins.pin_gateway(address, posted)
    if pinned != posted:
        raise GatewayKeyChanged(
            f"the gateway key posted on the broker {address} ({fingerprint(posted)}) is not the one pinned for it "
            f"in {pins.where} ({fingerprint(pinned)}). Either someone who can write the broker is posing as the "
            f"gateway, or its operator rotated the key. Ask the operator for the new key's fingerprint; only if "
            f"it is {fingerprint(posted)}, accept it: {accept}")
    return pinned
