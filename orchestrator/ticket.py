"""Job tickets: the handle a data scientist holds on a job while it runs at a node.

They live in :mod:`orchestrator.pointer`, beside the pointers — a pointer's ``submit()`` is a
ticket and a ticket's ``result()`` a pointer — and are importable from here as before.
"""

from orchestrator.pointer import JobTicket
from orchestrator.releases import PrivateValue

__all__ = ["JobTicket", "PrivateValue"]
