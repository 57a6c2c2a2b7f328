"""The TypeScript client (clients/ts) and the Python side agree on what issue 19 added to the
wire: every error of ``protocol/errors.py`` (code, class, parent, retryable); the replies Python
signs now — a JobReply with every field, ``requests`` (``RequestInfo``) included — read there as
Python wrote them; the MyRequests / CancelRequest bodies the TS client sends parse here; and a
signed cancellation (``protocol/cancel.py``) made on either side verifies on the other.

Runs the built client through ``node clients/ts/scripts/roundtrip.mjs`` (the ``ts_roundtrip``
fixture of tests/unit/conftest.py). No skip: without ``node`` or the build (``make ts``) these
tests fail.
"""

from __future__ import annotations

import base64
import inspect
import json
import secrets
import time
from collections.abc import Callable
from typing import Any

import pytest

import protocol.errors as errors
from protocol.cancel import STARTED, cancellation, cancelled_by
from protocol.envelope import seal_envelope
from protocol.errors import InvalidRequest
from protocol.identity import Identity
from protocol.messages import (
    BudgetInfo,
    CancelRequest,
    DatasetMeta,
    GatewayReply,
    JobReply,
    MyRequests,
    NodeInfo,
    NoiseInfo,
    PointerTicket,
    RequestInfo,
    SealedValue,
    TrainMetrics,
    WireError,
    parse_body,
)
from protocol.mpc.wire import MpcReply

RoundTrip = Callable[..., list[dict[str, Any]]]  # the ts_roundtrip fixture (tests/unit/conftest.py)
STATUSES = ("pending", "approved", "denied", "expired", "cancelled")


def python_errors() -> dict[str, dict[str, Any]]:
    """Every error class protocol/errors.py defines: code → class, parent's code, retryable."""
    out = {}
    for name, cls in vars(errors).items():
        if inspect.isclass(cls) and issubclass(cls, errors.GridError) and cls.__module__ == errors.__name__:
            parent = cls.__mro__[1]
            out[cls.code] = {"class": name, "parent": parent.code if issubclass(parent, errors.GridError) else None,
                             "retryable": cls.retryable}
    return out


def test_the_ts_client_has_every_error_of_protocol_errors_with_its_code_parent_and_retry(
        ts_roundtrip: RoundTrip) -> None:
    (ts,) = ts_roundtrip({"op": "errors"})
    expected = python_errors()
    assert {"request_expired", "job_cancelled", "cannot_cancel"} <= expected.keys()
    assert ts["errors"] == expected


def signed(identity: Identity, body: dict[str, Any], to: str = "alice") -> tuple[dict[str, Any], str]:
    """``body`` signed by ``identity`` to ``to``, as a worker signs its replies (protocol.serving)."""
    job_id = f"{identity.name}:{secrets.token_hex(16)}"
    env = seal_envelope(identity, recipient=to, kind=body["kind"], job_id=job_id, body=body, now=time.time())
    return env.model_dump(mode="json"), job_id


def read_there(run: RoundTrip, identity: Identity, body: dict[str, Any], parser: str) -> dict[str, Any]:
    """What the TS client makes of ``body``, signed by ``identity``: the parsed body, or its error."""
    envelope, job_id = signed(identity, body)
    (result,) = run({"op": "parse_reply", "envelope": envelope, "keyring": {identity.name: identity.public.text()},
                     "recipient": "alice", "job_id": job_id, "parser": parser})
    return result


def full_job_reply(alice: Identity, node: str) -> JobReply:
    """A JobReply with every field set, as no single job answers (the reader must take them all)."""
    job_id = f"{node}:{'a' * 32}"
    now = time.time()
    sealed = alice.public.seal(b"\x00" * 40)
    return JobReply(
        status="done",
        ticket=PointerTicket(node=node, object_id="obj-1", job_id=job_id, shape=(2, 3), dtype="float32",
                             sources=["births"]),
        value=SealedValue(sealed=base64.b64encode(sealed).decode(), size=len(sealed)),
        noise=NoiseInfo(mechanism="gaussian", epsilon=0.5, delta=1e-6, scale=0.25, sensitivity=0.1,
                        post_processed=True),
        budgets=[BudgetInfo(node=node, dataset="births", user="alice", epsilon=1.0, delta=1e-5, spent_epsilon=0.5,
                            spent_delta=0.0, releases=2)],
        metrics=TrainMetrics(samples=240, loss=0.25, accuracy=0.75, seconds=1.5).sealed_to(alice.public),
        shares={"hospital": f"gridq:blob:{'b' * 32}", "clinic": f"gridq:blob:{'c' * 32}"},
        requests=[
            RequestInfo(id=f"{node}:{'1' * 32}", kind="dp", datasets=["births"], release="dp ε=0.2",
                        status="pending", created_at=now - 5, expires_at=now + 600),
            RequestInfo(id=f"{node}:{'2' * 32}", kind="raw", datasets=["births", "births-mar"], release="raw",
                        status="denied", created_at=now - 50, decided_at=now - 1, decision="not this term é 😀"),
            RequestInfo(id=f"{node}:{'3' * 32}", kind="compute", datasets=["births"], release="keep",
                        status="expired", created_at=now - 900, decided_at=now - 300,
                        decision="no decision within 600 s ([approval] expire_after)"),
        ],
        error=WireError(code="request_expired", message="waited too long", job_id=job_id),
    )


def test_a_job_reply_with_every_field_python_sends_reads_there_as_python_wrote_it(ts_roundtrip: RoundTrip) -> None:
    hospital, alice = Identity.generate("hospital"), Identity.generate("alice")
    reply = full_job_reply(alice, "hospital").model_dump(mode="json")
    assert read_there(ts_roundtrip, hospital, reply, "job_reply") == {"parsed": reply}


def test_a_job_reply_that_leaves_defaults_out_reads_there_with_them_filled_in(ts_roundtrip: RoundTrip) -> None:
    """The schema lets a sender leave a field with a default out (Python writes every one)."""
    hospital = Identity.generate("hospital")
    info = RequestInfo(id=f"hospital:{'4' * 32}", kind="access", datasets=["births"], release="access",
                       status="cancelled", created_at=time.time())
    short = {"kind": "job_reply", "status": "done", "requests": [info.model_dump(mode="json", exclude_defaults=True)]}
    assert parse_body(short) == JobReply(status="done", requests=[info])  # Python takes it
    parsed = read_there(ts_roundtrip, hospital, short, "job_reply")["parsed"]
    assert parsed["requests"] == [info.model_dump(mode="json")] and parsed["shares"] == {}
    bare = read_there(ts_roundtrip, hospital, {"kind": "job_reply", "status": "done"}, "job_reply")["parsed"]
    assert bare["requests"] == [] and bare["shares"] == {}


@pytest.mark.parametrize("bad", [
    {"status": "lost"}, {"created_at": "yesterday"}, {"id": "no spaces allowed"}, {"datasets": "births"},
    {"decided_at": "soon"}, {"decision": 3},
])
def test_a_malformed_request_listing_is_refused_on_both_sides(bad: dict[str, Any], ts_roundtrip: RoundTrip) -> None:
    hospital = Identity.generate("hospital")
    info = {**RequestInfo(id=f"hospital:{'5' * 32}", kind="dp", datasets=["births"], release="dp", status="pending",
                          created_at=time.time()).model_dump(mode="json"), **bad}
    body = {"kind": "job_reply", "status": "done", "requests": [info]}
    with pytest.raises(InvalidRequest):
        parse_body(body)
    assert read_there(ts_roundtrip, hospital, body, "job_reply")["error"]["code"] == "invalid_request"


def test_gateway_and_mpc_replies_with_every_field_read_there(ts_roundtrip: RoundTrip) -> None:
    gateway, company = Identity.generate("gateway"), Identity.generate("company")
    meta = DatasetMeta(node="hospital", name="births", shape=(240, 2), dtype="float32", columns=["weight", "height"],
                       description="Birth records", tags=["#births"], bounds=[(0.0, 7.0), (20.0, 65.0)])
    nodes = [NodeInfo(node="hospital", public_key=gateway.public.text(), queue="node.hospital", last_seen=time.time())]
    gateway_reply = GatewayReply(datasets=[meta], nodes=nodes, error=WireError(code="not_found", message="x"))
    body = gateway_reply.model_dump(mode="json")
    assert read_there(ts_roundtrip, gateway, body, "gateway_reply") == {"parsed": body}
    mpc_reply = MpcReply(outputs={"hospital": f"gridq:blob:{'d' * 32}"}, keys={"hospital": gateway.public.text()})
    body = mpc_reply.model_dump(mode="json")
    assert read_there(ts_roundtrip, company, body, "mpc_reply") == {"parsed": body}


def test_the_request_bodies_the_ts_client_sends_are_python_s(ts_roundtrip: RoundTrip) -> None:
    job_id = f"hospital:{secrets.token_hex(16)}"
    asked = [{"op": "my_requests", "status": s} for s in (None, *STATUSES)]
    results = ts_roundtrip(*asked, {"op": "cancel_request", "request": job_id}, {"op": "my_requests", "status": "lost"},
                           {"op": "cancel_request", "request": "hospital:not a job"})
    *lists, cancel, bad_status, bad_id = results
    for status, result in zip((None, *STATUSES), lists, strict=True):
        assert parse_body(json.loads(result["body"])) == MyRequests(status=status)  # type: ignore[arg-type]
        assert result["body"] == json.dumps(MyRequests(status=status).model_dump(mode="json"),  # type: ignore[arg-type]
                                            separators=(",", ":"))
    assert parse_body(json.loads(cancel["body"])) == CancelRequest(request=job_id)
    assert cancel["body"] == json.dumps(CancelRequest(request=job_id).model_dump(mode="json"), separators=(",", ":"))
    assert bad_status["error"]["code"] == bad_id["error"]["code"] == "invalid_request"
    for bad in ({"kind": "requests", "status": "lost"}, {"kind": "cancel", "request": "hospital:not a job"}):
        with pytest.raises(InvalidRequest):
            parse_body(bad)


def test_a_cancellation_signed_on_either_side_verifies_on_the_other_and_only_for_its_job_and_signer(
        ts_roundtrip: RoundTrip) -> None:
    alice, carol = Identity.generate("alice"), Identity.generate("carol")
    job, other = f"desk:{secrets.token_hex(16)}", f"desk:{secrets.token_hex(16)}"
    (made,) = ts_roundtrip({"op": "cancellation", "key_file": alice.to_json(), "job_id": job})
    mark = made["mark"].encode()
    assert mark == cancellation(alice, job)  # Ed25519 is deterministic: the same bytes as Python's
    assert cancelled_by(mark, alice.public, job)
    assert not cancelled_by(mark, alice.public, other) and not cancelled_by(mark, carol.public, job)

    def check(mark: bytes | str, who: Identity, job_id: str) -> dict[str, Any]:
        text = mark.decode() if isinstance(mark, bytes) else mark
        return {"op": "cancelled_by", "mark": text, "name": who.name, "public_key": who.public.text(), "job_id": job_id}

    python_mark = cancellation(carol, job)
    forged = b" ".join((b"cancel", b"carol", python_mark.split(b" ")[2]))  # carol's signature, as anyone can copy
    checks = [check(python_mark, carol, job), check(python_mark, carol, other), check(python_mark, alice, job),
              check(forged.replace(b"carol", b"alice", 1), alice, job), check(STARTED, carol, job),
              check("", carol, job), check("cancel carol !!!", carol, job), check(python_mark + b" x", carol, job)]
    assert [r["ok"] for r in ts_roundtrip(*checks)] == [True] + [False] * 7
