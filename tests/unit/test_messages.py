"""Message bodies (parse_body and its caps) and the Celery wire contract."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from pydantic import ValidationError

from protocol.contract import GATEWAY_QUEUE, Tasks, celery_settings, node_queue
from protocol.errors import InvalidRequest
from protocol.messages import (
    DatasetMeta,
    EvalJob,
    GatewayReply,
    JobReply,
    KeepRelease,
    NodeInfo,
    PublishDataset,
    RawRelease,
    RegisterNode,
    RunJob,
    SearchQuery,
    UnpublishDataset,
    parse_body,
)
from protocol.plan import Plan

PLAN = {
    "inputs": [{"kind": "dataset", "name": "births"}],
    "steps": [{"op": "mean", "args": [{"ref": 0}], "params": {"dim": 0}}],
}
META = {
    "node": "hospital-a",
    "name": "births",
    "shape": [31, 2],
    "dtype": "float32",
    "columns": ["day", "count"],
    "description": "births per day",
    "tags": ["#health", "#births"],
}
TICKET = {
    "node": "hospital-a",
    "object_id": "obj-1",
    "job_id": "job-1",
    "shape": [2],
    "dtype": "float32",
    "sources": ["births"],
}
ERROR = {"code": "permission_denied", "message": "no door opens", "job_id": "job-1"}
NODE = {"node": "hospital-a", "public_key": "gridq1:abc", "queue": "node.hospital-a", "last_seen": 12.5}

SPEC = {"layers": {"0": {"type": "Linear", "kwargs": {"in_features": 2, "out_features": 1}}},
        "graph": [{"name": "x", "op": "placeholder", "target": "x"},
                  {"name": "l0", "op": "call_module", "target": "0", "args": [{"node": "x"}]},
                  {"name": "output", "op": "output", "target": "output", "args": [{"node": "l0"}]}]}

BODIES: dict[str, tuple[dict[str, Any], type]] = {
    "run": ({"kind": "run", "plan": PLAN}, RunJob),
    "run_raw": ({"kind": "run", "plan": PLAN, "release": {"door": "raw"}}, RunJob),
    "evaluate": ({"kind": "evaluate", "model": SPEC, "weights": {"sealed": "abc", "size": 3}, "x": PLAN, "y": PLAN,
                  "loss": "mse"}, EvalJob),
    "job_reply_done": ({"kind": "job_reply", "status": "done", "ticket": TICKET}, JobReply),
    "job_reply_value": (
        {"kind": "job_reply", "status": "done", "value": {"sealed": "abc", "size": 3}}, JobReply),
    "job_reply_denied": ({"kind": "job_reply", "status": "denied", "error": ERROR}, JobReply),
    "register": ({"kind": "register", "public_key": "gridq1:abc", "datasets": [META]}, RegisterNode),
    "publish": ({"kind": "publish", "dataset": META}, PublishDataset),
    "unpublish": ({"kind": "unpublish", "name": "births"}, UnpublishDataset),
    "gateway_reply": ({"kind": "gateway_reply", "datasets": [META], "nodes": [NODE]}, GatewayReply),
    "gateway_reply_error": ({"kind": "gateway_reply", "error": ERROR}, GatewayReply),
}


# --- parse_body: every kind -------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(BODIES))
def test_parse_body_each_kind(name: str) -> None:
    data, cls = BODIES[name]
    body = parse_body(copy.deepcopy(data))
    assert type(body) is cls
    assert body.kind == data["kind"]
    # a parsed body dumps back to JSON and parses again to the same value
    again = parse_body(json.loads(body.model_dump_json()))
    assert again == body


def test_parse_body_fields_are_typed() -> None:
    run = parse_body({"kind": "run", "plan": PLAN})
    assert isinstance(run, RunJob)
    assert isinstance(run.plan, Plan)
    assert run.plan.steps[0].op == "mean"
    assert run.release == KeepRelease()  # default door: keep the result at the node

    raw = parse_body({"kind": "run", "plan": PLAN, "release": {"door": "raw"}})
    assert isinstance(raw, RunJob)
    assert isinstance(raw.release, RawRelease)

    pub = parse_body({"kind": "publish", "dataset": META})
    assert isinstance(pub, PublishDataset)
    assert pub.dataset.shape == (31, 2)
    assert pub.dataset.tags == ["#health", "#births"]

    reply = parse_body({"kind": "job_reply", "status": "denied", "error": ERROR})
    assert isinstance(reply, JobReply)
    assert reply.error is not None and reply.error.code == "permission_denied"


# --- parse_body: refusals --------------------------------------------------------------

def test_unknown_kind_is_invalid_request() -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_body({"kind": "shutdown"}, job_id="j-9")
    assert info.value.job_id == "j-9"
    assert "malformed message" in info.value.message


@pytest.mark.parametrize("data", [None, 42, "run", [], {"plan": PLAN}, {"kind": 3}])
def test_non_message_is_invalid_request(data: object) -> None:
    with pytest.raises(InvalidRequest):
        parse_body(data)


@pytest.mark.parametrize(
    "data",
    [
        {"kind": "run", "plan": PLAN, "extra": 1},
        {"kind": "unpublish", "name": "births", "force": True},
        {"kind": "publish", "dataset": {**META, "values": [1, 2, 3]}},
        {"kind": "run", "plan": {**PLAN, "code": "import os"}},
        {"kind": "run", "plan": {"inputs": PLAN["inputs"],
                                 "steps": [{"op": "sum", "args": [{"ref": 0}], "fn": "x"}]}},
        {"kind": "job_reply", "status": "done", "ticket": {**TICKET, "values": [1.0]}},
    ],
    ids=["top", "unpublish", "dataset", "plan", "step", "ticket"],
)
def test_extra_field_is_invalid_request(data: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_body(data)
    assert "extra" in info.value.message.lower() or "not permitted" in info.value.message


def test_oversize_tag_list_is_invalid_request() -> None:
    ok = {**META, "tags": [f"#t{i}" for i in range(32)]}
    assert len(parse_body({"kind": "publish", "dataset": ok}).dataset.tags) == 32  # type: ignore[union-attr]
    too_many = {**META, "tags": [f"#t{i}" for i in range(33)]}
    with pytest.raises(InvalidRequest) as info:
        parse_body({"kind": "publish", "dataset": too_many})
    assert "tags" in info.value.message


@pytest.mark.parametrize(
    "field,value",
    [
        ("columns", ["c"] * 4097),
        ("shape", [1] * 9),
        ("description", "x" * 4097),
        ("dtype", "x" * 17),
        ("name", "x" * 129),
    ],
)
def test_other_caps_are_enforced(field: str, value: Any) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_body({"kind": "publish", "dataset": {**META, field: value}})
    assert field in info.value.message


def test_oversize_plan_is_invalid_request() -> None:
    steps = [{"op": "neg", "args": [{"ref": i}]} for i in range(257)]
    with pytest.raises(InvalidRequest):
        parse_body({"kind": "run", "plan": {"inputs": PLAN["inputs"], "steps": steps}})


@pytest.mark.parametrize("tag", ["health", "#", "##", "#a b", "#a\n", "#ü", "", "#" + "a" * 64])
def test_bad_tags_are_rejected(tag: str) -> None:
    with pytest.raises(InvalidRequest):
        parse_body({"kind": "publish", "dataset": {**META, "tags": [tag]}})
    with pytest.raises(ValidationError):
        SearchQuery(tags=[tag])


@pytest.mark.parametrize("tag", ["#a", "#health", "#a.b-c_d", "#" + "a" * 63])
def test_good_tags_are_accepted(tag: str) -> None:
    assert DatasetMeta.model_validate({**META, "tags": [tag]}).tags == [tag]
    assert SearchQuery(tags=[tag]).tags == [tag]


@pytest.mark.parametrize("name", ["", "a b", "../etc", "a/b", "x" * 129])
def test_bad_names_are_rejected(name: str) -> None:
    with pytest.raises(InvalidRequest):
        parse_body({"kind": "unpublish", "name": name})


def test_bad_status_and_release_are_rejected() -> None:
    with pytest.raises(InvalidRequest):
        parse_body({"kind": "job_reply", "status": "maybe"})
    with pytest.raises(InvalidRequest):
        parse_body({"kind": "run", "plan": PLAN, "release": {"door": "everything"}})


def test_non_finite_floats_are_rejected() -> None:
    with pytest.raises(InvalidRequest):
        parse_body({"kind": "gateway_reply", "nodes": [{**NODE, "last_seen": float("nan")}]})
    with pytest.raises(ValidationError):
        NodeInfo.model_validate({**NODE, "last_seen": float("inf")})


def test_search_query_caps() -> None:
    assert SearchQuery().tags == []
    with pytest.raises(ValidationError):
        SearchQuery(tags=[f"#t{i}" for i in range(17)])
    with pytest.raises(ValidationError):
        SearchQuery(words=["w"] * 17)
    with pytest.raises(ValidationError):
        SearchQuery(words=["w" * 65])
    with pytest.raises(ValidationError):
        SearchQuery.model_validate({"tags": [], "sql": "drop table"})


def test_messages_are_frozen() -> None:
    body = parse_body({"kind": "unpublish", "name": "births"})
    with pytest.raises(ValidationError):
        body.name = "other"  # type: ignore[misc, union-attr]


# --- the Celery contract -----------------------------------------------------------------

def test_celery_settings_defaults() -> None:
    s = celery_settings()
    assert s["task_acks_late"] is True
    assert s["task_reject_on_worker_lost"] is True
    assert s["worker_prefetch_multiplier"] == 1
    assert "pickle" not in s["accept_content"]
    assert "pickle" not in s["result_accept_content"]
    assert s["task_serializer"] in s["accept_content"]
    assert s["result_serializer"] in s["result_accept_content"]
    assert s["task_serializer"] != "pickle" and s["result_serializer"] != "pickle"
    assert s["broker_transport_options"]["visibility_timeout"] > s["task_time_limit"]
    assert s["result_backend_transport_options"]["visibility_timeout"] > s["task_time_limit"]
    assert s["task_soft_time_limit"] < s["task_time_limit"]


@pytest.mark.parametrize("time_limit", [1.0, 10.0, 300.0, 5000.0])
def test_celery_settings_visibility_always_exceeds_time_limit(time_limit: float) -> None:
    s = celery_settings(time_limit=time_limit)
    assert s["task_time_limit"] == time_limit
    assert s["broker_transport_options"]["visibility_timeout"] > time_limit
    assert 0 < s["task_soft_time_limit"] <= time_limit


def test_celery_settings_explicit_visibility() -> None:
    s = celery_settings(time_limit=10, visibility_timeout=11, restore_interval=3)
    assert s["broker_transport_options"]["visibility_timeout"] == 11
    assert s["broker_transport_options"]["unacked_restore_interval"] == 3


@pytest.mark.parametrize("visibility", [5, 10])
def test_celery_settings_refuses_short_visibility(visibility: float) -> None:
    with pytest.raises(ValueError, match="visibility_timeout"):
        celery_settings(time_limit=10, visibility_timeout=visibility)


def test_celery_settings_returns_fresh_dicts() -> None:
    a = celery_settings()
    a["broker_transport_options"]["visibility_timeout"] = 1
    assert celery_settings()["broker_transport_options"]["visibility_timeout"] > 1


def test_queue_and_task_names() -> None:
    assert node_queue("hospital-a") == "node.hospital-a"
    assert node_queue("hospital-a") != GATEWAY_QUEUE
    names = [v for k, v in vars(Tasks).items() if k.isupper()]
    assert len(names) == len(set(names))
    assert all(n.startswith("gridq.") for n in names)


def test_a_value_left_by_claim_check_is_bound_to_its_bytes() -> None:
    from protocol.errors import BadSignature
    from protocol.messages import SealedValue

    sealed = b"\x01" * 300_000
    value = SealedValue.left("gridq:blob:" + "a" * 32, sealed)
    assert value.size == len(sealed) and value.checked(sealed) == sealed
    with pytest.raises(BadSignature, match="replaced in the broker"):
        value.checked(b"\x02" * 300_000)  # other bytes of the same size, put under the same key
    with pytest.raises(BadSignature):
        SealedValue(claim_check=value.claim_check, size=len(sealed)).checked(sealed)  # no digest: refused
