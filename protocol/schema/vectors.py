"""Test vectors for a second implementation of the wire (``vectors.json``), built from fixed
inputs with the code's own pieces, so they are the same bytes every time.

Where the code takes randomness itself, the vector is built from the same lower-level
pieces with that input fixed, and says so in its description:

* an envelope's nonce (``seal_envelope`` draws it): the envelope is built and signed as
  ``seal_envelope`` does, with a fixed nonce and time (a unit test checks that
  ``seal_envelope`` gives the same envelope when its nonce is that one);
* a sealed box's ephemeral key (libsodium's ``crypto_box_seal`` draws it): the box is built
  by :func:`seal_with_ephemeral`, libsodium's construction with that key fixed, and the unit
  tests open it with :meth:`Identity.unseal` — so the construction is libsodium's;
* MPC seeds: the PRG's seeds are fixed.

Ed25519 signatures are deterministic and need no such care.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterator
from typing import Any

import torch
from nacl.bindings import crypto_box_easy, crypto_scalarmult_base

from protocol.codec import encode_tensor
from protocol.envelope import MAX_TTL_SECONDS, PROTOCOL_VERSION, Envelope
from protocol.identity import Identity, _b64
from protocol.listing import NodeListing, _Posted, _signed_part
from protocol.messages import AccessRequest, NodeInfo, RunJob, SealedMetrics, SealedValue, TrainMetrics
from protocol.mpc.cards import ModelCard, Query, SignedCard, SignedQuery, canonical, input_label
from protocol.mpc.model import Layer, ModelPlan
from protocol.mpc.ring import FixedPoint, expand
from protocol.mpc.sharing import share_seeded
from protocol.mpc.wire import _digest, pack
from protocol.pinning import fingerprint
from protocol.plan import InputRef, Plan, Ref, Step
from protocol.schema.generate import GENERATED

RING = 1 << 64


def fixed_identity(name: str, first_byte: int) -> Identity:
    """An identity whose keys are 64 consecutive byte values: the Ed25519 seed is bytes
    ``first_byte … first_byte+31``, the X25519 secret the next 32."""
    return Identity(name, bytes(range(first_byte, first_byte + 32)), bytes(range(first_byte + 32, first_byte + 64)))


ALICE = fixed_identity("alice", 0)  # a data scientist
HOSPITAL = fixed_identity("hospital", 64)  # a node, and a model's owner
PARTY_A = fixed_identity("party-a", 128)  # an MPC party
GATEWAY = fixed_identity("gateway", 192)
ISSUED_AT = 1_700_000_000.0  # 2023-11-14T22:13:20Z


def ephemeral_secret(label: str) -> bytes:
    """A fixed X25519 ephemeral secret for one vector's sealed box (a real sender draws one)."""
    return hashlib.sha256(f"gridq test vector ephemeral key: {label}".encode()).digest()


def seal_with_ephemeral(ephemeral: bytes, recipient_box_key: bytes, plaintext: bytes) -> bytes:
    """libsodium's ``crypto_box_seal`` with its ephemeral secret given rather than drawn:
    ``epk ‖ crypto_box_easy(m, nonce, recipient_pk, esk)`` where ``epk = X25519(esk)`` and
    ``nonce = BLAKE2b-192(epk ‖ recipient_pk)``."""
    ephemeral_public = crypto_scalarmult_base(ephemeral)
    nonce = hashlib.blake2b(ephemeral_public + recipient_box_key, digest_size=24).digest()
    return bytes(ephemeral_public) + bytes(crypto_box_easy(plaintext, nonce, recipient_box_key, ephemeral))


def _b64std(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _ring_text(values: torch.Tensor) -> list[str]:
    """int64 ring elements as decimal strings: a JSON number loses digits past 2^53 in JavaScript."""
    return [str(int(v)) for v in values.flatten().tolist()]


def _unsigned_text(values: torch.Tensor) -> list[str]:
    """The same elements as their representatives in [0, 2^64)."""
    return [str(int(v) % RING) for v in values.flatten().tolist()]


def key_vector(identity: Identity) -> dict[str, Any]:
    public = identity.public
    return {
        "description": f"The identity {identity.name!r} from fixed keys. Ed25519: the 32-byte seed is the secret "
                       "key (libsodium crypto_sign_seed_keypair). X25519: the 32-byte secret (crypto_scalarmult_base "
                       "gives the public key). public_key = 'gridq1:' + base64url-with-padding(verify_key ‖ "
                       "box_public); key_file is the text of its secret key file (NAME.key); fingerprint = "
                       "'SHA256:' + unpadded standard base64 of SHA-256(public_key as ASCII).",
        "name": identity.name,
        "signing_seed_hex": identity.signing_key.hex(),
        "verify_key_hex": public.verify_key.hex(),
        "box_secret_hex": identity.box_secret.hex(),
        "box_public_hex": public.box_key.hex(),
        "public_key": public.text(),
        "fingerprint": fingerprint(public.text()),
        "key_file": identity.to_json(),
    }


def signed_envelope(identity: Identity, *, recipient: str, kind: str, job_id: str, body_text: str, nonce: str,
                    issued_at: float, ttl: float) -> Envelope:
    """An envelope built and signed exactly as ``seal_envelope`` does, its nonce given."""
    unsigned = Envelope(v=PROTOCOL_VERSION, sender=identity.name, recipient=recipient, kind=kind, job_id=job_id,
                        nonce=nonce, issued_at=issued_at, expires_at=issued_at + min(ttl, MAX_TTL_SECONDS),
                        body=body_text)
    return unsigned.model_copy(update={"signature": _b64(identity.sign(unsigned.signed_bytes()))})


def envelope_vector(envelope: Envelope, identity: Identity, description: str) -> dict[str, Any]:
    signed = envelope.signed_bytes()
    return {
        "description": description,
        "sender_public_key": identity.public.text(),
        "envelope": envelope.model_dump(mode="json"),
        "signed_bytes": signed.decode("ascii"),
        "signed_bytes_hex": signed.hex(),
        "signature_hex": identity.sign(signed).hex(),
        "verify_at": envelope.issued_at,
    }


def sample_plan() -> Plan:
    """births[:, 0].mean(): a dataset, a column, its mean."""
    return Plan(inputs=[InputRef(kind="dataset", name="births")],
                steps=[Step(op="getitem", args=[Ref(ref=0)], params={"index": [{"start": None}, 0]}),
                       Step(op="mean", args=[Ref(ref=1)])])


def envelope_vectors() -> dict[str, Any]:
    run = RunJob(plan=sample_plan())
    ascii_env = signed_envelope(ALICE, recipient="hospital", kind=run.kind,
                                job_id="hospital:00112233445566778899aabbccddeeff",
                                body_text=json.dumps(run.model_dump(mode="json"), separators=(",", ":")),
                                nonce="000102030405060708090a0b0c0d0e0f", issued_at=ISSUED_AT, ttl=600.0)
    # what a JavaScript sender writes with JSON.stringify: non-ASCII characters unescaped in the body
    access = AccessRequest(dataset="births", reason='für die Studie ✓ 😀 "quoted"\n\tand a tab')
    unicode_env = signed_envelope(ALICE, recipient="hospital", kind=access.kind,
                                  job_id="hospital:ffeeddccbbaa99887766554433221100",
                                  body_text=json.dumps(access.model_dump(mode="json"), separators=(",", ":"),
                                                       ensure_ascii=False),
                                  nonce="f0e0d0c0b0a090807060504030201000", issued_at=ISSUED_AT + 0.25, ttl=3600.0)
    return {
        "run_job": envelope_vector(ascii_env, ALICE, (
            "alice's RunJob to hospital, as seal_envelope(ALICE, recipient='hospital', kind='run', job_id=…, "
            "body=RunJob(…).model_dump(mode='json'), now=1700000000.0, ttl=600) builds it with the nonce fixed "
            "(seal_envelope draws 16 random bytes as 32 hex digits). signed_bytes is what Ed25519 signs: the "
            "envelope without `signature`, as Python's json.dumps(sort_keys=True, separators=(',', ':')), "
            "ensure_ascii on — note the floats written as Python does (1700000000.0, not 1700000000). The "
            "signature is base64url with padding of the 64-byte Ed25519 signature. Verify with sender_public_key "
            "at time verify_at.")),
        "unicode_body": envelope_vector(unicode_env, ALICE, (
            "An envelope whose body a JavaScript sender wrote (JSON.stringify: non-ASCII characters raw, quotes "
            "and control characters escaped) and fractional times. In signed_bytes every character of a string "
            "outside 0x20–0x7e is escaped as Python's json.dumps does: \\\" \\\\ \\b \\f \\n \\r \\t, else "
            "\\uXXXX in lowercase hex of its UTF-16 code units (a surrogate pair above U+FFFF); the body string "
            "itself is signed as sent, character for character.")),
    }


FLOAT_TENSOR = torch.tensor([[1.5, -2.0, 0.25], [3.0, 0.0, -0.5]], dtype=torch.float32)


def tensor_vectors() -> list[dict[str, Any]]:
    tensors = [FLOAT_TENSOR, torch.tensor([1, -2, 300], dtype=torch.int64),
               torch.tensor([True, False, True]), torch.tensor(3.25, dtype=torch.float64)]
    out = []
    for tensor in tensors:
        data = encode_tensor(tensor)
        header_length = int.from_bytes(data[:8], "little")
        out.append({
            "description": "encode_tensor: safetensors bytes holding one tensor named 't' (8-byte little-endian "
                           "header length, the JSON header padded with spaces to a multiple of 8, then the "
                           "values row-major, little-endian).",
            "dtype": str(tensor.dtype).removeprefix("torch."),
            "shape": list(tensor.shape),
            "values": tensor.tolist(),
            "header": data[8:8 + header_length].decode("utf-8"),
            "bytes_base64": _b64std(data),
        })
    return out


def sealed_value_vector() -> dict[str, Any]:
    plaintext = encode_tensor(FLOAT_TENSOR)
    ephemeral = ephemeral_secret("sealed value")
    sealed = seal_with_ephemeral(ephemeral, ALICE.public.box_key, plaintext)
    return {
        "description": "A released tensor sealed to alice: crypto_box_seal(encode_tensor(tensor), alice's X25519 "
                       "public key). Open `ciphertext_base64` with crypto_box_seal_open and alice's keys to get "
                       "`plaintext_base64` (the tensor's safetensors bytes). The ephemeral secret is given so the "
                       "ciphertext can be rebuilt (epk = X25519 base point × esk, nonce = BLAKE2b-192(epk ‖ "
                       "recipient public key), then crypto_box); real senders draw it fresh. A SealedValue carries "
                       "the sealed bytes inline as standard base64 (value_inline) while they are at most "
                       "claim_check_threshold_bytes, else under a claim-check key in Redis with their SHA-256 "
                       "(value_by_claim_check: the blob at that key is the raw sealed bytes).",
        "recipient": ALICE.name,
        "recipient_box_secret_hex": ALICE.box_secret.hex(),
        "recipient_box_public_hex": ALICE.public.box_key.hex(),
        "ephemeral_secret_hex": ephemeral.hex(),
        "ciphertext_base64": _b64std(sealed),
        "plaintext_base64": _b64std(plaintext),
        "tensor": {"dtype": "float32", "shape": list(FLOAT_TENSOR.shape), "values": FLOAT_TENSOR.tolist()},
        "value_inline": SealedValue(sealed=_b64std(sealed), size=len(sealed)).model_dump(mode="json"),
        "value_by_claim_check": SealedValue.left("gridq:blob:0123456789abcdef0123456789abcdef", sealed)
        .model_dump(mode="json"),
    }


def sealed_metrics_vector() -> dict[str, Any]:
    metrics = TrainMetrics(samples=120, loss=0.25, accuracy=0.875, seconds=1.5)
    text = metrics.model_dump_json().ljust(512)  # as TrainMetrics.sealed_to pads it
    ephemeral = ephemeral_secret("sealed metrics")
    sealed = seal_with_ephemeral(ephemeral, ALICE.public.box_key, text.encode())
    return {
        "description": "A training's figures sealed to alice (SealedMetrics): the TrainMetrics JSON padded with "
                       "spaces to 512 bytes, sealed with crypto_box_seal, standard base64. Open, strip the "
                       "trailing spaces (a JSON parser ignores them) and read `metrics`.",
        "recipient": ALICE.name,
        "recipient_box_secret_hex": ALICE.box_secret.hex(),
        "ephemeral_secret_hex": ephemeral.hex(),
        "sealed_metrics": SealedMetrics(sealed=_b64std(sealed)).model_dump(mode="json"),
        "plaintext": text,
        "metrics": metrics.model_dump(mode="json"),
    }


def fixed_point_vector() -> dict[str, Any]:
    fp = FixedPoint(frac_bits=16)
    values = [1.5, -2.25, 0.1, 3.14159, -0.00001, 1000.5, 2.0**-17, 3 * 2.0**-17, -5 * 2.0**-17]
    encoded = fp.encode(torch.tensor(values, dtype=torch.float64))
    return {
        "description": "Fixed point in the ring Z_2^64 (MPC): encode(x) = round(x · 2^frac_bits) computed in "
                       "float64, rounding half to even (the last three values are 0.5, 1.5 and -2.5 units), held "
                       "as a two's-complement int64; |round(x · 2^f)| must be below 2^63. decode(v) = v / 2^f. "
                       "Ring elements are given as decimal strings, signed and as their representative in "
                       "[0, 2^64).",
        "frac_bits": fp.frac_bits,
        "values": values,
        "encoded": _ring_text(encoded),
        "encoded_unsigned": _unsigned_text(encoded),
        "decoded": fp.decode(encoded).tolist(),
    }


PRG_SEED = bytes(range(100, 132))


def prg_vector() -> dict[str, Any]:
    shape = (5,)
    return {
        "description": "The MPC PRG, expand(seed, shape, label): AES-256-CTR keyed by the 32-byte seed, the "
                       "initial 16-byte counter block = the first 16 bytes of SHA-256(label as UTF-8), counting up "
                       "as one 128-bit big-endian integer; the keystream's first 8·count bytes read as "
                       "little-endian int64, row-major.",
        "seed_hex": PRG_SEED.hex(),
        "cases": [{"label": label, "shape": list(shape),
                   "counter_block_hex": hashlib.sha256(label.encode()).digest()[:16].hex(),
                   "values": _ring_text(expand(PRG_SEED, shape, label))} for label in ("", "bit.x")],
    }


SHARE_SEEDS = (bytes(range(140, 172)), bytes(range(180, 212)))


def additive_shares_vector() -> dict[str, Any]:
    fp = FixedPoint(frac_bits=16)
    values = torch.tensor([[1.5, -2.25], [0.1, 3.0]], dtype=torch.float64)
    secret = fp.encode(values)
    seeds: Iterator[bytes] = iter(SHARE_SEEDS)
    shares, _ = share_seeded(secret, 3, lambda: next(seeds))
    return {
        "description": "Additive sharing of fixed-point values among 3 parties (share_seeded): shares 0 and 1 are "
                       "expand(seed_i, shape, label='') — any uniform random int64 tensor will do for a sender, "
                       "the seeds only make this vector reproducible — and the last is secret − Σ others mod 2^64. "
                       "The secret is Σ shares mod 2^64. A party's input share travels as pack({'x': share}) "
                       "(safetensors, int64), its output share as pack({'y': share}).",
        "frac_bits": fp.frac_bits,
        "values": values.tolist(),
        "shape": list(secret.shape),
        "secret": _ring_text(secret),
        "seeds_hex": [s.hex() for s in SHARE_SEEDS],
        "shares": [_ring_text(s) for s in shares],
        "input_share_0_base64": _b64std(pack({"x": shares[0]})),
    }


def sample_card() -> ModelCard:
    return ModelCard(name="triage", owner=HOSPITAL.name, owner_key=HOSPITAL.public.text(), host="company",
                     parties=[PARTY_A.name, "party-b"], provider="dealer",
                     queriers={ALICE.name: ALICE.public.text()},
                     plan=ModelPlan(layers=(Layer(kind="linear", in_features=2, out_features=1),), frac_bits=16),
                     issued_at=ISSUED_AT)


def mpc_query_vector() -> dict[str, Any]:
    card = sample_card()
    signed_card = SignedCard.sign(HOSPITAL, card)
    query = Query(querier=ALICE.name, owner=card.owner, model=card.name, card=card.digest(), batch=1,
                  id="00112233445566778899aabbccddeeff", issued_at=ISSUED_AT)
    signed_query = SignedQuery.sign(ALICE, query)
    share = torch.tensor([[65536, -98304]], dtype=torch.int64)  # any int64 tensor: one party's input share
    data = pack({"x": share})
    label = input_label(query.id, PARTY_A.name)
    ephemeral = ephemeral_secret("mpc input share")
    sealed = seal_with_ephemeral(ephemeral, PARTY_A.public.box_key, ALICE.sign(_digest(label, data)) + data)
    return {
        "description": "An MPC query (keys: `keys` vectors). canonical(m) = json.dumps(m.model_dump(mode='json'), "
                       "sort_keys=True, separators=(',', ':')) with ensure_ascii. The card digest is "
                       "BLAKE2b-256(b'gridq-mpc-card\\0' ‖ canonical(card)) in hex, and the owner signs the 64 "
                       "ASCII hex digits. The query digest is BLAKE2b-256(b'gridq-mpc-query\\0' ‖ canonical(query)), "
                       "and the querier signs its 32 raw bytes. Signatures are hex. An input share is sealed to its "
                       "party and signed for the query (seal_signed): crypto_box_seal(sig ‖ data) where data = "
                       "pack({'x': share}) and sig = Ed25519(BLAKE2b-256(label ‖ 0x00 ‖ data)), label = "
                       "'mpc-input:<query id>:<party>'; it is left under a claim-check key named in "
                       "QueryModel.inputs.",
        "card": card.model_dump(mode="json"),
        "card_canonical": canonical(card).decode("ascii"),
        "card_digest_hex": card.digest(),
        "signed_card": signed_card.model_dump(mode="json"),
        "query": query.model_dump(mode="json"),
        "query_canonical": canonical(query).decode("ascii"),
        "query_digest_hex": query.digest().hex(),
        "signed_query": signed_query.model_dump(mode="json"),
        "input_share": {
            "party": PARTY_A.name,
            "party_box_secret_hex": PARTY_A.box_secret.hex(),
            "label": label,
            "share": _ring_text(share),
            "shape": list(share.shape),
            "data_base64": _b64std(data),
            "digest_hex": _digest(label, data).hex(),
            "ephemeral_secret_hex": ephemeral.hex(),
            "sealed_base64": _b64std(sealed),
        },
    }


def node_listing_vector() -> dict[str, Any]:
    info = NodeInfo(node=HOSPITAL.name, public_key=HOSPITAL.public.text(), queue="node.hospital",
                    last_seen=ISSUED_AT - 10.0)
    text = NodeListing(issued_at=ISSUED_AT, nodes=[info]).model_dump_json()
    signed = _signed_part(text)
    posted = _Posted(listing=text, signature=GATEWAY.sign(signed).hex()).model_dump_json()
    return {
        "description": "The gateway's node listing as posted at gridq:gateway:nodes (sign_listing). `listing` is "
                       "JSON text, signed as it stands: the gateway signs the bytes of "
                       "json.dumps({'gridq': 'node-listing', 'listing': <text>}, separators=(',', ':')) — that key "
                       "order, ensure_ascii on — and the signature is hex. Trust it only within "
                       "listing_max_age_seconds of its issued_at, and never older than one already read.",
        "gateway_public_key": GATEWAY.public.text(),
        "posted": posted,
        "signed_bytes": signed.decode("ascii"),
        "verify_at": ISSUED_AT + 1.0,
    }


def vectors() -> dict[str, Any]:
    return {
        "$comment": GENERATED,
        "description": "Test vectors of the gridq wire, protocol v1 (see ../SPEC.md). Every value is built from "
                       "fixed inputs; byte strings are hex (*_hex), standard base64 (*_base64) or as they travel.",
        "keys": [key_vector(i) for i in (ALICE, HOSPITAL, PARTY_A, GATEWAY)],
        "envelopes": envelope_vectors(),
        "tensors": tensor_vectors(),
        "sealed_value": sealed_value_vector(),
        "sealed_metrics": sealed_metrics_vector(),
        "fixed_point": fixed_point_vector(),
        "prg": prg_vector(),
        "additive_shares": additive_shares_vector(),
        "mpc_query": mpc_query_vector(),
        "node_listing": node_listing_vector(),
    }
