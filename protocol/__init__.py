"""gridq's common language: identities, envelopes, messages, tensors, plans and errors.

Pure: nothing here does I/O or imports Celery, Redis or SQLAlchemy. The names below load
their module when first used, so that a process that only carries messages (the gateway,
the CLI) does not load torch with the tensor codec and the plan interpreter.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "errors": "protocol.errors",
    "decode_tensor": "protocol.codec", "encode_tensor": "protocol.codec",
    "Tasks": "protocol.contract", "celery_settings": "protocol.contract", "node_queue": "protocol.contract",
    "PROTOCOL_VERSION": "protocol.envelope", "Envelope": "protocol.envelope",
    "MemoryNonceStore": "protocol.envelope", "open_envelope": "protocol.envelope",
    "seal_envelope": "protocol.envelope",
    "Identity": "protocol.identity", "PublicIdentity": "protocol.identity",
    "DatasetMeta": "protocol.messages", "JobReply": "protocol.messages", "PointerTicket": "protocol.messages",
    "RunJob": "protocol.messages", "parse_body": "protocol.messages",
    "InputRef": "protocol.plan", "Plan": "protocol.plan", "Step": "protocol.plan", "TensorSpec": "protocol.plan",
    "evaluate": "protocol.interpret", "validate": "protocol.interpret",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'protocol' has no attribute {name!r}")
    module = importlib.import_module(_HOMES[name])
    return module if name == "errors" else getattr(module, name)
