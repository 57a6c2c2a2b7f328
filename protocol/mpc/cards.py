"""Who decides what MPC nodes do with a served model: its owner, through a signed card.

A served model's card names its owner and the owner's key, its host, its parties, its
crypto provider, who may query it (each querier with the key the owner trusts for them)
and its structure; the owner signs it, and signs each party's share bound to it
(:func:`share_label`). Parties pin the card when they store their share, under
``(owner, name)``, and replace it only with a newer card signed by the same key. Every
session is checked against the pinned card — never against what the sender says — so a
node that is not the card's host, or a card the owner did not sign, runs nothing.

A querier signs each query (:class:`Query`: which owner's model, which card, which batch,
a fresh id), and signs each input share bound to that query's id (:func:`input_label`):
a share copied into another session does not open, and a query runs once per party.

Nothing here does I/O; the checks that need a store (pins, seen query ids) are the
workers'.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from protocol.errors import InvalidRequest, MessageExpired, PermissionDenied
from protocol.identity import Identity, PublicIdentity
from protocol.mpc.model import ModelPlan

Name = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")]
Names = Annotated[list[Name], Field(min_length=1, max_length=16)]
Key = Annotated[str, Field(max_length=128, pattern=r"^gridq1:[A-Za-z0-9_\-=]+$")]  # PublicIdentity.text()
Hex = Annotated[str, Field(max_length=128, pattern=r"^[0-9a-f]+$")]
Digest = Annotated[str, Field(min_length=64, max_length=64, pattern=r"^[0-9a-f]+$")]

QUERY_TTL_SECONDS = 600.0  # a signed query older than this is refused (its id is remembered this long)
CLOCK_SKEW_SECONDS = 60.0  # how far ahead of a node's clock a querier's may be


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def canonical(model: BaseModel) -> bytes:
    """The bytes a signature covers: sorted keys, no spaces, so every side derives the same."""
    return json.dumps(model.model_dump(mode="json"), sort_keys=True, separators=(",", ":")).encode()


class ModelCard(_Body):
    """What the grid knows of a served model — no number of it — as its owner signed it."""

    name: Name
    owner: Name
    owner_key: Key
    host: Name
    parties: Names
    provider: Name
    queriers: Annotated[dict[Name, Key], Field(max_length=1024)] = {}  # who may query, with their keys
    plan: ModelPlan
    issued_at: Annotated[float, Field(ge=0)] = 0.0  # the owner's clock: a newer card replaces an older one

    @property
    def qualified(self) -> str:
        """How the grid names it: model names are per owner."""
        return f"{self.owner}/{self.name}"

    def owner_identity(self) -> PublicIdentity:
        return PublicIdentity.parse(self.owner, self.owner_key)

    def key_of(self, user: str) -> PublicIdentity | None:
        """The key the owner trusts for ``user`` to query, or None if they may not."""
        if user == self.owner:
            return self.owner_identity()
        text = self.queriers.get(user)
        return None if text is None else PublicIdentity.parse(user, text)

    def digest(self) -> str:
        return hashlib.blake2b(b"gridq-mpc-card\0" + canonical(self), digest_size=32).hexdigest()


class SignedCard(_Body):
    """A card with its owner's signature (over :meth:`ModelCard.digest`)."""

    card: ModelCard
    signature: Hex

    @classmethod
    def sign(cls, owner: Identity, card: ModelCard) -> SignedCard:
        if owner.public.text() != card.owner_key or owner.name != card.owner:
            raise InvalidRequest(f"{owner.name!r} cannot sign a card that names {card.owner!r} and another key as "
                                 "its owner")
        return cls(card=card, signature=owner.sign(card.digest().encode()).hex())

    def verify(self, trusted: PublicIdentity | None = None) -> ModelCard:
        """The card, if its owner's key signed it (BadSignature otherwise); and if the caller
        knows the owner's key (``trusted``), only if the card carries that key."""
        card = self.card
        if trusted is not None and trusted.text() != card.owner_key:
            raise PermissionDenied(f"the card of {card.qualified!r} carries a key for {card.owner!r} other than the "
                                   "one known here: it is not the owner's card")
        try:
            signature = bytes.fromhex(self.signature)
        except ValueError:
            raise InvalidRequest(f"the signature on the card of {card.qualified!r} is not hex") from None
        card.owner_identity().verify(card.digest().encode(), signature)
        return card


class Query(_Body):
    """What a querier signs to run one query: the card it saw, its batch, a fresh id."""

    querier: Name
    owner: Name
    model: Name
    card: Digest  # ModelCard.digest() of the card the querier listed
    batch: Annotated[int, Field(ge=1, le=1 << 16)]
    id: Annotated[str, Field(min_length=32, max_length=32, pattern=r"^[0-9a-f]+$")]
    issued_at: Annotated[float, Field(ge=0)]

    def digest(self) -> bytes:
        return hashlib.blake2b(b"gridq-mpc-query\0" + canonical(self), digest_size=32).digest()


class SignedQuery(_Body):
    query: Query
    signature: Hex

    @classmethod
    def sign(cls, querier: Identity, query: Query) -> SignedQuery:
        return cls(query=query, signature=querier.sign(query.digest()).hex())

    def verify(self, card: ModelCard, now: float) -> PublicIdentity:
        """The querier's key, if the query is for ``card`` (this very version), from a querier
        the owner allows, signed by the key the owner gave them, and fresh."""
        q = self.query
        if (q.owner, q.model) != (card.owner, card.name):
            raise PermissionDenied(f"the query is for model {q.owner}/{q.model}, not {card.qualified}")
        if q.card != card.digest():
            raise PermissionDenied(f"the query was made for another version of {card.qualified!r} than the one "
                                   "its owner signed last; list the models again and repeat the query")
        key = card.key_of(q.querier)
        if key is None:
            raise PermissionDenied(f"{q.querier!r} may not query model {card.name!r}; its owner {card.owner!r} "
                                   f"lets {sorted(card.queriers)} query it")
        try:
            signature = bytes.fromhex(self.signature)
        except ValueError:
            raise InvalidRequest("the signature on the query is not hex") from None
        key.verify(q.digest(), signature)
        if not now - QUERY_TTL_SECONDS <= q.issued_at <= now + CLOCK_SKEW_SECONDS:
            raise MessageExpired(f"the query {q.id} was issued at {q.issued_at:.0f}, outside the "
                                 f"{QUERY_TTL_SECONDS:g} s a query is valid; send it again")
        return key


def share_label(card: ModelCard, party: str) -> str:
    """What the owner's signature on a party's share binds it to: this card, this party."""
    return f"mpc-share:{card.digest()}:{party}"


def input_label(query_id: str, party: str) -> str:
    """What the querier's signature on an input share binds it to: this query, this party."""
    return f"mpc-input:{query_id}:{party}"


def output_label(query_id: str, party: str) -> str:
    """What a party's signature on its output share binds it to: this query, this party (a
    value sealed to the querier alone could have been sealed by anyone who can write a blob)."""
    return f"mpc-output:{query_id}:{party}"


def check_roles(card: ModelCard) -> None:
    """Host, parties and provider are distinct nodes: a dealer that is also a party, or the
    host, could unmask what it dealt for. A host that is also a party is refused too: each
    role on a node of its own (the separate pools of ``workers.mpc`` would let it run)."""
    if len(set(card.parties)) != len(card.parties) or len(card.parties) < 2:
        raise InvalidRequest(f"a model is shared among at least 2 distinct parties, not {card.parties}")
    if card.provider in card.parties:
        raise InvalidRequest(f"the crypto provider {card.provider!r} cannot also hold shares: it could unmask them")
    if card.provider == card.host:
        raise InvalidRequest(f"the crypto provider {card.provider!r} cannot also be the host: it would see the "
                             "masked values it dealt the masks of")
    if card.host in card.parties:
        raise InvalidRequest(f"the host {card.host!r} cannot also hold shares; choose another node as host")
