"""The published wire contract, generated: one JSON Schema per message type of
:mod:`protocol.schema.catalogue`, an index (tasks, queues, error codes, limits), the plan
operations' parameters, and test vectors (:mod:`protocol.schema.vectors`).

Pure and deterministic: :func:`documents` returns the folder's files as text (sorted keys,
two-space indent, a trailing newline), so the same models always give the same bytes and a
drift between the models and the checked-in files is a plain text difference. Writing and
checking the folder is ``python -m protocol.schema`` (:mod:`protocol.schema.__main__`).
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, TypeAdapter

from protocol import contract
from protocol.envelope import CLOCK_SKEW_SECONDS, MAX_BODY_CHARS, MAX_TTL_SECONDS, PROTOCOL_VERSION
from protocol.errors import ERRORS_BY_CODE, GridError
from protocol.identity import _PREFIX as PUBLIC_KEY_PREFIX
from protocol.listing import LISTING_EVERY_SECONDS, LISTING_MAX_AGE_SECONDS
from protocol.messages import _METRICS_PADDED as METRICS_PADDED_BYTES
from protocol.mpc.cards import QUERY_TTL_SECONDS
from protocol.schema.catalogue import MESSAGES, NODE, WireType

VERSION = "v1"  # the folder's name; a new major protocol version gets a folder of its own
JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"  # what pydantic generates
WRITE_COMMAND = "python -m protocol.schema --write"
CHECK_COMMAND = "python -m protocol.schema --check"
GENERATED = f"generated from the pydantic models in protocol/ by `{WRITE_COMMAND}`: do not edit"


def render(document: Any) -> str:
    """The one text form of every generated file: byte-stable whatever built the dict."""
    return json.dumps(document, sort_keys=True, indent=2, ensure_ascii=False) + "\n"


def json_schema(wire: WireType) -> dict[str, Any]:
    """The schema of what a receiver accepts (pydantic's validation mode): a field with a
    default may be left out, although Python senders always write every field."""
    if isinstance(wire.type, type) and issubclass(wire.type, BaseModel):
        schema = wire.type.model_json_schema()
    else:
        schema = TypeAdapter(wire.type).json_schema()
    return {**schema, "$schema": JSON_SCHEMA_DIALECT, "$comment": GENERATED, "title": wire.name}


def kinds_of(wire: WireType) -> list[str]:
    """The envelope ``kind`` values a message type is sent under (several for a union)."""
    schema = json_schema(wire)
    mapping = schema.get("discriminator", {}).get("mapping")
    if mapping is not None:
        return sorted(mapping)
    kind = schema.get("properties", {}).get("kind", {}).get("const")
    return [kind] if isinstance(kind, str) else []


def index() -> dict[str, Any]:
    """What a second implementation looks up: every message's file and route, the tasks,
    the error codes, the limits and the Redis keys — all read from the code."""
    messages = {}
    for wire in MESSAGES:
        entry: dict[str, Any] = {"file": f"{wire.name}.json", "carried": wire.carried, "kinds": kinds_of(wire)}
        entry.update({k: v for k, v in (("sender", wire.sender), ("recipient", wire.recipient), ("task", wire.task),
                                        ("queue", wire.queue), ("reply", wire.reply)) if v})
        messages[wire.name] = entry
    return {
        "$comment": GENERATED,
        "version": VERSION,
        "protocol_version": PROTOCOL_VERSION,
        "commands": {"write": WRITE_COMMAND, "check": CHECK_COMMAND},
        "documents": {"spec": "../SPEC.md", "vectors": "vectors.json", "plan_operations": "plan_operations.json"},
        "messages": messages,
        "tasks": tasks(),
        "errors": errors(),
        "limits": limits(),
        "redis_keys": redis_keys(),
    }


def tasks() -> dict[str, Any]:
    """Each task name: its queue, what its one argument is, and what it answers."""
    out: dict[str, Any] = {}
    for wire in MESSAGES:
        if wire.task is None:
            continue
        argument = "SearchQuery (unsigned)" if wire.name == "SearchQuery" else "Envelope"
        entry = out.setdefault(wire.task, {"queue": wire.queue, "argument": argument, "reply": f"Envelope of "
                                           f"{wire.reply}", "bodies": []})
        entry["bodies"].append(wire.name)
    # the gateway's node list takes no argument: it is the only message with no type of its own
    out[contract.Tasks.NODES] = {"queue": contract.GATEWAY_QUEUE, "argument": None,
                                 "reply": "Envelope of GatewayReply", "bodies": []}
    return out


def errors() -> dict[str, Any]:
    """Each wire error code: its Python class, the class it specialises, whether it is
    worth retrying. An unknown code is read as the root, ``grid_error``."""
    out = {}
    for code, cls in ERRORS_BY_CODE.items():
        parent = cls.__mro__[1]
        out[code] = {"class": cls.__name__, "retryable": cls.retryable,
                     "parent": parent.code if issubclass(parent, GridError) else None}
    return out


def limits() -> dict[str, Any]:
    from protocol.codec import MAX_ELEMENTS  # loads torch: only the generator needs it

    return {
        "public_key_prefix": PUBLIC_KEY_PREFIX,
        "envelope_body_max_chars": MAX_BODY_CHARS,
        "envelope_max_ttl_seconds": MAX_TTL_SECONDS,
        "clock_skew_seconds": CLOCK_SKEW_SECONDS,
        "reply_ttl_seconds": contract.RESULT_TTL_SECONDS,
        "node_message_ttl_seconds": contract.NODE_MESSAGE_TTL_SECONDS,
        "mpc_query_ttl_seconds": QUERY_TTL_SECONDS,
        "listing_max_age_seconds": LISTING_MAX_AGE_SECONDS,
        "listing_every_seconds": LISTING_EVERY_SECONDS,
        "claim_check_threshold_bytes": contract.CLAIM_CHECK_THRESHOLD,
        "claim_check_ttl_seconds": contract.CLAIM_CHECK_TTL_SECONDS,
        "sealed_metrics_padded_bytes": METRICS_PADDED_BYTES,
        "tensor_max_elements": MAX_ELEMENTS,
        "tensor_dtypes": tensor_dtypes(),
    }


def tensor_dtypes() -> dict[str, str]:
    """Each allowed dtype's name on the wire (plans, metadata) → its safetensors name, as the
    codec writes it (read back from an empty tensor's header, so it is what really travels)."""
    import torch

    from protocol.codec import ALLOWED_DTYPES, encode_tensor

    out = {}
    for name, dtype in ALLOWED_DTYPES.items():
        data = encode_tensor(torch.zeros(0, dtype=dtype))
        header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
        out[name] = header["t"]["dtype"]
    return out


def redis_keys() -> dict[str, str]:
    """The Redis keys a client reads or writes besides queues (placeholders in braces)."""
    return {
        "gateway_identity": contract.GATEWAY_IDENTITY_KEY,
        "gateway_nodes": contract.GATEWAY_NODES_KEY,
        "mpc_models": contract.MPC_MODELS_KEY,
        "claim_check": contract.CLAIM_CHECK_PREFIX + "{id}",
        "alive": contract.alive_key("{queue}"),
        "sent": contract.sent_key("{job_id}"),
        "dead_letters": contract.dead_letter_key("{queue}"),
        "node_queue": contract.node_queue(NODE),
        "mpc_queue": contract.mpc_queue(NODE),
        "mpc_peer_queue": contract.mpc_peer_queue(NODE),
        "gateway_queue": contract.GATEWAY_QUEUE,
    }


def plan_operations() -> dict[str, Any]:
    """The allow-list a plan's steps are checked against: each op's number of positional
    arguments, whether they must be tensors, and the JSON Schema of its ``params``."""
    from protocol.ops import REGISTRY  # loads torch: only the generator needs it

    return {
        "$comment": GENERATED,
        "description": "Plan operations: a Step's `op` must be one of these; `args` holds between arity[0] and "
                       "arity[1] references or constants (tensors only where tensors_only); `params` must "
                       "validate against `params`.",
        "operations": {name: {"arity": list(spec.arity), "tensors_only": spec.tensors_only,
                              "params": spec.params.model_json_schema(), **({"doc": spec.doc} if spec.doc else {})}
                       for name, spec in sorted(REGISTRY.items())},
    }


def documents() -> dict[str, str]:
    """Every file of ``protocol/schema/<VERSION>/``, by name, as its exact text."""
    from protocol.schema.vectors import vectors

    files = {f"{wire.name}.json": render(json_schema(wire)) for wire in MESSAGES}
    files["index.json"] = render(index())
    files["plan_operations.json"] = render(plan_operations())
    files["vectors.json"] = render(vectors())
    return files
