"""The gateway's signed listing of the registered nodes and their keys, posted in Redis
(``GATEWAY_NODES_KEY``) for workers that need a peer's key — an MPC party sealing to
another, a secure-aggregation party checking a node's signature. Reading it is one GET: no
task asks the gateway and waits (a task waiting on another task can stall a pool).

The gateway signs the listing with the key everyone pins (``protocol.pinning``) and posts it
again every few seconds, so a listing is trusted only while it is recent
(``LISTING_MAX_AGE_SECONDS``) and never older than one already read: an old copy put back
by whoever can write the broker cannot bring back a node the operator has since unenrolled.

    >>> from protocol.identity import Identity
    >>> gateway = Identity.generate("gateway")
    >>> posted = sign_listing(gateway, [], now=100.0)
    >>> open_listing(posted, gateway.public, now=101.0).nodes
    []
"""

from __future__ import annotations

import json
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from protocol.envelope import CLOCK_SKEW_SECONDS
from protocol.errors import BadSignature, InvalidRequest, StaleMessage
from protocol.identity import Identity, PublicIdentity
from protocol.messages import NodeInfo

__all__ = ["LISTING_EVERY_SECONDS", "LISTING_MAX_AGE_SECONDS", "NodeListing", "open_listing", "sign_listing"]

LISTING_EVERY_SECONDS = 10.0  # the gateway posts the listing again this often (and at each registration)
LISTING_MAX_AGE_SECONDS = 60.0  # a listing older than this is not trusted: is the gateway running?


class NodeListing(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    issued_at: float
    nodes: Annotated[list[NodeInfo], Field(max_length=10_000)]


class _Posted(BaseModel):
    model_config = ConfigDict(extra="forbid")

    listing: Annotated[str, Field(max_length=8_000_000)]
    signature: Annotated[str, Field(pattern=r"^[0-9a-f]{128}$")]


def sign_listing(gateway: Identity, nodes: list[NodeInfo], now: float) -> str:
    """What the gateway posts: the listing of ``nodes`` as of ``now``, signed."""
    text = NodeListing(issued_at=now, nodes=nodes).model_dump_json()
    return _Posted(listing=text, signature=gateway.sign(_signed_part(text)).hex()).model_dump_json()


def open_listing(posted: str | bytes, gateway: PublicIdentity, now: float, newer_than: float = 0.0,
                 max_age: float = LISTING_MAX_AGE_SECONDS) -> NodeListing:
    """The listing ``posted``, if ``gateway`` signed it, within ``max_age`` of ``now`` and
    issued after ``newer_than`` (the last one the reader accepted)."""
    try:
        outer = _Posted.model_validate_json(posted)
    except ValidationError:
        raise InvalidRequest("the node listing posted on the broker is not the gateway's format") from None
    gateway.verify(_signed_part(outer.listing), bytes.fromhex(outer.signature))  # BadSignature if not
    try:
        listing = NodeListing.model_validate_json(outer.listing)
    except ValidationError:  # signed by the gateway, yet not a listing: a gateway of another version
        raise BadSignature("the gateway signed a node listing this worker cannot read; are both of one "
                           "gridq version?") from None
    if listing.issued_at > now + CLOCK_SKEW_SECONDS:
        raise StaleMessage(f"the node listing is dated {listing.issued_at - now:.0f} s in the future: check the "
                           "clocks of the gateway's and this worker's machines")
    if now - listing.issued_at > max_age:
        raise StaleMessage(f"the gateway's node listing is {now - listing.issued_at:.0f} s old (it is posted every "
                           f"{LISTING_EVERY_SECONDS:g} s): is the gateway running (`gridq gateway start`)?")
    if listing.issued_at < newer_than:
        raise StaleMessage("the node listing on the broker is older than one this worker has read: an old copy "
                           "was put back")
    return listing


def _signed_part(text: str) -> bytes:
    return json.dumps({"gridq": "node-listing", "listing": text}, separators=(",", ":")).encode()
