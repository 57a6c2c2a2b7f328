"""Other nodes' public keys, from the listing the gateway posts on the broker, signed
(``protocol.listing``) by the gateway whose key was posted when this worker first read it,
pinned on first contact (``protocol.pinning``): a key posted later by whoever can write the
broker is refused, not trusted. Nodes use the directory to seal to each other (MPC parties,
secure-aggregation parties) and to verify each other's messages. Reading it is a GET: a
task never asks the gateway and waits."""

from __future__ import annotations

import time

import redis

from protocol.contract import GATEWAY, GATEWAY_IDENTITY_KEY, GATEWAY_NODES_KEY
from protocol.errors import NodeUnavailable, UnknownSender
from protocol.identity import PublicIdentity
from protocol.listing import LISTING_MAX_AGE_SECONDS, open_listing
from protocol.pinning import GatewayPins, MemoryPins, broker_address, posted_gateway_key, trust_on_first_use


class Directory:
    def __init__(self, broker_url: str, client: redis.Redis, pins: GatewayPins | None = None,
                 accept: str = "restart this worker (it pins the key posted then)") -> None:
        """``client``: connected to the broker at ``broker_url`` (whose address keys the pin).
        ``pins``: where the gateway key is pinned (the node's store; without one, this
        process's memory). ``accept``: how a rotated key is accepted there."""
        self.address = broker_address(broker_url)
        self.redis = client
        self.pins: GatewayPins = pins if pins is not None else MemoryPins()
        self.accept = accept
        self._keys: dict[str, PublicIdentity] = {}
        self._read_at = 0.0  # the date of the newest listing read: an older one is refused

    def key(self, node: str) -> PublicIdentity:
        """``node``'s key; reads the listing again for a node not seen before."""
        if node not in self._keys:
            self.refresh()
        if node not in self._keys:
            raise UnknownSender(f"{node!r} is not a node registered at the gateway")
        return self._keys[node]

    def refresh(self) -> None:
        posted, listed = self.redis.mget([GATEWAY_IDENTITY_KEY, GATEWAY_NODES_KEY])
        if posted is None:
            raise NodeUnavailable("no gateway has started on this broker (it posts its key there)")
        if listed is None:
            raise NodeUnavailable(f"the gateway has not posted its node listing in the last "
                                  f"{LISTING_MAX_AGE_SECONDS:g} s: is `gridq gateway start` running?")
        key = trust_on_first_use(self.pins, self.address, posted_gateway_key(posted, self.address),
                                 accept=self.accept)
        listing = open_listing(listed, PublicIdentity.parse(GATEWAY, key), now=time.time(), newer_than=self._read_at)
        self._read_at = listing.issued_at
        # the listing as it is: a node unenrolled since the last read is no longer known
        self._keys = {n.node: PublicIdentity.parse(n.node, n.public_key) for n in listing.nodes}
