"""The wire contract, published: JSON Schema for every message, envelope and reply, an index
of tasks, queues, error codes and limits, and test vectors — generated from the code into
``protocol/schema/v1/``; what the schemas cannot say (the signed bytes, sealing, tensors,
fixed point) is ``protocol/schema/SPEC.md``.

    python -m protocol.schema --write    # regenerate the folder after changing a wire model
    python -m protocol.schema --check    # exit 1, naming the files that drifted from the models

:func:`documents` is pure; only the command above reads or writes files.
"""

from __future__ import annotations

from pathlib import Path

from protocol.schema.generate import CHECK_COMMAND, VERSION, WRITE_COMMAND, documents

__all__ = ["CHECK_COMMAND", "SCHEMA_DIR", "VERSION", "WRITE_COMMAND", "documents"]

SCHEMA_DIR = Path(__file__).parent / VERSION  # where the generated files are checked in
