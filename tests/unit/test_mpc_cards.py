"""The owner's signed card and the querier's signed query (protocol.mpc.cards): what a party
checks a session against. Pure: the rogue messages of the integration tests rest on these."""

from __future__ import annotations

import time

import pytest

from protocol.errors import BadSignature, InvalidRequest, MessageExpired, PermissionDenied
from protocol.identity import Identity
from protocol.mpc.cards import (
    QUERY_TTL_SECONDS,
    ModelCard,
    Query,
    SignedCard,
    SignedQuery,
    check_roles,
    input_label,
    share_label,
)
from protocol.mpc.model import Layer, ModelPlan
from protocol.mpc.wire import open_signed, seal_signed

DANA, BOB, EVE, HOSPITAL = (Identity.generate(n) for n in ("dana", "bob", "eve", "hospital"))
PLAN = ModelPlan(layers=(Layer(kind="linear", in_features=4, out_features=2),))


def card(**changes: object) -> ModelCard:
    fields = {"name": "risk", "owner": "dana", "owner_key": DANA.public.text(), "host": "company",
              "parties": ["hospital", "public"], "provider": "university",
              "queriers": {"bob": BOB.public.text()}, "plan": PLAN, "issued_at": 1000.0}
    return ModelCard.model_validate({**fields, **changes})


def query(c: ModelCard, who: Identity = BOB, **changes: object) -> Query:
    fields = {"querier": who.name, "owner": c.owner, "model": c.name, "card": c.digest(), "batch": 1,
              "id": "a" * 32, "issued_at": time.time()}
    return Query.model_validate({**fields, **changes})


def test_a_signed_card_verifies_and_any_change_breaks_it() -> None:
    signed = SignedCard.sign(DANA, card())
    assert signed.verify() == card()
    assert signed.verify(DANA.public) == card()
    for change in ({"host": "rogue"}, {"provider": "rogue"}, {"parties": ["hospital", "rogue"]},
                   {"queriers": {"bob": EVE.public.text()}}, {"issued_at": 1001.0}):
        forged = SignedCard(card=card(**change), signature=signed.signature)
        with pytest.raises(BadSignature):
            forged.verify()


def test_a_card_under_the_owners_name_with_another_key_is_not_the_owners() -> None:
    impostor = Identity("dana", EVE.signing_key, EVE.box_secret)  # eve's keys, dana's name
    forged = SignedCard.sign(impostor, card(owner_key=impostor.public.text()))
    assert forged.verify().owner == "dana"  # self-consistent …
    with pytest.raises(PermissionDenied, match="other than the one known here"):
        forged.verify(DANA.public)  # … but not with the key a party or client knows for dana
    with pytest.raises(InvalidRequest, match="cannot sign a card"):
        SignedCard.sign(EVE, card())  # nobody signs a card that names another owner key


def test_a_query_is_for_one_card_one_querier_and_a_short_time() -> None:
    c = card()
    assert SignedQuery.sign(BOB, query(c)).verify(c, time.time()) == BOB.public
    assert SignedQuery.sign(DANA, query(c, DANA)).verify(c, time.time()) == DANA.public  # the owner may
    newer = card(issued_at=2000.0)
    with pytest.raises(PermissionDenied, match="another version"):
        SignedQuery.sign(BOB, query(c)).verify(newer, time.time())
    with pytest.raises(PermissionDenied, match="not dana/other"):
        SignedQuery.sign(BOB, query(c)).verify(card(name="other"), time.time())
    with pytest.raises(PermissionDenied, match="'eve' may not query model 'risk'"):
        SignedQuery.sign(EVE, query(c, EVE)).verify(c, time.time())
    impostor = Identity("bob", EVE.signing_key, EVE.box_secret)
    with pytest.raises(BadSignature):
        SignedQuery.sign(impostor, query(c)).verify(c, time.time())  # the card's key for bob decides
    old = query(c, issued_at=time.time() - QUERY_TTL_SECONDS - 5)
    with pytest.raises(MessageExpired):
        SignedQuery.sign(BOB, old).verify(c, time.time())
    signed = SignedQuery.sign(BOB, query(c))
    with pytest.raises(BadSignature):
        SignedQuery(query=signed.query.model_copy(update={"batch": 9}), signature=signed.signature).verify(
            c, time.time())


def test_shares_and_inputs_open_only_for_their_card_query_and_party() -> None:
    c = card()
    blob = seal_signed(DANA, HOSPITAL.public, share_label(c, "hospital"), b"share")
    assert open_signed(HOSPITAL, DANA.public, share_label(c, "hospital"), blob) == b"share"
    with pytest.raises(BadSignature):
        open_signed(HOSPITAL, DANA.public, share_label(card(issued_at=5.0), "hospital"), blob)
    with pytest.raises(BadSignature):
        open_signed(HOSPITAL, EVE.public, share_label(c, "hospital"), blob)  # signed by dana, not eve
    x = seal_signed(BOB, HOSPITAL.public, input_label("a" * 32, "hospital"), b"x")
    with pytest.raises(BadSignature):  # a copied input share, fed to another query
        open_signed(HOSPITAL, BOB.public, input_label("b" * 32, "hospital"), x)


def test_host_parties_and_provider_are_distinct() -> None:
    check_roles(card())
    with pytest.raises(InvalidRequest, match="cannot also be the host"):
        check_roles(card(provider="company"))
    with pytest.raises(InvalidRequest, match="cannot also hold shares: it could unmask"):
        check_roles(card(provider="hospital"))
    with pytest.raises(InvalidRequest, match="host 'company' cannot also hold shares"):
        check_roles(card(parties=["company", "public"]))
    with pytest.raises(InvalidRequest, match="2 distinct parties"):
        check_roles(card(parties=["hospital", "hospital"]))
