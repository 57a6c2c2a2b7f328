"""MPC sessions are authorised end to end (issue 15, part 8): a node gone rogue — enrolled at
the gateway with its own key, running its own `gridq mpc start` (it hosts carol's models) —
sends the other MPC workers what a patched worker would. The owner's signed card, pinned by
each party with its shares, decides: the rogue is refused (a) as host, dealer or outsider of
another's model, (b) with a querier's input share copied into its own session, (c) when it
replaces shares or a card the owner did not sign, and (d) clients do not take its listing of
someone else's model. On real Redis and real MPC workers."""

from __future__ import annotations

import json
import secrets
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import torch

from ops.keys import read_identity
from ops.local import LocalGrid
from orchestrator import mpc
from orchestrator.grid import Grid
from protocol.contract import MPC_MODELS_KEY, Tasks, mpc_ack_key, mpc_session_key
from protocol.envelope import seal_envelope
from protocol.errors import (
    BadSignature,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    ReplayedNonce,
    StaleMessage,
    error_from_wire,
)
from protocol.identity import Identity
from protocol.mpc.cards import ModelCard, SignedCard, SignedQuery
from protocol.mpc.ring import FixedPoint
from protocol.mpc.sharing import share
from protocol.mpc.wire import MpcReply, RunSession, StoreShares

ROGUE_CONFIG = """
# a node of the MPC pool that went rogue: it hosts carol's models, and sends what it likes
[node]
id = "rogue"
broker = "${GRIDQ_BROKER}"
store = "${GRIDQ_HOME}/rogue"
identity = "${GRIDQ_HOME}/keys/rogue.key"

[users.carol]
public_key_file = "${GRIDQ_HOME}/keys/carol.pub"
[users.bob]
public_key_file = "${GRIDQ_HOME}/keys/bob.pub"

[mpc]
round_timeout = 10.0
"""


@pytest.fixture(scope="module")
def pool(demo_mpc_pool: LocalGrid) -> Iterator[LocalGrid]:
    """The demo MPC pool (tests/conftest.py), and the rogue's own MPC worker."""
    demo_mpc_pool.ensure_keys("dana", "bob", "carol", "mallory")
    config = demo_mpc_pool.home / "rogue.toml"
    config.write_text(ROGUE_CONFIG)
    demo_mpc_pool.start_mpc(config)  # enrols and registers "rogue" with its own key, like any pool node
    demo_mpc_pool.wait_ready(["rogue"], timeout=90, workers=["rogue-mpc"])
    yield demo_mpc_pool
    demo_mpc_pool.kill("rogue-mpc")


@pytest.fixture()
def rogue(pool: LocalGrid) -> Iterator[Grid]:
    """The rogue node's own key, talking to the pool's workers directly."""
    with pool.connect("rogue", role="node-rogue") as grid:
        yield grid


def run_session(rogue: Grid, party: str, body: RunSession | StoreShares) -> MpcReply:
    """Hand ``party`` a session as a host does (pushed on its session list, not a Celery task)
    and read its signed answer from the rogue's ack list; its typed error if it refused."""
    job_id = uuid.uuid4().hex
    envelope = seal_envelope(rogue.transport.identity, recipient=party, kind=body.kind, job_id=job_id,
                             body=body.model_dump(mode="json"), now=time.time(), ttl=30)
    broker = redis.Redis.from_url(rogue.transport.url)  # as the rogue node's broker user
    try:
        broker.rpush(mpc_session_key(party), json.dumps(envelope.model_dump(mode="json")))
        got = broker.blpop([mpc_ack_key("rogue", party, job_id)], timeout=30)
    finally:
        broker.close()
    assert got is not None, f"{party} did not answer the session"
    answer = rogue.transport.verify(json.loads(got[1]), party, job_id)
    reply = MpcReply.model_validate(answer.body_json())
    if reply.error is not None:
        raise error_from_wire(reply.error.model_dump())
    return reply


def key(lg: LocalGrid, name: str) -> Identity:
    return read_identity(lg.keys / f"{name}.key")


def linear(scale: float) -> torch.nn.Linear:
    model = torch.nn.Linear(4, 2)
    with torch.no_grad():
        model.weight.copy_(scale * torch.tensor([[0.5, -1.25, 2.0, 0.1], [-0.3, 0.7, 0.05, -2.5]]))
        model.bias.copy_(scale * torch.tensor([0.25, -0.5]))
    return model


DANA_MODEL, CAROL_MODEL, ROGUE_MODEL = linear(1.0), linear(-3.0), linear(7.0)
X = torch.tensor([1.0, 2.0, -0.5, 3.0])


def params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return mpc.plan_of(model)[1]


def serve(lg: LocalGrid, owner: str, name: str, model: torch.nn.Module, host: str = "company") -> ModelCard:
    with lg.connect(owner) as grid:
        return grid.serve(model, name=name, parties=["hospital", "public"], crypto_provider="university", host=host,
                          queriers=["bob"])


def forged_card(lg: LocalGrid, base: ModelCard, signer: Identity, **changes: object) -> SignedCard:
    """``base`` changed as the rogue likes, signed by ``signer`` (whose key it then carries)."""
    fields = {**base.model_dump(), "owner_key": signer.public.text(), "issued_at": time.time(), **changes}
    return SignedCard.sign(signer, ModelCard.model_validate(fields))


def alike(y: torch.Tensor, model: torch.nn.Module) -> bool:
    with torch.no_grad():
        return bool((y - model(X)).abs().max().item() < 1e-3)


# --- (a) a session that is not the pinned card's host's is refused, before anything opens ---------


def test_a_session_from_a_node_other_than_the_cards_host_is_refused(pool: LocalGrid, rogue: Grid) -> None:
    """Today's attack: the rogue names itself host and provider of dana's model in a card of
    its own and has a party run it. Now the party reads the card it pinned, not the sender's:
    whether the rogue is an outsider or the very dealer of the model, it runs nothing."""
    card = serve(pool, "dana", "risk-a", DANA_MODEL)
    with pool.connect("dana") as owner:  # the same model, dealt by the rogue this time
        dealt = owner.serve(DANA_MODEL, name="risk-a-dealt", parties=["hospital", "public"], crypto_provider="rogue",
                            host="company", queriers=["bob"])
    with pool.connect("bob") as bob:  # a genuine query of bob's, which the rogue got hold of
        for target in (card, dealt):
            signed, inputs = mpc.signed_query(bob, target, share(FixedPoint(16).encode(X.reshape(1, 4)), 2))
            session = secrets.token_hex(16)
            round_key = rogue.transport.leave(rogue.transport.node_key("hospital").seal(b"k" * 32))
            with pytest.raises(PermissionDenied, match=f"'rogue' is not the host of model 'dana/{target.name}': "
                                                       "the card its owner signed, pinned at 'hospital', names "
                                                       "'company'"):
                run_session(rogue, "hospital", RunSession(
                    session=session, query=signed, index=0, bundles=[], input=inputs["hospital"],
                    round_key=round_key, round_timeout=5))
            broker = redis.Redis.from_url(pool.url)
            assert broker.exists(inputs["hospital"]) == 1, "the party took bob's input share"
            assert broker.exists(round_key) == 1, "the party opened the session's round key"
            broker.close()
    with pool.connect("bob") as bob:  # and the model still answers bob through its host
        assert alike(bob.query("dana/risk-a", X), DANA_MODEL)


def test_a_card_whose_provider_is_its_host_or_a_party_is_refused_by_the_parties(pool: LocalGrid, rogue: Grid
                                                                                ) -> None:
    """The rogue serves a model of its own (it knows every weight) with itself as host and as
    crypto provider — or with a party as provider: the dealer could unmask what it dealt for.
    The parties check the roles themselves; they do not rely on an honest host to."""
    base = serve(pool, "carol", "own", ROGUE_MODEL, host="rogue")
    for provider, reason in (("rogue", "cannot also be the host"), ("public", "cannot also hold shares")):
        card = forged_card(pool, base, key(pool, "carol"), name="unmask", provider=provider)
        shares = mpc.sealed_shares(rogue, key(pool, "carol"), card.card, params(ROGUE_MODEL))
        with pytest.raises(InvalidRequest, match=reason):
            mpc.ask(rogue, "hospital", Tasks.MPC_STORE, StoreShares(card=card, share=shares["hospital"]))


def test_a_party_s_session_list_takes_sessions_only_and_goes_on_after_junk(pool: LocalGrid, rogue: Grid) -> None:
    """Any node may push on a party's session list (a host must): what is not a signed
    session is refused or dropped there, and the party goes on serving queries."""
    serve(pool, "dana", "risk-list", DANA_MODEL)
    broker = redis.Redis.from_url(rogue.transport.url)
    for junk in (b"not json", b"[1, 2]", b"{" * 100, json.dumps({"kind": "mpc_session"}).encode()):
        broker.rpush(mpc_session_key("hospital"), junk)
    broker.close()
    card = forged_card(pool, serve(pool, "carol", "list-store", ROGUE_MODEL, host="rogue"), key(pool, "carol"))
    with pytest.raises(InvalidRequest, match="does not take 'mpc_store' messages here; it takes mpc_session"):
        run_session(rogue, "hospital", StoreShares(card=card, share="gridq:blob:" + "0" * 32))  # a store, not a session
    with pool.connect("bob") as bob:  # and queries still run
        assert alike(bob.query("dana/risk-list", X), DANA_MODEL)


# --- (b) a session carries the querier's signed query; an input share is bound to it -------------


def test_a_copied_input_share_does_not_open_in_another_session(pool: LocalGrid, rogue: Grid) -> None:
    """Today's attack: the rogue feeds bob's input share for public into a session of its own
    model (identity weights it knows) and gets public's share of bob's input back: with its
    own, bob's input. Now the session must carry a query signed by a querier of the rogue's
    model, and bob's share opens only for bob's query."""
    serve(pool, "dana", "risk-b", DANA_MODEL)
    trap = serve(pool, "carol", "trap", ROGUE_MODEL, host="rogue")  # pinned at hospital and public, host rogue
    with pool.connect("bob") as bob:
        card = mpc.find(bob, "dana/risk-b")
        bobs, inputs = mpc.signed_query(bob, card, share(FixedPoint(16).encode(X.reshape(1, 4)), 2))
    with pool.connect("carol") as carol:  # a query of the rogue's own model, with the copied share
        zeros = [torch.zeros(1, 4, dtype=torch.int64)] * 2
        own, _ = mpc.signed_query(carol, mpc.find(carol, "carol/trap"), zeros)
        again, agains = mpc.signed_query(carol, mpc.find(carol, "carol/trap"), zeros)

    def session(query: SignedQuery, index: int = 1, given: str | None = None) -> RunSession:
        dummies = ["0" * 32] * len(trap.plan.material_needed(1))  # as many bundle ids as the model takes
        return RunSession(session=secrets.token_hex(16), query=query, index=index, bundles=dummies,
                          input=given or inputs["public"], round_key=rogue.transport.leave(
                              rogue.transport.node_key("public").seal(b"k" * 32)), round_timeout=5)

    with pytest.raises(BadSignature, match="does not match the key of 'carol'"):
        run_session(rogue, "public", session(own))  # bob's share, under carol's query
    with pytest.raises(PermissionDenied, match="'rogue' is not the host of model 'dana/risk-b'"):
        run_session(rogue, "public", session(bobs))  # bob's query too: it is for dana's model
    relabelled = bobs.query.model_copy(update={"owner": "carol", "model": "trap", "card": trap.digest()})
    with pytest.raises(BadSignature, match="does not match the key of 'bob'"):  # bob signed another query
        run_session(rogue, "public", session(bobs.model_copy(update={"query": relabelled})))
    # and a query, even a genuine one with its own input, runs once at a party: no second look at its input
    with pytest.raises(NotFound, match="bundle"):  # it ran (up to the rogue's made-up dealer bundles)
        run_session(rogue, "public", session(again, given=agains["public"]))
    for query in (again, own):  # own, too: it was spent when bob's share was refused under it
        with pytest.raises(ReplayedNonce, match="ran at 'public' already: a query runs once"):
            run_session(rogue, "public", session(query, given=agains["public"]))


# --- (c) shares are the owner's: an overwrite she did not sign is refused -------------------------


def test_shares_and_cards_the_owner_did_not_sign_do_not_replace_hers(pool: LocalGrid, rogue: Grid) -> None:
    """Today's attack: a host stores shares of its own under another owner's model name, and
    the next query of her model runs on its weights. Now a party keeps shares by (owner,
    model), pinned to the owner's key, and takes only shares she signed for her card."""
    card = serve(pool, "dana", "risk-c", DANA_MODEL)
    dana = key(pool, "dana")
    impostor = Identity("dana", key(pool, "mallory").signing_key, key(pool, "mallory").box_secret)
    # 1. a card under dana's name with another key, naming the rogue as host
    fake = forged_card(pool, card, impostor, host="rogue")
    shares = mpc.sealed_shares(rogue, impostor, fake.card, params(ROGUE_MODEL))
    with pytest.raises(PermissionDenied, match="pinned at 'hospital' to another key of 'dana'"):
        mpc.ask(rogue, "hospital", Tasks.MPC_STORE, StoreShares(card=fake, share=shares["hospital"]))
    # 2. dana's own signed card (say she once chose the rogue as host), with shares the rogue made
    hers = forged_card(pool, card, dana, name="risk-c2", host="rogue")
    shares = mpc.sealed_shares(rogue, key(pool, "rogue"), hers.card, params(ROGUE_MODEL))
    with pytest.raises(BadSignature, match="does not match the key of 'dana'"):
        mpc.ask(rogue, "hospital", Tasks.MPC_STORE, StoreShares(card=hers, share=shares["hospital"]))
    # 3. an old card of dana's comes back after she moved her model to another host
    old = forged_card(pool, card, dana, name="moved", host="rogue")
    kept = {}
    broker = redis.Redis.from_url(pool.url)
    for party, blob in mpc.sealed_shares(rogue, dana, old.card, params(DANA_MODEL)).items():
        kept[party] = broker.get(blob)  # what dana sent through the rogue then: it kept a copy of each blob
        mpc.ask(rogue, party, Tasks.MPC_STORE, StoreShares(card=old, share=blob))
    broker.close()
    serve(pool, "dana", "moved", DANA_MODEL)  # newer: the parties re-pin it, host company
    again = rogue.transport.leave(kept["hospital"] or b"")
    with pytest.raises(StaleMessage, match="an older card cannot come back"):
        mpc.ask(rogue, "hospital", Tasks.MPC_STORE, StoreShares(card=old, share=again))
    with pool.connect("bob") as bob:  # what dana served answers, nothing the rogue sent
        assert alike(bob.query("dana/risk-c", X), DANA_MODEL)
        assert alike(bob.query("dana/moved", X), DANA_MODEL)


# --- (d) the listing: clients take an owner's model only as the owner signed it --------------------


def test_a_host_cannot_pass_off_another_owners_model_in_the_listing(pool: LocalGrid, rogue: Grid,
                                                                    monkeypatch: pytest.MonkeyPatch,
                                                                    tmp_path: Path) -> None:
    """Today's attack: the rogue host overwrites the grid-wide listing entry of dana's model
    with carol's card (signed by itself) and bob's query of dana's model gets carol's answer.
    Now names are per owner, a card is listed only with its owner's signature, and a client
    that knows dana's key takes no card under her name that another key signed."""
    serve(pool, "dana", "risk-d", DANA_MODEL)
    carols = serve(pool, "carol", "risk-d", CAROL_MODEL, host="rogue")
    monkeypatch.setenv("GRIDQ_HOME", str(tmp_path))  # bob's own home: the owner keys he was handed
    (tmp_path / "trusted").mkdir()
    shutil.copy(pool.keys / "dana.pub", tmp_path / "trusted" / "dana.pub")
    with pool.connect("bob") as bob:
        with pytest.raises(InvalidRequest, match="2 owners serve a model 'risk-d'; name the one you mean"):
            bob.query("risk-d", X)
        assert alike(bob.query("dana/risk-d", X), DANA_MODEL)
        assert alike(bob.query("carol/risk-d", X), CAROL_MODEL)
    broker = redis.Redis.from_url(pool.url)
    entries = {k.decode(): v for k, v in broker.hgetall(MPC_MODELS_KEY).items()}
    # the rogue, with its broker rights, lists carol's card — and then its own card under dana's name — as dana's
    impostor = Identity("dana", key(pool, "mallory").signing_key, key(pool, "mallory").box_secret)
    forged = forged_card(pool, carols, impostor, owner="dana")
    for posted in (entries["carol/risk-d"], _listed(key(pool, "rogue"), forged)):
        broker.hset(MPC_MODELS_KEY, "dana/risk-d", posted)
        with pool.connect("bob") as bob:
            listed = [(c.owner, c.owner_key) for c in bob.models() if c.name == "risk-d"]
            assert ("dana", impostor.public.text()) not in listed
            with pytest.raises(NotFound, match="no served model 'dana/risk-d'"):
                bob.query("dana/risk-d", X)  # refused: never carol's answer, nor the rogue's
    broker.close()
    serve(pool, "dana", "risk-d", DANA_MODEL)  # dana serves again: her entry is back
    with pool.connect("bob") as bob:
        assert alike(bob.query("dana/risk-d", X), DANA_MODEL)


def _listed(host: Identity, signed: SignedCard) -> str:
    """A listing entry as a host writes it (workers.mpc.host.Host._post): the card, countersigned."""
    import json

    text = json.dumps(signed.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return json.dumps({"card": text, "signature": host.sign(text.encode()).hex()})
