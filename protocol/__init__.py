"""gridq's common language: identities, envelopes, messages, tensors, plans and errors.

Pure: nothing here does I/O or imports Celery, Redis or SQLAlchemy.
"""

from protocol import errors
from protocol.codec import decode_tensor, encode_tensor
from protocol.contract import Tasks, celery_settings, node_queue
from protocol.envelope import PROTOCOL_VERSION, Envelope, MemoryNonceStore, open_envelope, seal_envelope
from protocol.identity import Identity, PublicIdentity
from protocol.messages import DatasetMeta, JobReply, PointerTicket, RunJob, parse_body
from protocol.plan import InputRef, Plan, Step, TensorSpec, evaluate, validate

__all__ = [
    "PROTOCOL_VERSION", "DatasetMeta", "Envelope", "Identity", "InputRef", "JobReply",
    "MemoryNonceStore", "Plan", "PointerTicket", "PublicIdentity", "RunJob", "Step", "Tasks",
    "TensorSpec", "celery_settings", "decode_tensor", "encode_tensor", "errors", "evaluate",
    "node_queue", "open_envelope", "parse_body", "seal_envelope", "validate",
]
