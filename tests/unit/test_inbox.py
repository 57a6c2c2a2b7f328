"""The screen between a worker's queue and kombu (protocol.inbox): junk of any shape is
refused with a reason, a message that passes is rebuilt from checked parts only, and each
delivery is counted in the message itself."""

from __future__ import annotations

import base64
import json
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.inbox import DELIVERY, GIVEN_UP, MAX_ITEM_BYTES, Admitted, Junk, screen

TASKS = ("gridq.node.run_job",)
QUEUE = "node.hospital"
PAYLOAD = {"sender": "alice", "kind": "job", "job_id": "j1", "body": "{}"}


def message(payload: Any = PAYLOAD, *, content_type: str = "application/x-msgpack",
            **headers: Any) -> dict[str, Any]:
    """A message as Celery 5 writes it to Redis (captured from ``send_task``)."""
    body = [[payload], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
    data = msgpack.packb(body) if content_type == "application/x-msgpack" else json.dumps(body).encode()
    return {
        "body": base64.b64encode(data).decode(), "content-type": content_type,
        "content-encoding": "binary" if content_type == "application/x-msgpack" else "utf-8",
        "headers": {"lang": "py", "task": TASKS[0], "id": "0be98226-bb13-4c48-a29d-261d6d227021", "shadow": None,
                    "eta": None, "expires": None, "group": None, "group_index": None, "retries": 0,
                    "timelimit": [None, None], "root_id": "0be98226-bb13-4c48-a29d-261d6d227021",
                    "parent_id": None, "argsrepr": "[{...}]", "kwargsrepr": "{}", "origin": "gen5178@vm",
                    "ignore_result": None, "replaced_task_nesting": 0, "stamped_headers": None, "stamps": {},
                    **headers},
        "properties": {"correlation_id": "0be98226-bb13-4c48-a29d-261d6d227021", "reply_to": "853cc6e6",
                       "delivery_mode": 2, "delivery_info": {"exchange": "", "routing_key": QUEUE}, "priority": 0,
                       "body_encoding": "base64", "delivery_tag": "70722759"},
    }


def item(msg: Any) -> bytes:
    return json.dumps(msg).encode()


def admit(raw: bytes, max_deliveries: int = 3) -> Admitted:
    verdict = screen(raw, QUEUE, TASKS, "tag-1", max_deliveries)
    assert isinstance(verdict, Admitted), verdict
    return verdict


def args_of(admitted: Admitted) -> list[Any]:
    msg = admitted.message
    data = base64.b64decode(msg["body"])
    body = msgpack.unpackb(data) if msg["content-type"] == "application/x-msgpack" else json.loads(data)
    return body[0]


@pytest.mark.parametrize("content_type", ["application/x-msgpack", "application/json"])
def test_a_celery_message_passes_with_its_payload(content_type: str):
    admitted = admit(item(message(content_type=content_type)))
    assert args_of(admitted) == [PAYLOAD]
    assert admitted.task == TASKS[0] and admitted.delivery == 1 and not admitted.given_up
    props = admitted.message["properties"]
    assert props["delivery_tag"] == "tag-1" and props["delivery_info"] == {"exchange": "", "routing_key": QUEUE}


def test_what_the_sender_should_not_decide_is_dropped():
    """A client's time limit, ETA, expiry, callbacks and chord are not the worker's rules."""
    msg = message(timelimit=[10_000, 9_000], eta="2030-01-01T00:00:00", expires=1.0, retries=7, group="g")
    body = [[PAYLOAD], {}, {"callbacks": [{"task": "celery.chord_unlock"}], "errbacks": None, "chain": [{"x": 1}],
                            "chord": {"task": "evil"}}]
    msg["body"] = base64.b64encode(msgpack.packb(body)).decode()
    admitted = admit(item(msg))
    headers = admitted.message["headers"]
    assert headers["timelimit"] == [None, None] and headers["eta"] is None and headers["expires"] is None
    assert headers["retries"] == 0 and headers["group"] is None
    embed = msgpack.unpackb(base64.b64decode(admitted.message["body"]))[2]
    assert embed == {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def test_payload_given_by_keyword_is_the_one_argument():
    msg = message()
    msg["body"] = base64.b64encode(msgpack.packb([[], {"payload": PAYLOAD}, {}])).decode()
    assert args_of(admit(item(msg))) == [PAYLOAD]


def test_each_delivery_is_counted_in_the_message_and_the_one_past_the_limit_is_given_up():
    raw = item(message())
    seen = []
    for _ in range(4):  # kombu stores the rebuilt message in `unacked` and restores that copy
        admitted = admit(raw, max_deliveries=3)
        seen.append((admitted.delivery, admitted.given_up, admitted.message["headers"].get(GIVEN_UP, False)))
        raw = item(admitted.message)
    assert seen == [(1, False, False), (2, False, False), (3, False, False), (4, True, True)]


def test_a_forged_count_cannot_make_a_message_live_longer():
    for forged in (-5, "0", 1.5, None, True, [0]):
        assert admit(item(message(**{DELIVERY: forged}))).delivery == 1


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _with(path: tuple[str, ...], value: Any) -> bytes:
    msg = message()
    target = msg
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return item(msg)


JUNK: dict[str, bytes] = {
    "random bytes": bytes(range(256)) * 3,
    "empty": b"",
    "a JSON list": b"[1, 2, 3]",
    "a JSON number": b"5",
    "not UTF-8": b'{"body": "\xff\xfe"}',
    "body not base64": _with(("body",), "%%% not base64 %%%"),
    "body a number": _with(("body",), 5),
    "JSON body of 5": json.dumps({**message(content_type="application/json"), "body": _b64(b"5")}).encode(),
    "msgpack body of 5": _with(("body",), _b64(msgpack.packb(5))),
    "msgpack body truncated": _with(("body",), _b64(msgpack.packb([[PAYLOAD], {}, {}])[:-3])),
    "msgpack extension": _with(("body",), _b64(msgpack.packb([[msgpack.ExtType(5, b"x")], {}, {}]))),
    "two arguments": _with(("body",), _b64(msgpack.packb([[1, 2], {}, {}]))),
    "an unknown keyword": _with(("body",), _b64(msgpack.packb([[], {"evil": 1}, {}]))),
    "args a dict": _with(("body",), _b64(msgpack.packb([{"a": 1}, {}, {}]))),
    "headers a list": _with(("headers",), ["task", "id"]),
    "properties missing": json.dumps({k: v for k, v in message().items() if k != "properties"}).encode(),
    "id a dict": _with(("headers", "id"), {"$gt": ""}),
    "id too long": _with(("headers", "id"), "x" * 500),
    "unknown task": _with(("headers", "task"), "celery.chord_unlock"),
    "task a list": _with(("headers", "task"), [TASKS[0]]),
    "pickle": _with(("content-type",), "application/x-python-serialize"),
    "encoding lies": _with(("content-encoding",), "utf-16"),
    "body not base64-encoded": _with(("properties", "body_encoding"), "identity"),
    "too big": b'{"body": "' + b"A" * (MAX_ITEM_BYTES + 1) + b'"}',
    "nested deeply": b"[" * 100_000 + b"]" * 100_000,
    "msgpack nested deeply": _with(("body",), _b64(b"\x91" * 50_000 + b"\xc0")),
}


@pytest.mark.parametrize("name", sorted(JUNK))
def test_junk_is_refused_with_a_reason(name: str):
    verdict = screen(JUNK[name], QUEUE, TASKS, "tag", 3)
    assert isinstance(verdict, Junk), verdict
    assert verdict.reason and len(verdict.reason) < 300


def test_the_reason_names_the_problem():
    assert "celery.chord_unlock" in screen(JUNK["unknown task"], QUEUE, TASKS, "t").reason  # type: ignore[union-attr]
    assert "not JSON" in screen(JUNK["random bytes"], QUEUE, TASKS, "t").reason  # type: ignore[union-attr]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_any_bytes_get_a_verdict(raw: bytes):
    assert isinstance(screen(raw, QUEUE, TASKS, "t"), Admitted | Junk)


JSONISH = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                       lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                   max_size=4), max_leaves=20)
FIELDS = [("body",), ("content-type",), ("content-encoding",), ("headers",), ("properties",), ("headers", "task"),
          ("headers", "id"), ("headers", "timelimit"), ("headers", DELIVERY), ("properties", "body_encoding"),
          ("properties", "delivery_info")]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(FIELDS), JSONISH), min_size=1, max_size=4),
       st.sampled_from(["application/x-msgpack", "application/json"]))
def test_a_mutated_message_is_refused_or_rebuilt_whole(mutations: list[tuple[tuple[str, ...], Any]],
                                                       content_type: str):
    msg = message(content_type=content_type)
    for path, value in mutations:
        target = msg
        for key in path[:-1]:
            target = target[key] if isinstance(target.get(key), dict) else target.setdefault(key, {})
            if not isinstance(target, dict):
                break
        else:
            target[path[-1]] = value
    verdict = screen(json.dumps(msg).encode(), QUEUE, TASKS, "t")
    if isinstance(verdict, Admitted):  # what passes is gridq's own shape, and passes again
        again = screen(item(verdict.message), QUEUE, TASKS, "t")
        assert isinstance(again, Admitted) and again.delivery == verdict.delivery + 1
        assert args_of(again) == args_of(verdict)
        assert verdict.message["headers"]["timelimit"] == [None, None]
