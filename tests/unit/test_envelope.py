"""Identities and signed envelopes: every check of open_envelope, each with its own error."""

from __future__ import annotations

import json
from typing import Any

import pytest

from protocol.envelope import (
    CLOCK_SKEW_SECONDS,
    MAX_BODY_CHARS,
    MAX_TTL_SECONDS,
    PROTOCOL_VERSION,
    Envelope,
    MemoryNonceStore,
    open_envelope,
    seal_envelope,
)
from protocol.errors import (
    AuthenticationError,
    BadSignature,
    IncompatibleProtocol,
    InvalidRequest,
    LimitExceeded,
    MessageExpired,
    ReplayedNonce,
    UnknownSender,
    WrongRecipient,
)
from protocol.identity import Identity, PublicIdentity, _b64

NOW = 1_700_000_000.0
BODY = {"kind": "run", "plan": {"inputs": [{"kind": "dataset", "name": "births"}]}}

ALICE = Identity.generate("alice")
MALLORY = Identity.generate("mallory")
BOB = Identity.generate("bob")
KEYRING = {"alice": ALICE.public, "mallory": MALLORY.public}


def _seal(identity: Identity = ALICE, *, now: float = NOW, recipient: str = "bob",
          body: Any = BODY, ttl: float = 600.0) -> Envelope:
    return seal_envelope(identity, recipient=recipient, kind="run", job_id="job-1",
                         body=body, now=now, ttl=ttl)


def _wire(env: Envelope) -> dict[str, Any]:
    """What the other side receives: the envelope as JSON data."""
    return json.loads(json.dumps(env.model_dump()))


def _open(raw: Any, *, now: float = NOW, delivery_id: str = "d-1",
          nonces: MemoryNonceStore | None = None, recipient: str = "bob",
          keyring: dict[str, PublicIdentity] | None = None) -> Envelope:
    return open_envelope(raw, recipient=recipient, keyring=KEYRING if keyring is None else keyring,
                         nonces=MemoryNonceStore() if nonces is None else nonces,
                         delivery_id=delivery_id, now=now)


def _resign(raw: dict[str, Any], identity: Identity = ALICE, **changes: Any) -> dict[str, Any]:
    """Change fields and sign again, as a sender with the real key would."""
    env = Envelope.model_validate({**raw, **changes, "signature": ""})
    return _wire(env.model_copy(update={"signature": _b64(identity.sign(env.signed_bytes()))}))


# --- identities --------------------------------------------------------------------------

def test_identity_json_round_trip() -> None:
    me = Identity.generate("alice")
    text = me.to_json()
    data = json.loads(text)
    assert data["name"] == "alice"
    assert data["public_key"] == me.public.text()
    back = Identity.from_json(text)
    assert back == me
    assert back.public == me.public
    # the restored identity signs exactly like the original
    assert back.sign(b"hello") == me.sign(b"hello")


def test_generated_identities_differ() -> None:
    a, b = Identity.generate("x"), Identity.generate("x")
    assert a.signing_key != b.signing_key
    assert a.box_secret != b.box_secret
    assert a.public != b.public
    # signing and sealing never share key material
    assert a.public.verify_key != a.public.box_key


@pytest.mark.parametrize("text", ["", "not json", "[]", '"a string"', "null", '{"name": "a"}',
                                  '{"name": "a", "signing_key": "A", "box_secret": "AAAA"}'])
def test_identity_from_json_rejects_garbage(text: str) -> None:
    with pytest.raises(InvalidRequest):
        Identity.from_json(text)


def test_public_identity_text_round_trip() -> None:
    pub = ALICE.public
    text = pub.text()
    assert text.startswith("gridq1:")
    back = PublicIdentity.parse("alice", text)
    assert back == pub
    assert back.text() == text
    assert PublicIdentity.parse("someone-else", text).name == "someone-else"


def test_public_identity_parse_rejects_bad_prefix() -> None:
    body = ALICE.public.text()[len("gridq1:"):]
    for text in (body, "gridq2:" + body, "GRIDQ1:" + body, " " + ALICE.public.text()):
        with pytest.raises(InvalidRequest, match="gridq1:"):
            PublicIdentity.parse("alice", text)


@pytest.mark.parametrize("size", [0, 32, 63, 65, 96])
def test_public_identity_parse_rejects_bad_length(size: int) -> None:
    text = "gridq1:" + _b64(bytes(range(size)))
    with pytest.raises(InvalidRequest, match=str(size)):
        PublicIdentity.parse("alice", text)


@pytest.mark.parametrize("tail", ["***", "abc", "é" * 4, "A" * 85])
def test_public_identity_parse_rejects_bad_base64(tail: str) -> None:
    with pytest.raises(InvalidRequest):
        PublicIdentity.parse("alice", "gridq1:" + tail)


def test_verify_accepts_own_signature_and_rejects_others() -> None:
    sig = ALICE.sign(b"message")
    ALICE.public.verify(b"message", sig)
    with pytest.raises(BadSignature):
        ALICE.public.verify(b"massage", sig)
    with pytest.raises(BadSignature):
        MALLORY.public.verify(b"message", sig)
    with pytest.raises(BadSignature):
        ALICE.public.verify(b"message", sig[:10])


def test_seal_unseal_round_trip() -> None:
    secret = b"\x00tensor bytes\xff" * 100
    sealed = BOB.public.seal(secret)
    assert secret not in sealed
    assert BOB.unseal(sealed) == secret
    # sealing is randomised: the same value seals differently each time
    assert BOB.public.seal(secret) != sealed


def test_unseal_with_another_identity_fails() -> None:
    sealed = BOB.public.seal(b"for bob only")
    with pytest.raises(BadSignature):
        ALICE.unseal(sealed)


def test_unseal_tampered_ciphertext_fails() -> None:
    sealed = bytearray(BOB.public.seal(b"for bob only"))
    sealed[-1] ^= 1
    with pytest.raises(BadSignature):
        BOB.unseal(bytes(sealed))


# --- envelopes: the good path -----------------------------------------------------------

def test_seal_then_open_round_trip() -> None:
    env = _seal()
    assert env.v == PROTOCOL_VERSION
    assert env.sender == "alice" and env.recipient == "bob"
    assert env.issued_at == NOW
    assert env.expires_at == NOW + 600.0
    assert env.signature
    opened = _open(_wire(env))
    assert opened == env
    assert opened.body_json() == BODY


def test_open_accepts_the_envelope_object_itself() -> None:
    env = _seal()
    assert _open(env) == env


def test_fresh_nonce_per_envelope() -> None:
    assert _seal().nonce != _seal().nonce


def test_ttl_is_capped() -> None:
    env = _seal(ttl=10 * MAX_TTL_SECONDS)
    assert env.expires_at - env.issued_at == MAX_TTL_SECONDS
    assert _open(_wire(env), now=NOW + MAX_TTL_SECONDS - 1).job_id == "job-1"


def test_open_within_clock_skew_and_at_expiry() -> None:
    env = _wire(_seal(now=NOW + CLOCK_SKEW_SECONDS - 1))
    _open(env, now=NOW)
    env = _wire(_seal())
    _open(env, now=NOW + 600.0)  # the last valid instant


def test_body_at_the_limit_is_accepted() -> None:
    body = "x" * (MAX_BODY_CHARS - 2)  # JSON adds the two quotes
    env = _seal(body=body)
    assert len(env.body) == MAX_BODY_CHARS
    assert _open(_wire(env)).body_json() == body


def test_body_json_refuses_non_json() -> None:
    env = _seal().model_copy(update={"body": "{not json"})
    with pytest.raises(InvalidRequest) as info:
        env.body_json()
    assert info.value.job_id == "job-1"


def test_minor_version_difference_is_compatible() -> None:
    major = PROTOCOL_VERSION.split(".")[0]
    raw = _resign(_wire(_seal()), v=f"{major}.99")
    assert _open(raw).v == f"{major}.99"


# --- envelopes: each refusal ----------------------------------------------------------------

@pytest.mark.parametrize(
    "field,value",
    [
        ("body", json.dumps({"kind": "run", "plan": "drop everything"})),
        ("kind", "publish"),
        ("job_id", "job-2"),
        ("nonce", "f" * 32),
        ("issued_at", NOW - 1),
        ("expires_at", NOW + 601.0),
        ("v", PROTOCOL_VERSION + ".1"),
    ],
)
def test_tampered_field_is_bad_signature(field: str, value: Any) -> None:
    raw = _wire(_seal())
    assert raw[field] != value
    raw[field] = value
    with pytest.raises(BadSignature) as info:
        _open(raw)
    assert info.value.job_id == raw["job_id"]


def test_tampered_recipient_is_bad_signature_not_wrong_recipient() -> None:
    raw = _wire(_seal(recipient="carol"))
    raw["recipient"] = "bob"
    with pytest.raises(BadSignature):
        _open(raw)


def test_forged_sender_is_bad_signature() -> None:
    raw = _wire(_seal(MALLORY))
    raw["sender"] = "alice"  # mallory pretends to be alice
    with pytest.raises(BadSignature, match="alice"):
        _open(raw)


@pytest.mark.parametrize("signature", ["", "!!!!", "AAAA", "é", "A" * 128])
def test_garbage_signature_is_bad_signature(signature: str) -> None:
    raw = _wire(_seal())
    raw["signature"] = signature
    with pytest.raises(BadSignature):
        _open(raw)


def test_unknown_sender() -> None:
    eve = Identity.generate("eve")
    raw = _wire(_seal(eve))
    with pytest.raises(UnknownSender, match="eve") as info:
        _open(raw)
    assert info.value.job_id == "job-1"
    # once the recipient knows eve's key, the same message is accepted
    assert _open(raw, keyring={**KEYRING, "eve": eve.public}).sender == "eve"
    # but not if another key is registered under eve's name
    with pytest.raises(BadSignature):
        _open(raw, keyring={**KEYRING, "eve": Identity.generate("eve").public})


def test_known_name_with_wrong_key_is_bad_signature() -> None:
    impostor = Identity.generate("alice")  # same name, other key
    with pytest.raises(BadSignature):
        _open(_wire(_seal(impostor)))


def test_expired() -> None:
    raw = _wire(_seal())
    with pytest.raises(MessageExpired) as info:
        _open(raw, now=NOW + 600.0 + 0.5)
    assert info.value.job_id == "job-1"
    with pytest.raises(MessageExpired):
        _open(raw, now=NOW + 10 * MAX_TTL_SECONDS)


def test_ttl_over_the_maximum_is_expired_even_if_signed() -> None:
    raw = _resign(_wire(_seal()), expires_at=NOW + MAX_TTL_SECONDS + 1)
    with pytest.raises(MessageExpired):
        _open(raw)


def test_issued_far_in_the_future() -> None:
    raw = _wire(_seal(now=NOW + CLOCK_SKEW_SECONDS + 5))
    with pytest.raises(MessageExpired, match="future"):
        _open(raw)
    raw = _wire(_seal(now=NOW + 3600))
    with pytest.raises(MessageExpired):
        _open(raw)


def test_replay_under_another_delivery_is_refused() -> None:
    nonces = MemoryNonceStore(clock=lambda: NOW)  # the fixed time of these envelopes
    raw = _wire(_seal())
    assert _open(raw, nonces=nonces, delivery_id="d-1").job_id == "job-1"
    with pytest.raises(ReplayedNonce) as info:
        _open(raw, nonces=nonces, delivery_id="d-2")
    assert info.value.job_id == "job-1"
    # and it stays refused, also later while the envelope is still valid
    with pytest.raises(ReplayedNonce):
        _open(raw, nonces=nonces, delivery_id="d-3", now=NOW + 300)


def test_redelivery_under_the_same_delivery_id_is_accepted() -> None:
    nonces = MemoryNonceStore(clock=lambda: NOW)  # the fixed time of these envelopes
    raw = _wire(_seal())
    first = _open(raw, nonces=nonces, delivery_id="d-1")
    second = _open(raw, nonces=nonces, delivery_id="d-1", now=NOW + 5)
    assert first == second


def test_nonces_are_per_sender_and_per_envelope() -> None:
    nonces = MemoryNonceStore(clock=lambda: NOW)  # the fixed time of these envelopes
    _open(_wire(_seal()), nonces=nonces, delivery_id="d-1")
    _open(_wire(_seal()), nonces=nonces, delivery_id="d-2")  # a fresh envelope, fresh nonce
    # mallory reusing alice's nonce is not alice's replay
    alice_raw = _wire(_seal())
    _open(alice_raw, nonces=nonces, delivery_id="d-3")
    mallory_raw = _resign(_wire(_seal(MALLORY)), MALLORY, nonce=alice_raw["nonce"])
    _open(mallory_raw, nonces=nonces, delivery_id="d-4")


def test_refused_message_does_not_burn_its_nonce() -> None:
    nonces = MemoryNonceStore(clock=lambda: NOW)  # the fixed time of these envelopes
    raw = _wire(_seal(now=NOW + 3600))  # from a fast clock
    with pytest.raises(MessageExpired):
        _open(raw, nonces=nonces, delivery_id="d-1")
    assert _open(raw, nonces=nonces, delivery_id="d-2", now=NOW + 3600).job_id == "job-1"


def test_expired_replay_is_reported_as_expired() -> None:
    nonces = MemoryNonceStore(clock=lambda: NOW)  # the fixed time of these envelopes
    raw = _wire(_seal())
    _open(raw, nonces=nonces, delivery_id="d-1")
    nonces.forget_expired(NOW + 601)
    with pytest.raises(MessageExpired):
        _open(raw, nonces=nonces, delivery_id="d-2", now=NOW + 601)


def test_memory_nonce_store_forget_expired() -> None:
    store = MemoryNonceStore(clock=lambda: 0.0)  # the time of these expiries
    assert store.remember("a", "n1", "d1", expires_at=100.0)
    assert store.remember("a", "n2", "d1", expires_at=200.0)
    assert not store.remember("a", "n1", "d2", expires_at=100.0)
    assert store.remember("a", "n1", "d1", expires_at=100.0)
    store.forget_expired(150.0)
    assert store.remember("a", "n1", "d2", expires_at=300.0)  # forgotten
    assert not store.remember("a", "n2", "d2", expires_at=200.0)  # still remembered


def test_wrong_recipient() -> None:
    raw = _wire(_seal(recipient="carol"))
    with pytest.raises(WrongRecipient) as info:
        _open(raw, recipient="bob")
    assert "carol" in info.value.message and "bob" in info.value.message
    assert info.value.job_id == "job-1"
    assert _open(raw, recipient="carol").recipient == "carol"


def test_incompatible_protocol() -> None:
    raw = _wire(_seal())
    raw["v"] = "2.0"
    with pytest.raises(IncompatibleProtocol) as info:
        _open(raw)
    assert "2.0" in info.value.message
    assert PROTOCOL_VERSION in info.value.message
    assert info.value.job_id == "job-1"


def test_incompatible_protocol_is_checked_before_anything_else() -> None:
    # a future protocol may have other fields; it is told apart before schema or signature
    raw = {"v": "2.0", "job_id": "j-x", "something": "new"}
    with pytest.raises(IncompatibleProtocol) as info:
        _open(raw)
    assert "2.0" in info.value.message and PROTOCOL_VERSION in info.value.message
    assert info.value.job_id == "j-x"
    with pytest.raises(IncompatibleProtocol) as info:
        _open({"v": "0.9"})
    assert info.value.job_id is None


def _without(raw: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in raw.items() if k != key}


MALFORMED = {
    "missing_nonce": lambda r: _without(r, "nonce"),
    "missing_sender": lambda r: _without(r, "sender"),
    "missing_body": lambda r: _without(r, "body"),
    "missing_v": lambda r: _without(r, "v"),
    "issued_at_text": lambda r: {**r, "issued_at": "yesterday"},
    "expires_at_list": lambda r: {**r, "expires_at": [1]},
    "body_dict": lambda r: {**r, "body": {"kind": "run"}},
    "sender_int": lambda r: {**r, "sender": 7},
    "sender_bad_chars": lambda r: {**r, "sender": "alice bob"},
    "sender_too_long": lambda r: {**r, "sender": "a" * 65},
    "nonce_short": lambda r: {**r, "nonce": "abc"},
    "job_id_empty": lambda r: {**r, "job_id": ""},
    "signature_long": lambda r: {**r, "signature": "A" * 129},
    "extra_field": lambda r: {**r, "admin": True},
    "oversize_body": lambda r: {**r, "body": "x" * (MAX_BODY_CHARS + 1)},
    "not_a_dict": lambda r: [r],
    "none": lambda r: None,
    "string": lambda r: json.dumps(r),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_envelope_is_invalid_request(name: str) -> None:
    raw = MALFORMED[name](_wire(_seal()))
    with pytest.raises(InvalidRequest) as info:
        _open(raw)
    assert "malformed envelope" in info.value.message
    assert not isinstance(info.value, AuthenticationError)


def test_seal_refuses_oversize_body() -> None:
    with pytest.raises(LimitExceeded) as info:
        _seal(body="x" * (MAX_BODY_CHARS - 1))  # one character too many once quoted
    assert str(MAX_BODY_CHARS) in info.value.message
    with pytest.raises(LimitExceeded):
        _seal(body=["y" * 1024] * (MAX_BODY_CHARS // 1024))


def test_seal_refuses_a_bad_sender_name() -> None:
    with pytest.raises(ValueError):  # pydantic's ValidationError is a ValueError
        _seal(Identity.generate("not a name"))
