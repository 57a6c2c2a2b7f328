"""What runs at the data owner: the node and its worker (``node``, ``worker``, ``tasks``,
``config``), its release policy (``workers.policy``), its jobs (``workers.jobs``), its
storage (``workers.storage``) and its MPC worker (``workers.mpc``)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what type checkers see; at run time, __getattr__ below
    from workers.config import NodeConfig, load_config
    from workers.node import Node

_HOMES = {"Node": "workers.node", "NodeConfig": "workers.config", "load_config": "workers.config"}
__all__ = ["Node", "NodeConfig", "load_config"]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'workers' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)
