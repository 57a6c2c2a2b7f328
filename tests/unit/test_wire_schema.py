"""The published wire contract (protocol/schema): the checked-in schema is what the models
give, every message has one, real messages validate against it, and Python reproduces or
opens every test vector (the TypeScript client runs the same vectors)."""

from __future__ import annotations

import base64
import json
import typing
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from protocol.codec import decode_tensor, encode_tensor
from protocol.contract import Tasks
from protocol.envelope import Envelope, MemoryNonceStore, open_envelope, seal_envelope
from protocol.errors import ERRORS_BY_CODE, JobFailed, PermissionDenied
from protocol.identity import Identity, PublicIdentity
from protocol.listing import open_listing, sign_listing
from protocol.messages import (
    Body,
    DatasetMeta,
    GatewayReply,
    JobReply,
    NodeInfo,
    NoiseInfo,
    PointerTicket,
    RunJob,
    SealedMetrics,
    SealedValue,
    SearchQuery,
    TrainJob,
    TrainMetrics,
    WireError,
    checked,
)
from protocol.model import describe_model
from protocol.mpc import wire as mpc_wire
from protocol.mpc.cards import ModelCard, Query, SignedCard, SignedQuery, canonical
from protocol.mpc.ring import FixedPoint, expand
from protocol.mpc.sharing import reconstruct
from protocol.mpc.wire import QueryModel, ServeModel, open_signed, unpack
from protocol.pinning import fingerprint
from protocol.plan import InputRef, TensorSpec
from protocol.schema import SCHEMA_DIR, WRITE_COMMAND, documents
from protocol.schema.__main__ import drifted, write
from protocol.schema.catalogue import MESSAGES
from protocol.schema.vectors import fixed_identity, seal_with_ephemeral

SPEC = SCHEMA_DIR.parent / "SPEC.md"
RING = 1 << 64


@cache
def generated() -> dict[str, str]:
    return documents()


@cache
def published(name: str) -> Any:
    return json.loads((SCHEMA_DIR / name).read_text(encoding="utf-8"))


def vector(*path: str) -> Any:
    found = published("vectors.json")
    for key in path:
        found = found[key]
    return found


def members(union: Any) -> list[type]:
    """The model classes of an ``Annotated[A | B | …, Field(discriminator=…)]`` union."""
    return list(typing.get_args(typing.get_args(union)[0]))


def kind_of(model: Any) -> str:
    return str(model.model_fields["kind"].default)


# --- the drift check -------------------------------------------------------------------------

def test_the_checked_in_schema_is_what_the_models_give():
    stale = drifted(generated(), SCHEMA_DIR)
    assert not stale, (f"the wire schema in {SCHEMA_DIR} differs from the pydantic models in "
                       f"{', '.join(stale)}: run `{WRITE_COMMAND}` and commit the result")


def test_generation_is_deterministic():
    assert documents() == generated()


def test_write_makes_a_folder_that_check_accepts(tmp_path: Path):
    files = {"A.json": '{"a": 1}\n', "B.json": "{}\n"}
    assert write(files, tmp_path) == ["A.json", "B.json"]
    assert drifted(files, tmp_path) == []
    (tmp_path / "A.json").write_text('{"a": 2}\n')
    (tmp_path / "Gone.json").write_text("{}\n")
    assert drifted(files, tmp_path) == ["A.json", "Gone.json"]
    assert write(files, tmp_path) == ["A.json", "Gone.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["A.json", "B.json"]


def test_files_are_byte_stable_text():
    for name, text in generated().items():
        assert text.endswith("}\n") and not text.endswith("\n\n"), name
        assert json.dumps(json.loads(text), sort_keys=True, indent=2, ensure_ascii=False) + "\n" == text, name


# --- every message has a schema ----------------------------------------------------------------

def test_every_body_kind_has_a_schema_and_a_route():
    index = published("index.json")["messages"]
    for model in members(Body):
        entry = index[model.__name__]
        assert entry["kinds"] == [kind_of(model)] and (SCHEMA_DIR / entry["file"]).is_file()
    assert index["Body"]["kinds"] == sorted(kind_of(m) for m in members(Body))


def test_every_mpc_message_has_a_schema():
    index = published("index.json")["messages"]
    on_wire = {cls for cls in vars(mpc_wire).values()
               if isinstance(cls, type) and issubclass(cls, mpc_wire._Body) and "kind" in cls.model_fields}
    assert on_wire, "no MPC message found: has protocol.mpc.wire moved?"
    for model in on_wire:
        assert index[model.__name__]["kinds"] == [kind_of(model)], model.__name__
    assert set(index["MpcBody"]["kinds"]) == {kind_of(m) for m in on_wire}


def test_every_task_and_error_code_is_in_the_index():
    index = published("index.json")
    names = {v for k, v in vars(Tasks).items() if k.isupper()}
    assert set(index["tasks"]) == names
    assert set(index["errors"]) == set(ERRORS_BY_CODE)


def test_the_spec_explains_every_error_code():
    spec = SPEC.read_text(encoding="utf-8")
    for code, cls in ERRORS_BY_CODE.items():
        assert f"| `{code}` | `{cls.__name__}`" in spec, f"SPEC.md's error table lacks {code}"


def test_every_catalogued_type_has_a_distinct_file():
    assert len({m.name for m in MESSAGES}) == len(MESSAGES)


# --- real messages validate -------------------------------------------------------------------

def validator(name: str) -> Any:
    jsonschema = pytest.importorskip("jsonschema")
    schema = published(name)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def assert_valid(name: str, instance: Any) -> None:
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator(name).iter_errors(instance)]
    assert not errors, f"{name}: {errors[:3]}"


def test_every_published_schema_is_a_valid_json_schema():
    for wire in MESSAGES:
        validator(f"{wire.name}.json")


def sample_plan_body() -> dict[str, Any]:
    """A plan as the client builds it from pointers."""
    from orchestrator.pointer import Expression

    births = Expression(None, "hospital", [(InputRef(kind="dataset", name="births"),  # type: ignore[arg-type]
                                            TensorSpec(shape=(31, 2), dtype="float32"))])
    expr = ((births[:, 0] * 2.5).clamp(0.0, 10.0) > 1).sum()
    return RunJob(plan=expr.plan).model_dump(mode="json")


def test_a_sealed_envelope_and_its_body_validate():
    me = Identity.generate("alice")
    body = sample_plan_body()
    env = seal_envelope(me, recipient="hospital", kind="run", job_id="hospital:" + "ab" * 16, body=body,
                        now=1_700_000_000.5).model_dump(mode="json")
    assert_valid("Envelope.json", env)
    assert_valid("RunJob.json", json.loads(env["body"]))
    assert_valid("Body.json", json.loads(env["body"]))


def test_what_the_model_refuses_the_schema_refuses():
    me = Identity.generate("alice")
    env = seal_envelope(me, recipient="hospital", kind="budget", job_id="j1", body={"kind": "budget"},
                        now=1.0).model_dump(mode="json")
    v = validator("Envelope.json")
    assert v.is_valid(env)
    assert not v.is_valid({**env, "extra": 1})
    assert not v.is_valid({**env, "sender": "not a name"})
    assert not v.is_valid({k: x for k, x in env.items() if k != "nonce"})
    assert not validator("Body.json").is_valid({"kind": "nonsense"})
    assert not validator("RunJob.json").is_valid({"kind": "run", "plan": {"inputs": []}})


def test_replies_validate():
    alice, node = Identity.generate("alice"), Identity.generate("hospital")
    sealed = alice.public.seal(encode_tensor(torch.ones(3)))
    done = JobReply(status="done", value=SealedValue(sealed=base64.b64encode(sealed).decode(), size=len(sealed)),
                    noise=NoiseInfo(mechanism="laplace", epsilon=1.0, delta=0.0, scale=2.0, sensitivity=2.0),
                    metrics=TrainMetrics(samples=10, loss=0.5).sealed_to(alice.public))
    kept = JobReply(status="done", ticket=PointerTicket(node="hospital", object_id="obj-1", job_id="j",
                                                        shape=(3,), dtype="float32", sources=["births"]))
    denied = JobReply(status="denied", error=WireError(**PermissionDenied("no", job_id="j").to_wire()))
    for reply in (done, kept, denied):
        assert_valid("JobReply.json", reply.model_dump(mode="json"))
        assert_valid("Body.json", reply.model_dump(mode="json"))
    meta = DatasetMeta(node="hospital", name="births", shape=(31, 2), dtype="float32", tags=["#births"],
                       bounds=[(0.0, 10.0)])
    info = NodeInfo(node="hospital", public_key=node.public.text(), queue="node.hospital", last_seen=1.0)
    assert_valid("GatewayReply.json", GatewayReply(datasets=[meta], nodes=[info]).model_dump(mode="json"))
    assert_valid("SearchQuery.json", checked(SearchQuery, tags=["#births"], words=["feb"]).model_dump(mode="json"))
    failed = JobReply(status="failed", error=WireError(**JobFailed("boom").to_wire()))
    assert_valid("JobReply.json", failed.model_dump(mode="json"))


def test_a_reply_lists_requests_only_when_it_has_some_so_older_clients_read_the_rest():
    """``requests`` came after the other fields: a client whose JobReply lacks it (extra
    fields forbidden) must still read every reply that lists none."""
    from pydantic import create_model

    from protocol.messages import RequestInfo

    fields = {name: (field.annotation, field) for name, field in JobReply.model_fields.items() if name != "requests"}
    older = create_model("OlderJobReply", __config__=JobReply.model_config, **fields)  # type: ignore[call-overload]
    plain = JobReply(status="done").model_dump(mode="json")
    assert "requests" not in plain and older.model_validate(plain).status == "done"
    assert JobReply.model_validate(plain) == JobReply(status="done")
    listed = JobReply(status="done", requests=[RequestInfo(id="desk:" + "0" * 32, kind="raw",
                                                           datasets=["births"], release="raw", status="pending",
                                                           created_at=1.0)]).model_dump(mode="json")
    assert len(listed["requests"]) == 1
    assert_valid("JobReply.json", plain)
    assert_valid("JobReply.json", listed)


def test_a_train_job_validates():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    spec, _ = describe_model(model)
    plan = RunJob.model_validate(sample_plan_body()).plan
    job = TrainJob(model=spec, x=plan, y=plan).model_dump(mode="json")
    assert_valid("TrainJob.json", job)
    assert_valid("ModelSpec.json", job["model"])
    assert_valid("Plan.json", job["x"])


def test_mpc_messages_and_the_node_listing_validate():
    owner, alice, gateway = Identity.generate("owner"), Identity.generate("alice"), Identity.generate("gateway")
    card = ModelCard.model_validate({**vector("mpc_query", "card"), "owner": "owner",
                                     "owner_key": owner.public.text()})
    signed_card = SignedCard.sign(owner, card)
    query = SignedQuery.sign(alice, Query(querier="alice", owner="owner", model=card.name, card=card.digest(),
                                          batch=2, id="ab" * 16, issued_at=1.5))
    blob = "gridq:blob:" + "x" * 32
    assert_valid("ServeModel.json", ServeModel(card=signed_card, shares={"party-a": blob}).model_dump(mode="json"))
    query_model = QueryModel(query=query, inputs={"party-a": blob, "party-b": blob}).model_dump(mode="json")
    assert_valid("QueryModel.json", query_model)
    assert_valid("MpcBody.json", query_model)
    posted = sign_listing(gateway, [NodeInfo(node="n", public_key=alice.public.text(), queue="node.n",
                                             last_seen=1.0)], now=2.0)
    assert_valid("PostedNodeListing.json", json.loads(posted))
    assert_valid("NodeListing.json", json.loads(json.loads(posted)["listing"]))


def test_the_vectors_messages_validate():
    for name in ("run_job", "unicode_body"):
        assert_valid("Envelope.json", vector("envelopes", name, "envelope"))
        assert_valid("Body.json", json.loads(vector("envelopes", name, "envelope", "body")))
    assert_valid("SealedValue.json", vector("sealed_value", "value_inline"))
    assert_valid("SealedValue.json", vector("sealed_value", "value_by_claim_check"))
    assert_valid("SealedMetrics.json", vector("sealed_metrics", "sealed_metrics"))
    assert_valid("TrainMetrics.json", vector("sealed_metrics", "metrics"))
    assert_valid("SignedCard.json", vector("mpc_query", "signed_card"))
    assert_valid("SignedQuery.json", vector("mpc_query", "signed_query"))
    assert_valid("PostedNodeListing.json", json.loads(vector("node_listing", "posted")))


# --- the vectors, reproduced and opened --------------------------------------------------------

def identity_of(name: str) -> Identity:
    """The identity of a key vector, read back from its key file."""
    found = next(k for k in vector("keys") if k["name"] == name)
    return Identity.from_json(found["key_file"])


def test_key_vectors():
    for k in vector("keys"):
        me = Identity.from_json(k["key_file"])
        assert me.signing_key.hex() == k["signing_seed_hex"] and me.box_secret.hex() == k["box_secret_hex"]
        public = PublicIdentity.parse(k["name"], k["public_key"])
        assert (public.verify_key.hex(), public.box_key.hex()) == (k["verify_key_hex"], k["box_public_hex"])
        assert me.public == public and fingerprint(k["public_key"]) == k["fingerprint"]
    assert fixed_identity("alice", 0) == identity_of("alice")


@pytest.mark.parametrize("name", ["run_job", "unicode_body"])
def test_envelope_vectors(name: str):
    v = vector("envelopes", name)
    env = Envelope.model_validate(v["envelope"])
    assert env.signed_bytes() == bytes.fromhex(v["signed_bytes_hex"]) == v["signed_bytes"].encode("ascii")
    sender = PublicIdentity.parse(env.sender, v["sender_public_key"])
    sender.verify(env.signed_bytes(), bytes.fromhex(v["signature_hex"]))
    assert identity_of(env.sender).sign(env.signed_bytes()).hex() == v["signature_hex"]
    opened = open_envelope(v["envelope"], recipient=env.recipient, keyring={env.sender: sender},
                           nonces=MemoryNonceStore(), delivery_id=env.job_id, now=v["verify_at"])
    assert opened == env


def test_seal_envelope_with_the_vectors_nonce_gives_the_vector(monkeypatch: pytest.MonkeyPatch):
    v = vector("envelopes", "run_job")["envelope"]
    monkeypatch.setattr("protocol.envelope.secrets.token_hex", lambda n: v["nonce"])
    env = seal_envelope(identity_of("alice"), recipient=v["recipient"], kind=v["kind"], job_id=v["job_id"],
                        body=json.loads(v["body"]), now=v["issued_at"], ttl=v["expires_at"] - v["issued_at"])
    assert env.model_dump(mode="json") == v


def test_a_javascript_style_float_is_signed_as_python_writes_it():
    v = vector("envelopes", "run_job")
    as_ints = {**v["envelope"], "issued_at": int(v["envelope"]["issued_at"]),
               "expires_at": int(v["envelope"]["expires_at"])}
    assert Envelope.model_validate(as_ints).signed_bytes() == v["signed_bytes"].encode()


def test_tensor_vectors():
    for v in vector("tensors"):
        data = base64.b64decode(v["bytes_base64"])
        tensor = decode_tensor(data)
        assert str(tensor.dtype) == f"torch.{v['dtype']}" and list(tensor.shape) == v["shape"]
        assert tensor.tolist() == v["values"]
        assert encode_tensor(tensor) == data
        assert data[8:8 + int.from_bytes(data[:8], "little")].decode() == v["header"]


def test_sealed_value_vector():
    v = vector("sealed_value")
    me = identity_of(v["recipient"])
    assert me.box_secret.hex() == v["recipient_box_secret_hex"]
    sealed = base64.b64decode(v["ciphertext_base64"])
    assert me.unseal(sealed) == base64.b64decode(v["plaintext_base64"])  # libsodium opens the construction
    rebuilt = seal_with_ephemeral(bytes.fromhex(v["ephemeral_secret_hex"]), me.public.box_key,
                                  base64.b64decode(v["plaintext_base64"]))
    assert rebuilt == sealed
    assert decode_tensor(me.unseal(sealed)).tolist() == v["tensor"]["values"]
    inline = SealedValue.model_validate(v["value_inline"])
    assert base64.b64decode(inline.sealed or "") == sealed and inline.size == len(sealed)
    claimed = SealedValue.model_validate(v["value_by_claim_check"])
    assert claimed.checked(sealed) == sealed and claimed.size == len(sealed)


def test_sealed_metrics_vector():
    v = vector("sealed_metrics")
    me = identity_of(v["recipient"])
    sealed = SealedMetrics.model_validate(v["sealed_metrics"])
    assert sealed.open(me) == TrainMetrics.model_validate(v["metrics"])
    assert me.unseal(base64.b64decode(sealed.sealed)).decode() == v["plaintext"]
    assert len(v["plaintext"]) == published("index.json")["limits"]["sealed_metrics_padded_bytes"]


def test_fixed_point_vector():
    v = vector("fixed_point")
    fp = FixedPoint(v["frac_bits"])
    encoded = fp.encode(torch.tensor(v["values"], dtype=torch.float64))
    assert [str(x) for x in encoded.tolist()] == v["encoded"]
    assert [str(x % RING) for x in encoded.tolist()] == v["encoded_unsigned"]
    assert fp.decode(encoded).tolist() == v["decoded"]
    assert v["encoded"][-3:] == ["0", "2", "-2"]  # half to even


def test_prg_vector():
    v = vector("prg")
    for case in v["cases"]:
        values = expand(bytes.fromhex(v["seed_hex"]), tuple(case["shape"]), case["label"])
        assert [str(x) for x in values.tolist()] == case["values"]


def test_additive_shares_vector():
    v = vector("additive_shares")
    shares = [torch.tensor([int(x) for x in s], dtype=torch.int64).reshape(v["shape"]) for s in v["shares"]]
    secret = reconstruct(shares)
    assert [str(x) for x in secret.flatten().tolist()] == v["secret"]
    assert secret.tolist() == FixedPoint(v["frac_bits"]).encode(torch.tensor(v["values"])).tolist()
    for k in range(len(v["secret"])):  # and in plain integers, as a BigInt implementation adds them
        assert sum(int(s[k]) for s in v["shares"]) % RING == int(v["secret"][k]) % RING
    for seed, share in zip(v["seeds_hex"], shares[:-1], strict=True):
        assert torch.equal(expand(bytes.fromhex(seed), tuple(v["shape"])), share)
    assert torch.equal(unpack(base64.b64decode(v["input_share_0_base64"]))[0]["x"], shares[0])


def test_mpc_query_vector():
    v = vector("mpc_query")
    card = ModelCard.model_validate(v["card"])
    assert canonical(card).decode() == v["card_canonical"] and card.digest() == v["card_digest_hex"]
    assert SignedCard.model_validate(v["signed_card"]).verify() == card
    query = SignedQuery.model_validate(v["signed_query"])
    assert canonical(query.query).decode() == v["query_canonical"]
    assert query.query.digest().hex() == v["query_digest_hex"]
    assert query.verify(card, now=query.query.issued_at).text() == card.queriers["alice"]
    share = v["input_share"]
    party = identity_of(share["party"])
    data = open_signed(party, identity_of("alice").public, share["label"], base64.b64decode(share["sealed_base64"]))
    assert data == base64.b64decode(share["data_base64"])
    assert [str(x) for x in unpack(data)[0]["x"].flatten().tolist()] == share["share"]


def test_node_listing_vector():
    v = vector("node_listing")
    gateway = PublicIdentity.parse("gateway", v["gateway_public_key"])
    listing = open_listing(v["posted"], gateway, now=v["verify_at"])
    assert [n.node for n in listing.nodes] == ["hospital"]
    outer = json.loads(v["posted"])
    assert json.dumps({"gridq": "node-listing", "listing": outer["listing"]}, separators=(",", ":")) \
        == v["signed_bytes"]
    gateway.verify(v["signed_bytes"].encode(), bytes.fromhex(outer["signature"]))
