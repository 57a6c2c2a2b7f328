"""The gateway's signed node listing (protocol.listing): what a worker reads instead of
asking the gateway and waiting. Only the pinned gateway's, only recent, never older than
one already read."""

from __future__ import annotations

import json

import pytest

from protocol.errors import BadSignature, InvalidRequest, StaleMessage
from protocol.identity import Identity
from protocol.listing import LISTING_MAX_AGE_SECONDS, open_listing, sign_listing
from protocol.messages import NodeInfo

GATEWAY = Identity.generate("gateway")
HOSPITAL = NodeInfo(node="hospital", public_key=Identity.generate("hospital").public.text(), queue="node.hospital",
                    last_seen=1.0)


def test_the_gateways_listing_opens_with_its_key() -> None:
    posted = sign_listing(GATEWAY, [HOSPITAL], now=1000.0)
    listing = open_listing(posted, GATEWAY.public, now=1001.0)
    assert listing.nodes == [HOSPITAL] and listing.issued_at == 1000.0


def test_a_listing_signed_by_another_key_is_refused() -> None:
    forged = sign_listing(Identity.generate("gateway"), [HOSPITAL], now=1000.0)
    with pytest.raises(BadSignature):
        open_listing(forged, GATEWAY.public, now=1001.0)


def test_a_changed_listing_is_refused() -> None:
    posted = json.loads(sign_listing(GATEWAY, [HOSPITAL], now=1000.0))
    rogue = Identity.generate("hospital").public.text()
    posted["listing"] = posted["listing"].replace(HOSPITAL.public_key, rogue)
    with pytest.raises(BadSignature):
        open_listing(json.dumps(posted), GATEWAY.public, now=1001.0)


def test_an_old_listing_is_refused_and_says_what_to_check() -> None:
    posted = sign_listing(GATEWAY, [HOSPITAL], now=1000.0)
    with pytest.raises(StaleMessage, match="is the gateway running"):
        open_listing(posted, GATEWAY.public, now=1000.0 + LISTING_MAX_AGE_SECONDS + 1)
    with pytest.raises(StaleMessage, match="clocks"):
        open_listing(posted, GATEWAY.public, now=0.0)


def test_a_listing_older_than_one_already_read_is_refused() -> None:
    """An old copy put back on the broker (one that still lists a node unenrolled since)."""
    old = sign_listing(GATEWAY, [HOSPITAL], now=1000.0)
    new = sign_listing(GATEWAY, [], now=1010.0)
    read = open_listing(new, GATEWAY.public, now=1011.0)
    with pytest.raises(StaleMessage, match="older than one"):
        open_listing(old, GATEWAY.public, now=1011.0, newer_than=read.issued_at)
    assert open_listing(new, GATEWAY.public, now=1012.0, newer_than=read.issued_at).nodes == []  # the same again


@pytest.mark.parametrize("junk", ["", "null", "{}", '{"listing": "x", "signature": "zz"}', "[1, 2]"])
def test_junk_where_the_listing_should_be_is_a_typed_error(junk: str) -> None:
    with pytest.raises(InvalidRequest, match="not the gateway's format"):
        open_listing(junk, GATEWAY.public, now=1.0)
