"""The data scientist's side of gridq: ``Grid``, pointers, tickets, federated training and
encrypted queries (the gateway worker is in ``workers.gateway``).

The names below load their module when first used: ``import orchestrator`` (a CLI command
that needs only the transport, say) does not load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time, __getattr__ below
    from orchestrator.evaluation import Evaluation
    from orchestrator.fl import FitResult, ModelPointer
    from orchestrator.grid import Grid, RequestList
    from orchestrator.history import RoundRecord, RoundSummary
    from orchestrator.pointer import DataPointer, Expression, JobTicket, cat, stack
    from orchestrator.releases import PrivateValue
    from orchestrator.strategies import FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg, Krum, NodeUpdate, Strategy
    from protocol.messages import BudgetInfo, DPConfig, TrainConfig, TrainMetrics
    from protocol.mpc.wire import ModelCard

_HOMES = {
    "Grid": "orchestrator.grid", "RequestList": "orchestrator.grid",
    "DataPointer": "orchestrator.pointer", "Expression": "orchestrator.pointer",
    "cat": "orchestrator.pointer", "stack": "orchestrator.pointer",
    "JobTicket": "orchestrator.pointer", "PrivateValue": "orchestrator.releases",
    "FitResult": "orchestrator.fl", "ModelPointer": "orchestrator.fl",
    "Evaluation": "orchestrator.evaluation",
    "RoundRecord": "orchestrator.history", "RoundSummary": "orchestrator.history",
    **{name: "protocol.messages" for name in ("DPConfig", "TrainConfig", "TrainMetrics", "BudgetInfo")},
    "ModelCard": "protocol.mpc.wire",
    **{name: "orchestrator.strategies" for name in ("FedAvg", "FedProx", "FedAdam", "FedMedian", "FedTrimmedAvg",
                                                     "Krum", "NodeUpdate", "Strategy")},
}
__all__ = ["BudgetInfo", "DPConfig", "DataPointer", "Evaluation", "Expression", "FedAdam", "FedAvg", "FedMedian",
           "FedProx", "FedTrimmedAvg", "FitResult", "Grid", "JobTicket", "Krum", "ModelCard", "ModelPointer",
           "NodeUpdate", "PrivateValue", "RequestList", "RoundRecord", "RoundSummary", "Strategy", "TrainConfig",
           "TrainMetrics", "cat", "stack"]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'orchestrator' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)
