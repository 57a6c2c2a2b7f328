"""Interop vectors for the TypeScript client, made by the gridq Python code itself.

Run from the repository root:  .venv/bin/python clients/ts/scripts/make_vectors.py

Writes clients/ts/test/vectors/vectors.json (keys, envelopes, sealing, tensors, fixed point,
listing, MPC digests) and clients/ts/test/vectors/plans.json (the RunJob body text Python
sends for each expression of ``plan_cases``; test/plans.test.ts builds the same expressions).
Everything random (sealed boxes, nonces) is produced once and committed: the TypeScript
tests only read these files, so they run offline and without Python.
"""

from __future__ import annotations

import base64
import json
import math
from pathlib import Path
from typing import Any

import torch

from orchestrator.pointer import DataPointer, Expression, cat, stack
from protocol.codec import encode_tensor
from protocol.envelope import Envelope
from protocol.identity import Identity
from protocol.listing import sign_listing
from protocol.messages import (
    DatasetMeta,
    DPRelease,
    GatewayReply,
    JobReply,
    KeepRelease,
    NodeInfo,
    NoiseInfo,
    RawRelease,
    RunJob,
    SealedValue,
)
from protocol.mpc.cards import ModelCard, Query, SignedCard, SignedQuery, input_label
from protocol.mpc.model import Layer, ModelPlan
from protocol.mpc.ring import FixedPoint
from protocol.mpc.wire import pack, seal_signed
from protocol.plan import InputRef, TensorSpec

OUT = Path(__file__).resolve().parent.parent / "test" / "vectors"
NOW = 1_700_000_000.0


def ident(name: str, start: int) -> Identity:
    """A deterministic identity: signing seed bytes(start..start+31), box secret the next 32."""
    return Identity(name, bytes(range(start, start + 32)), bytes(range(start + 32, start + 64)))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def signed(identity: Identity, *, recipient: str, kind: str, job_id: str, body: Any, nonce: str,
           issued_at: float, ttl: float) -> Envelope:
    """seal_envelope with a fixed nonce (seal_envelope draws one)."""
    unsigned = Envelope(v="1.0", sender=identity.name, recipient=recipient, kind=kind, job_id=job_id, nonce=nonce,
                        issued_at=issued_at, expires_at=issued_at + ttl,
                        body=json.dumps(body, separators=(",", ":")))
    signature = base64.urlsafe_b64encode(identity.sign(unsigned.signed_bytes())).decode()
    return unsigned.model_copy(update={"signature": signature})


def identities() -> dict[str, Any]:
    out = {}
    for name, start in (("alice", 0), ("hospital", 64), ("gateway", 128), ("company", 192)):
        me = ident(name, start)
        out[name] = {"signing_seed_hex": me.signing_key.hex(), "box_secret_hex": me.box_secret.hex(),
                     "public_key": me.public.text(), "key_file": me.to_json()}
    return out


def envelopes() -> list[dict[str, Any]]:
    alice = ident("alice", 0)
    cases: list[tuple[str, dict[str, Any], float, float]] = [
        ("plain", {"kind": "budget", "dataset": None}, NOW, 600.0),
        ("fraction", {"kind": "budget", "dataset": "births"}, 1_700_000_000.123456, 600.0),
        ("unicode", {"kind": "access", "dataset": "births", "reason": "é \"q\" \\ \u2028 😀 \x01 \x7f tab\t"},
         NOW + 0.5, 86_400.0),
    ]
    out = []
    for name, body, issued_at, ttl in cases:
        env = signed(alice, recipient="hospital", kind=body["kind"], job_id=f"hospital:{'ab' * 16}", body=body,
                     nonce="0123456789abcdef" * 2, issued_at=issued_at, ttl=ttl)
        out.append({"name": name, "body": body, "envelope": env.model_dump(mode="json"),
                    "signed_bytes": env.signed_bytes().decode("ascii")})
    return out


def floats() -> list[dict[str, Any]]:
    values = [0.0, -0.0, 1.0, -2.5, 0.1, 1e16, 1e15, 123456789012345680.0, 0.0001, 0.00001, 1.5e-7, 5e-324,
              1.7976931348623157e308, NOW, 1_700_000_000.123456, 2.0**53, 1e21, 1e22, 3.14159, -1e-300]
    return [{"value": v, "text": json.dumps(v)} for v in values]


def strings() -> list[dict[str, str]]:
    values = ["plain", "é", "\u2028", "😀", "\x00\x01\x1f", "\x7f", "\"\\/", "\b\f\n\r\t", "\ud800x"]
    return [{"value": v, "text": json.dumps(v)} for v in values]


def sealed() -> list[dict[str, Any]]:
    alice = ident("alice", 0)
    out = []
    for plain in (b"", b"hello", bytes(range(256)) * 3):
        out.append({"recipient_box_secret_hex": alice.box_secret.hex(), "plaintext_b64": b64(plain),
                    "sealed_b64": b64(alice.public.seal(plain))})
    return out


def tensors() -> list[dict[str, Any]]:
    cases = [
        ("float32", torch.tensor([1.5, -2.0, 0.1, 3.0e38])),
        ("float64", torch.tensor([[1.0, 2.5], [-0.1, 1e-300]], dtype=torch.float64)),
        ("float16", torch.tensor([1.0, -0.5, 65504.0, 6.1e-05], dtype=torch.float16)),
        ("bfloat16", torch.tensor([1.0, -0.5, 3.0e38, 0.1], dtype=torch.bfloat16)),
        ("int64", torch.tensor([0, -1, 2**62, -(2**63)], dtype=torch.int64)),
        ("int32", torch.tensor([[1, -2, 3]], dtype=torch.int32)),
        ("int16", torch.tensor([-32768, 32767], dtype=torch.int16)),
        ("int8", torch.tensor([-128, 127], dtype=torch.int8)),
        ("uint8", torch.tensor([0, 255], dtype=torch.uint8)),
        ("bool", torch.tensor([True, False, True])),
        ("scalar", torch.tensor(3.25)),
        ("empty", torch.zeros((0, 3))),
    ]
    out = []
    for name, t in cases:
        values = [str(v) for v in t.flatten().tolist()] if t.dtype == torch.int64 else t.flatten().tolist()
        out.append({"name": name, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
                    "values": values, "bytes_b64": b64(encode_tensor(t))})
    return out


def fixed_point() -> list[dict[str, Any]]:
    out = []
    for frac_bits in (16, 8, 24):
        fp = FixedPoint(frac_bits)
        scale = 2.0**-frac_bits
        values = [0.0, 1.5, -2.25, 0.1, -0.1, 0.5 * scale, 1.5 * scale, 2.5 * scale, -0.5 * scale, -2.5 * scale,
                  3.14159265, -1234.5678, 1e6, -7.777e-6]
        enc = fp.encode(torch.tensor(values, dtype=torch.float64))
        dec = fp.decode(enc)
        out.append({"frac_bits": frac_bits, "values": values, "encoded": [str(v) for v in enc.tolist()],
                    "decoded": dec.tolist()})
    big = FixedPoint(16)
    try:
        big.encode(torch.tensor([2.0**47], dtype=torch.float64))
        too_big = False
    except ValueError:
        too_big = True
    ring = [str(v) for v in (torch.tensor([2**63 - 1], dtype=torch.int64) + 1).tolist()]
    return [*out, {"too_big_2_47_at_16": too_big, "wrap_max_plus_one": ring}]


def listing() -> dict[str, Any]:
    gateway = ident("gateway", 128)
    nodes = [NodeInfo(node="hospital", public_key=ident("hospital", 64).public.text(), queue="node.hospital",
                      last_seen=NOW - 3.25),
             NodeInfo(node="company", public_key=ident("company", 192).public.text(), queue="node.company",
                      last_seen=NOW - 1.0)]
    return {"gateway_public_key": gateway.public.text(), "issued_at": NOW, "posted": sign_listing(gateway, nodes, NOW)}


def replies() -> dict[str, Any]:
    """Signed answers as a node and the gateway send them, for the reply-verification tests."""
    hospital, gateway, alice = ident("hospital", 64), ident("gateway", 128), ident("alice", 0)
    value = torch.tensor([3.25, 51.5])
    sealed_value = alice.public.seal(encode_tensor(value))
    job_id = f"hospital:{'cd' * 16}"
    done = JobReply(status="done", value=SealedValue(sealed=b64(sealed_value), size=len(sealed_value)),
                    noise=NoiseInfo(mechanism="laplace", epsilon=0.1, delta=0.0, scale=0.29, sensitivity=0.029))
    raw = encode_tensor(torch.arange(4.0))
    sealed_big = alice.public.seal(raw)
    left = JobReply(status="done", value=SealedValue.left("gridq:blob:" + "ef" * 16, sealed_big))
    search = GatewayReply(datasets=[DatasetMeta(node="hospital", name="birth-records-feb", shape=(240, 2),
                                                dtype="float32", columns=["weight", "height"],
                                                description="Monthly birth records: weight (kg), height (cm)",
                                                tags=["#february", "#birth-records"])],
                          nodes=[NodeInfo(node="hospital", public_key=hospital.public.text(), queue="node.hospital",
                                          last_seen=NOW)])

    def env(signer: Identity, to: str, job: str, body: Any, nonce: str) -> dict[str, Any]:
        return signed(signer, recipient=to, kind=body.kind, job_id=job, body=body.model_dump(mode="json"),
                      nonce=nonce, issued_at=NOW, ttl=600.0).model_dump(mode="json")

    return {
        "now": NOW + 1.0,
        "job_id": job_id,
        "dp_done": env(hospital, "alice", job_id, done, "1" * 32),
        "dp_value": value.tolist(),
        "claim_checked": env(hospital, "alice", f"hospital:{'ee' * 16}", left, "2" * 32),
        "claim_checked_job_id": f"hospital:{'ee' * 16}",
        "claim_checked_blob_b64": b64(sealed_big),
        "parked": env(hospital, "alice", job_id, JobReply(status="pending_approval"), "3" * 32),
        "search_job_id": "f" * 32,
        "search": env(gateway, "public", "f" * 32, search, "4" * 32),
    }


def mpc() -> dict[str, Any]:
    owner, querier, party = ident("company", 192), ident("alice", 0), ident("hospital", 64)
    plan = ModelPlan(layers=(Layer(kind="linear", in_features=3, out_features=2), Layer(kind="relu")), frac_bits=16)
    card = ModelCard(name="risk", owner="company", owner_key=owner.public.text(), host="gateway",
                     parties=["hospital", "alice"], provider="dealer", plan=plan, issued_at=NOW,
                     queriers={"alice": querier.public.text()})
    signed_card = SignedCard.sign(owner, card)
    text = json.dumps(signed_card.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    host = ident("gateway", 128)
    entry = {"card": text, "signature": host.sign(text.encode()).hex()}
    q = Query(querier="alice", owner="company", model="risk", card=card.digest(), batch=1, id="ab" * 16,
              issued_at=NOW + 0.25)
    share = torch.tensor([[1, -2, 2**62]], dtype=torch.int64)
    blob = seal_signed(querier, party.public, input_label(q.id, "hospital"), pack({"x": share}))
    return {
        "entry": entry, "card_digest": card.digest(), "card_canonical": json.dumps(card.model_dump(mode="json"),
                                                                                  sort_keys=True,
                                                                                  separators=(",", ":")),
        "query": q.model_dump(mode="json"), "query_digest_hex": q.digest().hex(),
        "query_signature": SignedQuery.sign(querier, q).signature,
        "input_share": [str(v) for v in share.flatten().tolist()], "input_share_shape": list(share.shape),
        "input_sealed_signed_b64": b64(blob), "input_label": input_label(q.id, "hospital"),
        "pack_x_b64": b64(pack({"x": share})),
    }


# --- plans: the same expressions are built in test/plans.test.ts ----------------------------

BIRTHS = DatasetMeta(node="hospital", name="birth-records-feb", shape=(240, 2), dtype="float32",
                     columns=["weight", "height"], tags=["#birth-records"])
OTHER = DatasetMeta(node="hospital", name="births-mar", shape=(240, 2), dtype="float32", columns=["weight", "height"])


def pointer(meta: DatasetMeta) -> DataPointer:
    return DataPointer(None, meta.node, InputRef(kind="dataset", name=meta.name),  # type: ignore[arg-type]
                       TensorSpec(shape=meta.shape, dtype=meta.dtype), meta)


def plan_cases() -> dict[str, Expression]:
    b, o = pointer(BIRTHS), pointer(OTHER)
    w, h = b["weight"], b["height"]
    kept = DataPointer(None, "hospital", InputRef(kind="object", name="obj-1"),  # type: ignore[arg-type]
                       TensorSpec(shape=(240,), dtype="float32"))
    return {
        "column_sum": b[:, 0].sum(),
        "weight_mean": w.mean(),
        "height_count": (h > 52).count(),
        "public_tensor": (w - torch.full((240,), 3.5)).abs().mean(),
        "clamp_sum": w.clamp(0, 7).sum(),
        "ratio": w.sum() / h.sum(),
        "const_first": 2 - w,
        "float_const": w * 2.0,
        "int_const": w * 2,
        "keepdim": h.mean(dim=0, keepdim=True),
        "spread": b.std(0) / b.var(dim=[0], correction=0),
        "gram": b.T @ b,
        "shifted": b[1:, 0] * b[:-1, 0],
        "fancy_index": b[..., None][::2, 0, :],
        "where": (w > 4.0).where(w, 0),
        "cast_reshape": b.to("float64").reshape(480).max(),
        "cat_stack": stack([cat([w, w * 2], dim=0), cat([h, h], dim=0)], dim=1),
        "self_twice": w + w,
        "unary": b.exp().log().sqrt(),
        "neg_abs": abs(-b),
        "int_index": b[0] + b[-1, 1],
        "eq_ne": w.eq(3.5).to("int64") + h.ne(0).to("int64"),
        "pow_rdiv": (b**2) + 1 / b,
        "two_datasets": w + o["weight"],
        "kept_object": kept * 3.0 + w,
        "bool_const": w * True,
        "big_and_small": (w * 1e-07 + 12345678901234) - 1e300,
        "scalar_tensor": w * torch.tensor(2.0),
        "int_tensor": b[:, 0] + torch.arange(240),
        "public_matrix": b @ torch.tensor([[1.0], [0.5]]),  # type: ignore[operator]  # __matmul__ takes tensors too
        "min_max": b.min(dim=1).max(),
        "count_dim": (b > 1).count(dim=0),
        "clamp_one_side": w.clamp(max=6.5).clamp(min=0.5).sum(),
        "transpose_args": b.reshape(2, 120, 2).transpose(1, 2).sum(dim=[1, 2]),
        "rsub_radd_rmul": (1 - w) + (2 + w) + (3 * w) + (0.5 - h),
        "le_ge_lt": (w <= 3).to("float32") + (w >= 2).to("float32") + (w < 5).to("float32"),
    }


RELEASES = {"keep": KeepRelease(), "raw": RawRelease(), "dp": DPRelease(epsilon=0.1),
            "dp_gauss": DPRelease(epsilon=1, delta=1e-7)}


def plans() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, expr in plan_cases().items():
        out[name] = {"body": json.dumps(RunJob(plan=expr.plan, release=RawRelease()).model_dump(mode="json"),
                                        separators=(",", ":")),
                     "shape": list(expr.shape), "dtype": expr.dtype}
    w = pointer(BIRTHS)["weight"].mean()
    releases = {name: json.dumps(RunJob(plan=w.plan, release=r).model_dump(mode="json"), separators=(",", ":"))
                for name, r in RELEASES.items()}
    return {"cases": out, "releases": releases}


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    vectors: dict[str, Any] = {
        "identities": identities(), "envelopes": envelopes(), "floats": floats(), "strings": strings(),
        "sealed": sealed(), "tensors": tensors(), "fixed_point": fixed_point(), "listing": listing(),
        "replies": replies(), "mpc": mpc(),
    }
    assert all(math.isfinite(f["value"]) for f in vectors["floats"])
    (OUT / "vectors.json").write_text(json.dumps(vectors, indent=1) + "\n")
    (OUT / "plans.json").write_text(json.dumps(plans(), indent=1) + "\n")
    print(f"wrote {OUT / 'vectors.json'} and {OUT / 'plans.json'}")


if __name__ == "__main__":
    main()
