"""The MPC pool's wire format: message bodies, and the bytes of tensors, dealer parts and
round messages.

Control messages (serve, store, query, session, deal) travel in signed envelopes like every
other job; anything secret in them (a party's share, its input share, its session key)
is sealed to the one party that may read it. What authorises them — the owner's signed card,
the querier's signed query — is :mod:`protocol.mpc.cards`. Round messages travel party to
party on per-session pub/sub channels (:mod:`workers.mpc.rounds`), authenticated with a
per-session key that the host sealed to each party: a round can be large (16 MB for a
1M-element product), and Poly1305 tags it in 3 ms where an Ed25519 signature would hash it
for 30; it is framed in place (:func:`round_message`), each tensor copied once. What a
round carries is masked (x - a, x + r).
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from typing import Annotated, Literal

import torch
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.poly1305 import Poly1305
from pydantic import Field
from safetensors import SafetensorError
from safetensors.torch import load, save

from protocol.codec import dtype_name, parse_dtype
from protocol.errors import BadSignature, InvalidRequest
from protocol.identity import Identity, PublicIdentity
from protocol.messages import WireError
from protocol.mpc.cards import Key, Name, Names, SignedCard, SignedQuery, _Body
from protocol.mpc.cards import ModelCard as ModelCard  # its home is cards; importers from here still find it
from protocol.mpc.dealer import Part
from protocol.mpc.model import Need

# a sealed box left in Redis by claim-check: bodies stay small, big shares skip base64
Sealed = Annotated[str, Field(max_length=80, pattern=r"^gridq:blob:[A-Za-z0-9_\-]{16,64}$")]
MAC_BYTES = 16  # a Poly1305 tag


class ServeModel(_Body):
    """Model owner → host: serve this model. Each party's share is sealed to that party and
    signed by the owner for this card (:func:`protocol.mpc.cards.share_label`)."""

    kind: Literal["mpc_serve"] = "mpc_serve"
    card: SignedCard
    shares: dict[Name, Sealed]


class StoreShares(_Body):
    """Host → party: keep your share of a served model (sealed to you and signed by its
    owner); the party pins the owner's signed card with it."""

    kind: Literal["mpc_store"] = "mpc_store"
    card: SignedCard
    share: Sealed


class UserKeys(_Body):
    """Model owner → host: the keys this host knows for these users (the queriers the owner
    names without a key of its own for them)."""

    kind: Literal["mpc_keys"] = "mpc_keys"
    names: Annotated[list[Name], Field(min_length=1, max_length=1024)]


class QueryModel(_Body):
    """Client → host: run the model on my input. The query is signed by the querier (it
    travels on to the parties); each input share is sealed to its party and signed for
    this query (:func:`protocol.mpc.cards.input_label`)."""

    kind: Literal["mpc_query"] = "mpc_query"
    query: SignedQuery
    inputs: dict[Name, Sealed]


class RunSession(_Body):
    """Host → party: compute your side of one query, its rounds exchanged with the other
    parties under ``round_key`` (the same for all of them, sealed to each), and answer with
    your output share sealed to the querier. The party checks the session against the card
    it pinned for the query's model, not against the host."""

    kind: Literal["mpc_session"] = "mpc_session"
    session: Annotated[str, Field(min_length=8, max_length=64, pattern=r"^[0-9a-f]+$")]
    query: SignedQuery
    index: Annotated[int, Field(ge=0, lt=16)]
    bundles: Annotated[list[Annotated[str, Field(max_length=64)]], Field(max_length=1024)]
    input: Sealed
    round_key: Sealed
    round_timeout: Annotated[float, Field(gt=0, le=3600)]


class Deal(_Body):
    """Host → crypto provider: deal ``count`` bundles of each need for these parties, into the
    pool lists named by ``pools`` (one per need)."""

    kind: Literal["mpc_deal"] = "mpc_deal"
    parties: Names
    frac_bits: Annotated[int, Field(ge=1, le=30)]
    needs: Annotated[list[Need], Field(max_length=256)]
    pools: Annotated[list[Annotated[str, Field(max_length=256)]], Field(max_length=256)]
    count: Annotated[int, Field(ge=1, le=64)]


class Aggregate(_Body):
    """Scientist → aggregation party: add up your shares of these nodes' updates for one
    round, and send me the sum sealed. A round is added up once, and of two nodes at least:
    a second sum over fewer nodes would give one node's update away by difference."""

    kind: Literal["mpc_aggregate"] = "mpc_aggregate"
    round: Annotated[str, Field(min_length=16, max_length=64, pattern=r"^[0-9a-f]+$")]
    shares: Annotated[dict[Name, Sealed], Field(min_length=2, max_length=1024)]


def aggregation_label(round_id: str, node: str) -> str:
    """What a node's signature on its share binds it to: this round, this node."""
    return f"aggregate:{round_id}:{node}"


def sum_label(round_id: str, party: str) -> str:
    """What an aggregation party's signature on its sum binds it to: this round, this party."""
    return f"aggregate-sum:{round_id}:{party}"


class MpcReply(_Body):
    kind: Literal["mpc_reply"] = "mpc_reply"
    error: WireError | None = None
    outputs: dict[Name, Sealed] = {}  # each party's output share, sealed to the querier and signed by the party
    keys: dict[Name, Key] = {}  # a host's answer to UserKeys


def pack(tensors: dict[str, torch.Tensor], meta: dict[str, str] | None = None) -> bytes:
    return save({k: v.contiguous() for k, v in tensors.items()}, metadata=meta)


def unpack(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of trusted bytes (sealed or MAC-checked before this)."""
    try:
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + header_len])
        return load(data), dict(header.get("__metadata__") or {})
    except (SafetensorError, ValueError, KeyError) as exc:
        raise InvalidRequest(f"not a tensor bundle: {exc}") from None


def pack_part(part: Part) -> bytes:
    tensors = {"seed": torch.frombuffer(bytearray(part.seed), dtype=torch.uint8), **{
        f"fixed/{k}": v for k, v in part.fixed.items()}}
    return pack(tensors, {"shapes": json.dumps({k: list(s) for k, s in part.shapes.items()})})


def unpack_part(data: bytes) -> Part:
    tensors, meta = unpack(data)
    shapes = {k: tuple(int(d) for d in s) for k, s in json.loads(meta.get("shapes", "{}")).items()}
    fixed = {k.removeprefix("fixed/"): v for k, v in tensors.items() if k.startswith("fixed/")}
    return Part(bytes(tensors["seed"].numpy().tobytes()), shapes, fixed)


def _one_time_key(key: bytes, label: str) -> bytes:
    return hashlib.blake2b(label.encode(), key=key, person=b"gridq-mpc-round", digest_size=32).digest()


def round_message(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> bytearray:
    """A round message, untagged: a JSON header (``meta``, each tensor's name, dtype and
    shape), each tensor's bytes at an 8-byte boundary, and room for the tag. One copy of each
    tensor, written in place: a round can be 16 MB, and safetensors' save and the tag's
    concatenation would copy it twice more (8 and 2 ms for 16 MB)."""
    listed = [[name, dtype_name(t.dtype), list(t.shape)] for name, t in tensors.items()]
    header = json.dumps({"meta": meta, "tensors": listed}, separators=(",", ":")).encode()
    starts, end = [], _aligned(8 + len(header))
    for t in tensors.values():
        starts.append(end)
        end = _aligned(end + t.numel() * t.element_size())
    message = bytearray(end + MAC_BYTES)
    message[:8] = len(header).to_bytes(8, "little")
    message[8:8 + len(header)] = header
    for start, t in zip(starts, tensors.values(), strict=True):
        if t.numel():
            torch.frombuffer(message, dtype=t.dtype, count=t.numel(), offset=start).copy_(t.reshape(-1))
    return message


def tag_round(key: bytes, label: str, message: bytearray) -> bytearray:
    """Write ``message``'s Poly1305 tag, under a one-time key derived from the session key and
    ``label`` (the channel and the message's place on it: each key tags one message), into
    its last bytes; the same message tagged again for the next peer overwrites it."""
    body = memoryview(message)[:-MAC_BYTES]
    message[-MAC_BYTES:] = Poly1305.generate_tag(_one_time_key(key, label), body)
    return message


def open_round(key: bytes, label: str, message: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A round message's tensors and meta, once its tag checks. The tensors are read-only
    views of ``message`` (no copy): the rounds only add them up into new ones."""
    view = memoryview(message)
    try:
        Poly1305.verify_tag(_one_time_key(key, label), view[:-MAC_BYTES], bytes(view[-MAC_BYTES:]))
    except (InvalidSignature, ValueError):
        raise BadSignature(f"round message {label} fails its MAC: not from this session's party or host") from None
    try:
        size = int.from_bytes(view[:8], "little")
        header = json.loads(bytes(view[8:8 + size]))
        tensors, start = {}, _aligned(8 + size)
        for name, dtype, shape in header["tensors"]:
            kind, count = parse_dtype(dtype), math.prod(shape)
            if count:
                with warnings.catch_warnings():  # read-only: nothing writes to a received part
                    warnings.filterwarnings("ignore", message="The given buffer is not writable")
                    tensors[str(name)] = torch.frombuffer(view, dtype=kind, count=count, offset=start).view(shape)
            else:
                tensors[str(name)] = torch.empty(shape, dtype=kind)
            start = _aligned(start + count * tensors[str(name)].element_size())
        if start != len(view) - MAC_BYTES:
            raise ValueError("its length does not match its header")
        return tensors, {str(k): str(v) for k, v in header["meta"].items()}
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:  # tagged by a party of the session, yet malformed
        raise InvalidRequest(f"round message {label} is not a round message: {exc}") from None


def _aligned(offset: int) -> int:
    return (offset + 7) // 8 * 8


def _digest(label: str, data: bytes) -> bytes:
    return hashlib.blake2b(label.encode() + b"\0" + data, digest_size=32).digest()


def seal_signed(sender: Identity, recipient: PublicIdentity, label: str, data: bytes) -> bytes:
    """``data`` for ``recipient``'s eyes only, signed by ``sender`` (a sealed box alone does
    not say who sealed it); ``label`` binds it to its place (bundle id and party)."""
    return recipient.seal(sender.sign(_digest(label, data)) + data)


def open_signed(me: Identity, sender: PublicIdentity, label: str, blob: bytes) -> bytes:
    plain = me.unseal(blob)
    signature, data = plain[:64], plain[64:]
    sender.verify(_digest(label, data), signature)
    return data
