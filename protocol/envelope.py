"""Signed envelopes: every job, registration and reply that crosses the broker is one.

An envelope names its protocol version, sender, recipient, kind and job id, carries a
fresh nonce, an issue time and an expiry, and a body (JSON text, parsed only after the
signature checks out). The Ed25519 signature covers every other field.

Verification (:func:`open_envelope`) rejects, each with its own error type: an
incompatible protocol version, an unknown sender, a bad signature, a wrong recipient, an
expired message and a replayed nonce. A replay is a nonce seen before under *another*
delivery: a broker redelivering the same message (``acks_late``) is not an attack, and the
job's idempotency makes the second delivery harmless.
"""

from __future__ import annotations

import heapq
import json
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Annotated, Any, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from protocol.errors import (
    BadSignature,
    IncompatibleProtocol,
    InvalidRequest,
    LimitExceeded,
    MessageExpired,
    MisdirectedReply,
    ReplayedNonce,
    UnknownSender,
    WrongRecipient,
)
from protocol.identity import Identity, PublicIdentity, _b64, _unb64

PROTOCOL_VERSION = "1.0"
MAX_BODY_CHARS = 2 * 1024 * 1024
MAX_TTL_SECONDS = 24 * 3600.0
CLOCK_SKEW_SECONDS = 60.0

Name = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")]


class Envelope(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    v: Annotated[str, Field(max_length=16)]
    sender: Name
    recipient: Name
    kind: Annotated[str, Field(max_length=64)]
    job_id: Annotated[str, Field(min_length=1, max_length=80)]
    nonce: Annotated[str, Field(min_length=16, max_length=64)]
    issued_at: float
    expires_at: float
    body: Annotated[str, Field(max_length=MAX_BODY_CHARS)]
    signature: Annotated[str, Field(max_length=128)] = ""

    def signed_bytes(self) -> bytes:
        fields = self.model_dump(exclude={"signature"})
        return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()

    def body_json(self) -> Any:
        try:
            return json.loads(self.body)
        except (ValueError, RecursionError) as exc:
            raise InvalidRequest(f"envelope body is not JSON: {exc}", job_id=self.job_id) from None


class NonceStore(Protocol):
    """Remembers nonces until their envelope expires."""

    def remember(self, sender: str, nonce: str, delivery_id: str, expires_at: float) -> bool:
        """True if the nonce is new, or was seen before under this same delivery id."""
        ...


class MemoryNonceStore:
    """A process-local nonce store, for clients, tests and single-process workers.

    A nonce is kept until its envelope expires, then forgotten: an expired envelope is
    refused before its nonce is looked at (:func:`open_envelope`), so it can never be
    replayed. Each :meth:`remember` forgets what has expired by then (oldest first, from a
    heap: a few operations each, whatever the store holds), so a long-lived client holds
    the nonces of the last envelope lifetime only, not one per reply it ever read.
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._seen: dict[tuple[str, str], tuple[str, float]] = {}
        self._expiry: list[tuple[float, str, str]] = []  # a heap of (expires_at, sender, nonce)

    def __len__(self) -> int:
        return len(self._seen)

    def remember(self, sender: str, nonce: str, delivery_id: str, expires_at: float) -> bool:
        self.forget_expired(self._clock())
        seen = self._seen.get((sender, nonce))
        if seen is not None:
            return seen[0] == delivery_id
        self._seen[(sender, nonce)] = (delivery_id, expires_at)
        heapq.heappush(self._expiry, (expires_at, sender, nonce))
        return True

    def forget_expired(self, now: float) -> None:
        """Forget the nonces of envelopes that expired before ``now``."""
        while self._expiry and self._expiry[0][0] < now:
            _, sender, nonce = heapq.heappop(self._expiry)
            self._seen.pop((sender, nonce), None)


def seal_envelope(
    identity: Identity,
    *,
    recipient: str,
    kind: str,
    job_id: str,
    body: Any,
    now: float,
    ttl: float = 600.0,
) -> Envelope:
    """Build and sign an envelope from ``identity`` to ``recipient``."""
    text = json.dumps(body, separators=(",", ":"))
    if len(text) > MAX_BODY_CHARS:
        raise LimitExceeded(f"message body of {len(text)} characters exceeds {MAX_BODY_CHARS}")
    unsigned = Envelope(
        v=PROTOCOL_VERSION,
        sender=identity.name,
        recipient=recipient,
        kind=kind,
        job_id=job_id,
        nonce=secrets.token_hex(16),
        issued_at=now,
        expires_at=now + min(ttl, MAX_TTL_SECONDS),
        body=text,
    )
    return unsigned.model_copy(update={"signature": _b64(identity.sign(unsigned.signed_bytes()))})


def _major(version: str) -> str:
    return version.split(".", 1)[0]


def open_envelope(
    raw: Any,
    *,
    recipient: str,
    keyring: Mapping[str, PublicIdentity],
    nonces: NonceStore,
    delivery_id: str,
    now: float,
    job_id: str | None = None,
) -> Envelope:
    """Verify an envelope as received from the wire and return it, or raise why not.
    ``job_id``: the job the reader asked about; a reply signed for another job is refused
    before its nonce is remembered (the genuine reply can still be read where it belongs)."""
    env = _signed(raw, keyring, recipient)
    if env.recipient != recipient:
        raise WrongRecipient(
            f"message is addressed to {env.recipient!r}, not {recipient!r}", job_id=env.job_id
        )
    _fresh(env, now)
    if job_id is not None and env.job_id != job_id:
        raise MisdirectedReply(f"the answer stored for job {job_id} is {env.sender!r}'s signed answer to job "
                               f"{env.job_id}: refused (something with access to the broker moved it)",
                               job_id=job_id)
    if not nonces.remember(env.sender, env.nonce, delivery_id, env.expires_at):
        raise ReplayedNonce(
            f"nonce {env.nonce[:8]}… of {env.sender!r} was already used", job_id=env.job_id
        )
    return env


def verify_envelope(raw: Any, *, keyring: Mapping[str, PublicIdentity], now: float, verifier: str) -> Envelope:
    """What anyone holding the sender's public key can check of an envelope, without being
    its recipient: protocol version, form, a sender in ``keyring``, the signature, expiry and
    issue time (within the clock skew). A relay that forwards envelopes it cannot open (the
    HTTP edge, ``verifier``) checks this; the nonce is the caller's to remember (then the
    recipient checks everything again, with :func:`open_envelope`)."""
    env = _signed(raw, keyring, verifier)
    _fresh(env, now)
    return env


def _signed(raw: Any, keyring: Mapping[str, PublicIdentity], reader: str) -> Envelope:
    """``raw`` parsed as an envelope of this protocol's major version, from a sender in
    ``keyring``, whose signature checks out."""
    if isinstance(raw, dict) and "v" in raw and _major(str(raw["v"])) != _major(PROTOCOL_VERSION):
        raise IncompatibleProtocol(
            f"message speaks protocol {raw['v']!s:.16}, this side speaks {PROTOCOL_VERSION}",
            job_id=str(raw.get("job_id", ""))[:80] or None,
        )
    try:
        env = Envelope.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "envelope"
        raise InvalidRequest(f"malformed envelope: {where}: {first['msg']}") from None
    sender = keyring.get(env.sender)
    if sender is None:
        raise UnknownSender(
            f"{env.sender!r} is not a known user of {reader!r}; the owner must add its "
            "public key to the node config", job_id=env.job_id,
        )
    try:
        signature = _unb64(env.signature)
    except ValueError:
        signature = b""
    try:
        sender.verify(env.signed_bytes(), signature)
    except BadSignature as exc:
        raise BadSignature(exc.message, job_id=env.job_id) from None
    return env


def _fresh(env: Envelope, now: float) -> None:
    """Refuse an envelope that has expired (or claims a lifetime over the maximum), or is
    issued further in the future than the clock skew allows."""
    if env.expires_at < now or env.expires_at - env.issued_at > MAX_TTL_SECONDS:
        raise MessageExpired(
            f"message expired {now - env.expires_at:.1f} s ago; send the job again",
            job_id=env.job_id,
        )
    if env.issued_at > now + CLOCK_SKEW_SECONDS:
        raise MessageExpired(
            f"message is issued {env.issued_at - now:.0f} s in the future; check the clocks",
            job_id=env.job_id,
        )
