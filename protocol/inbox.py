"""Screening what a worker takes off its queue, before kombu or Celery read any of it.

A queue is a Redis list: whoever may push onto it may push any bytes. kombu and Celery take
what they pop for a message a peer of theirs wrote — JSON of one shape, headers of the
right types — and anything else raises inside the consumer, where Celery stops the worker
("Unrecoverable error"). Worse, a message that fails only once Celery reads it is already
in kombu's ``unacked`` hash, so it is put back and kills the worker again after every
restart.

So a worker screens each item it pops (:func:`screen`), and what passes is **rebuilt**:
kombu and Celery only ever see a message whose every field gridq wrote — a task name this
worker serves, an id, one payload argument. What else the sender set (time limits, ETA,
expiry, retries, callbacks, chords, priorities) is dropped: the worker's own limits
decide. What fails is :class:`Junk`, which the worker puts on its bounded dead-letter list
with the reason, and it goes on serving. A payload that passes is not trusted yet: it is
an envelope the role verifies next (``protocol.serving``).

Each delivery is counted *in the rebuilt message* (:data:`DELIVERY`): kombu keeps that very
copy in ``unacked`` and puts it back when a worker dies mid-job, so the count survives
what it counts. A message delivered more than ``max_deliveries`` times — its worker died
each time, say killed for memory — is :attr:`Admitted.given_up`: dead-lettered, and
answered with a typed failure instead of being run again.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import msgpack

MAX_ITEM_BYTES = 4 * 1024 * 1024  # values above 256 KB travel by claim-check: a message is far smaller
DELIVERY = "gridq_delivery"  # header: how many times this message has been delivered, this time included
GIVEN_UP = "gridq_given_up"  # header: set on the delivery past the limit; the task answers a failure
DEFAULT_MAX_DELIVERIES = 3
ARGSREPR_CHARS = 1024  # what Flower shows of a task's arguments: the sender's summary, cut as Celery cuts it
_ID = re.compile(r"[A-Za-z0-9_.:\-]{1,100}")
_CODECS = {"application/json": "utf-8", "application/x-msgpack": "binary"}  # what gridq sends, nothing else


@dataclass(frozen=True)
class Junk:
    """An item that is not a gridq message, and why (for the dead-letter list)."""

    reason: str


@dataclass(frozen=True)
class Admitted:
    """A message rebuilt from the parts of an item that passed."""

    message: dict[str, Any]  # kombu's message dict, as gridq rebuilt it
    task: str
    id: str
    delivery: int
    given_up: bool


class _Refused(Exception):
    pass


def screen(item: bytes | str, queue: str, tasks: Collection[str], tag: str,
           max_deliveries: int = DEFAULT_MAX_DELIVERIES) -> Admitted | Junk:
    """The item popped from ``queue`` rebuilt as a message for one of ``tasks`` (``tag``
    becomes its delivery tag), or why it is junk. Total: it returns for any input."""
    try:
        return _screen(item, queue, tasks, tag, max_deliveries)
    except _Refused as why:
        return Junk(str(why))
    except RecursionError:
        return Junk("nested too deeply")
    except Exception as exc:  # noqa: BLE001 — a worker must survive any item; the reason names what broke
        return Junk(f"unreadable ({type(exc).__name__})")


def _screen(item: bytes | str, queue: str, tasks: Collection[str], tag: str, max_deliveries: int) -> Admitted:
    if len(item) > MAX_ITEM_BYTES:
        raise _Refused(f"{len(item)} bytes; a message is at most {MAX_ITEM_BYTES}")
    try:
        outer = json.loads(item)
    except (ValueError, UnicodeDecodeError):
        raise _Refused("not JSON") from None
    outer = _expect(outer, dict, "the message")
    headers = _expect(outer.get("headers"), dict, "headers")
    properties = _expect(outer.get("properties"), dict, "properties")
    task = headers.get("task")
    if not isinstance(task, str) or task not in tasks:
        raise _Refused(f"task {_shown(task)} is not served here; this worker serves {', '.join(sorted(tasks))}")
    job_id = headers.get("id")
    if not isinstance(job_id, str) or not _ID.fullmatch(job_id):
        raise _Refused(f"task id {_shown(job_id)} is not an id")
    content_type = outer.get("content-type")
    if content_type not in _CODECS or outer.get("content-encoding") != _CODECS[content_type]:
        raise _Refused(f"content type {_shown(content_type)} / encoding {_shown(outer.get('content-encoding'))} "
                       f"is not one gridq sends ({', '.join(_CODECS)})")
    if properties.get("body_encoding") != "base64":
        raise _Refused("body is not base64-encoded (kombu's Redis transport always encodes it)")
    args = _payload_args(_decode(outer.get("body"), content_type))
    previous = headers.get(DELIVERY)
    delivery = (previous if type(previous) is int and previous >= 0 else 0) + 1
    given_up = delivery > max_deliveries
    body = _encode([args, {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}], content_type)
    rebuilt_headers: dict[str, Any] = {
        "lang": "py", "task": task, "id": job_id, "shadow": None, "eta": None, "expires": None, "group": None,
        "group_index": None, "retries": 0, "timelimit": [None, None], "root_id": job_id, "parent_id": None,
        "argsrepr": _text(headers.get("argsrepr"), ARGSREPR_CHARS), "kwargsrepr": "{}",
        "origin": _text(headers.get("origin"), 100),
        "ignore_result": False, "replaced_task_nesting": 0, "stamped_headers": None, "stamps": {},
        DELIVERY: delivery,
    }
    if given_up:
        rebuilt_headers[GIVEN_UP] = True
    message = {
        "body": base64.b64encode(body).decode("ascii"), "content-encoding": _CODECS[content_type],
        "content-type": content_type, "headers": rebuilt_headers,
        "properties": {"correlation_id": job_id, "reply_to": None, "delivery_mode": 2,
                       "delivery_info": {"exchange": "", "routing_key": queue}, "priority": 0,
                       "body_encoding": "base64", "delivery_tag": tag},
    }
    return Admitted(message, task, job_id, delivery, given_up)


def _decode(body: object, content_type: str) -> object:
    if not isinstance(body, str):
        raise _Refused("body is not a string")
    try:
        data = base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise _Refused("body is not valid base64") from None
    try:
        if content_type == "application/json":
            return json.loads(data)
        return msgpack.unpackb(data, raw=False, strict_map_key=True,
                               ext_hook=_no_extensions)
    except _Refused:
        raise
    except (ValueError, msgpack.UnpackException):
        raise _Refused(f"body is not {content_type}") from None


def _no_extensions(code: int, data: bytes) -> object:
    raise _Refused(f"msgpack extension type {code} is not accepted")


def _payload_args(decoded: object) -> list[Any]:
    """Celery's body ``[args, kwargs, embed]`` → the task's arguments: at most one, the payload."""
    if not isinstance(decoded, list | tuple) or len(decoded) != 3:
        raise _Refused("body is not Celery's [args, kwargs, embed]")
    args, kwargs, _ = decoded
    args = _expect(args, list, "args")
    kwargs = _expect(kwargs, dict, "kwargs")
    if set(kwargs) - {"payload"} or len(args) + len(kwargs) > 1:
        raise _Refused("a gridq task takes one argument, its payload")
    return [*args, *kwargs.values()]


def _encode(body: list[Any], content_type: str) -> bytes:
    try:
        if content_type == "application/json":
            return json.dumps(body, allow_nan=False).encode()
        return bytes(msgpack.packb(body, use_bin_type=True))
    except (TypeError, ValueError, OverflowError):
        raise _Refused(f"payload cannot be written back as {content_type}") from None


def _expect(value: object, kind: type, what: str) -> Any:
    if not isinstance(value, kind):
        raise _Refused(f"{what} is {type(value).__name__}, not {kind.__name__}")
    return value


def _text(value: object, limit: int) -> str:
    return value[:limit] if isinstance(value, str) else ""


def _shown(value: object) -> str:
    """A value for a reason: short, whatever its type."""
    return repr(value)[:60]
