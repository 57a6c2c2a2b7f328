"""The data scientist's side of gridq: ``Grid``, pointers, tickets (and the gateway worker)."""

from orchestrator.grid import Grid
from orchestrator.pointer import DataPointer, Expression, cat, stack
from orchestrator.ticket import JobTicket
from protocol.messages import DPConfig

__all__ = ["DPConfig", "DataPointer", "Expression", "Grid", "JobTicket", "cat", "stack"]
