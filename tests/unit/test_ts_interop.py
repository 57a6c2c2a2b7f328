"""The TypeScript client (clients/ts) and the Python side speak one protocol: what the TS client
signs verifies here, what it seals opens here, and what Python signs and seals opens there.

Runs the built client through ``node clients/ts/scripts/roundtrip.mjs`` (the ``ts_roundtrip``
fixture of tests/unit/conftest.py). No skip: without ``node`` or the build (``make ts`` builds
it; ``make test`` runs that first) these tests fail.
"""

from __future__ import annotations

import base64
import json
import random
import secrets
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch

from protocol.codec import decode_tensor, encode_tensor
from protocol.envelope import MemoryNonceStore, open_envelope, seal_envelope
from protocol.errors import BadSignature, WrongRecipient
from protocol.identity import Identity
from protocol.messages import RunJob, parse_body
from protocol.mpc.cards import ModelCard, Query, SignedQuery, input_label
from protocol.mpc.model import Layer, ModelPlan
from protocol.mpc.ring import FixedPoint
from protocol.mpc.wire import open_signed, unpack

RoundTrip = Callable[..., list[dict[str, Any]]]  # the ts_roundtrip fixture (tests/unit/conftest.py)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str) -> bytes:
    return base64.b64decode(text)


def test_envelopes_the_ts_client_signs_verify_here(ts_roundtrip: RoundTrip) -> None:
    alice = Identity.generate("alice")
    now = time.time()
    plan = {"kind": "run", "plan": {"inputs": [{"kind": "dataset", "name": "births"}],
                                    "steps": [{"op": "mean", "args": [{"ref": 0}], "params": {}}]},
            "release": {"door": "dp", "epsilon": 0.1, "delta": 0.0}}
    access = {"kind": "access", "dataset": "births", "reason": "é \"q\" \\ \u2028 😀 \x01 \x7f"}
    requests = [{"op": "sign_envelope", "key_file": alice.to_json(), "recipient": "hospital", "kind": body["kind"],
                 "job_id": f"hospital:{secrets.token_hex(16)}", "body": body, "now": at}
                for body, at in ((plan, now), (access, now), (plan, float(int(now))))]
    for envelope in ts_roundtrip(*requests):
        env = open_envelope(envelope, recipient="hospital", keyring={"alice": alice.public}, nonces=MemoryNonceStore(),
                            delivery_id=envelope["job_id"], now=now + 1)
        body = parse_body(env.body_json())
        assert body.kind in ("run", "access")
        if isinstance(body, RunJob):
            assert body.release.door == "dp" and body.plan.steps[0].op == "mean"
    forged = {**ts_roundtrip(requests[0])[0], "body": json.dumps({**plan, "release": {"door": "raw"}})}
    with pytest.raises(BadSignature):
        open_envelope(forged, recipient="hospital", keyring={"alice": alice.public}, nonces=MemoryNonceStore(),
                      delivery_id=forged["job_id"], now=now + 1)


def test_replies_python_signs_verify_there_and_misdirected_ones_do_not(ts_roundtrip: RoundTrip) -> None:
    hospital = Identity.generate("hospital")
    job_id = f"hospital:{secrets.token_hex(16)}"
    reply = seal_envelope(hospital, recipient="alice", kind="job_reply", job_id=job_id,
                          body={"kind": "job_reply", "status": "done", "note": "é 😀"}, now=time.time(),
                          ttl=600.0).model_dump(mode="json")
    check = {"op": "open_envelope", "envelope": reply, "keyring": {"hospital": hospital.public.text()},
             "job_id": job_id}
    ok, wrong_recipient, wrong_job, tampered = ts_roundtrip(
        {**check, "recipient": "alice"}, {**check, "recipient": "bob"},
        {**check, "recipient": "alice", "job_id": f"hospital:{secrets.token_hex(16)}"},
        {**check, "recipient": "alice", "envelope": {**reply, "expires_at": reply["expires_at"] + 1}})
    assert ok == {"body": {"kind": "job_reply", "status": "done", "note": "é 😀"}}
    assert wrong_recipient["error"]["code"] == WrongRecipient.code
    assert wrong_job["error"]["code"] == "misdirected_reply"
    assert tampered["error"]["code"] == "bad_signature"


def test_sealed_boxes_open_both_ways(ts_roundtrip: RoundTrip) -> None:
    alice = Identity.generate("alice")
    plain = secrets.token_bytes(1000)
    from_ts, to_ts = ts_roundtrip(
        {"op": "seal", "public_key": alice.public.text(), "plaintext_b64": b64(plain)},
        {"op": "open", "key_file": alice.to_json(), "sealed_b64": b64(alice.public.seal(plain))})
    assert alice.unseal(unb64(from_ts["sealed_b64"])) == plain
    assert unb64(to_ts["plaintext_b64"]) == plain
    (wrong,) = ts_roundtrip({"op": "open", "key_file": Identity.generate("bob").to_json(),
                             "sealed_b64": b64(alice.public.seal(plain))})
    assert wrong["error"]["code"] == "bad_signature"


def test_mpc_input_shares_and_query_signatures_the_ts_client_makes_open_here(ts_roundtrip: RoundTrip) -> None:
    bob, party, owner = Identity.generate("bob"), Identity.generate("hospital"), Identity.generate("dana")
    card = ModelCard(name="risk", owner="dana", owner_key=owner.public.text(), host="company",
                     parties=["hospital", "public"], provider="university", queriers={"bob": bob.public.text()},
                     plan=ModelPlan(layers=(Layer(kind="linear", in_features=3, out_features=2), Layer(kind="relu"))),
                     issued_at=time.time())
    query = Query(querier="bob", owner="dana", model="risk", card=card.digest(), batch=1, id=secrets.token_hex(16),
                  issued_at=float(int(time.time())))
    values = [1, -2, 2**62, -(2**63)]
    label = input_label(query.id, "hospital")
    digest, signature, share = ts_roundtrip(
        {"op": "card_digest", "card": card.model_dump(mode="json")},
        {"op": "sign_query", "key_file": bob.to_json(), "query": query.model_dump(mode="json")},
        {"op": "seal_signed_share", "key_file": bob.to_json(), "party": "hospital", "party_key": party.public.text(),
         "label": label, "values": [str(v) for v in values], "shape": [1, 4]})
    assert digest["digest"] == card.digest()
    assert SignedQuery(query=query, signature=signature["signature"]).verify(card, time.time()) == bob.public
    tensors, _ = unpack(open_signed(party, bob.public, label, unb64(share["blob_b64"])))
    assert tensors["x"].tolist() == [values]
    with pytest.raises(BadSignature):
        open_signed(party, bob.public, input_label(query.id, "public"), unb64(share["blob_b64"]))


def test_tensors_and_fixed_point_agree(ts_roundtrip: RoundTrip) -> None:
    rng = random.Random(17)
    values = [rng.uniform(-1e4, 1e4) for _ in range(200)] + [0.5 / 2**16, 1.5 / 2**16, -2.5 / 2**16]
    t64 = torch.tensor([[1.5, -2.0], [0.1, 3e300]], dtype=torch.float64)
    encoded, f32, decoded = ts_roundtrip(
        {"op": "fixed_encode", "frac_bits": 16, "values": values},
        {"op": "encode_tensor", "dtype": "float32", "shape": [3], "values": [0.1, -2.5, 3e38]},
        {"op": "decode_tensor", "bytes_b64": b64(encode_tensor(t64))})
    expected = FixedPoint(16).encode(torch.tensor(values, dtype=torch.float64)).tolist()
    assert [int(v) for v in encoded["encoded"]] == expected
    assert decode_tensor(unb64(f32["bytes_b64"])).tolist() == torch.tensor([0.1, -2.5, 3e38]).tolist()
    assert unb64(f32["bytes_b64"]) == encode_tensor(torch.tensor([0.1, -2.5, 3e38]))
    assert (decoded["dtype"], decoded["shape"], decoded["values"]) == ("float64", [2, 2], [1.5, -2.0, 0.1, 3e300])


def test_a_plan_the_ts_client_builds_is_the_plan_python_builds(ts_roundtrip: RoundTrip) -> None:
    from orchestrator.pointer import DataPointer
    from protocol.messages import DatasetMeta, RawRelease
    from protocol.plan import InputRef, TensorSpec

    meta = DatasetMeta(node="hospital", name="births", shape=(240, 2), dtype="float32", columns=["weight", "height"])
    births = DataPointer(None, "hospital", InputRef(kind="dataset", name="births"),  # type: ignore[arg-type]
                         TensorSpec(shape=(240, 2), dtype="float32"), meta)
    expected = (births["weight"].clamp(0, 7) - 3.5).abs().mean()
    calls = [["col", "weight"], ["clamp", 0, 7], ["sub", 3.5], ["abs"], ["mean"]]
    (built,) = ts_roundtrip({"op": "plan", "node": "hospital", "name": "births", "shape": [240, 2],
                             "dtype": "float32", "columns": ["weight", "height"], "calls": calls})
    assert built["body"] == json.dumps(RunJob(plan=expected.plan, release=RawRelease()).model_dump(mode="json"),
                                       separators=(",", ":"))
