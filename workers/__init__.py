"""What runs at the data owner: the node worker, its store, its policy and its config."""

from workers.config import NodeConfig, load_config
from workers.node import Node

__all__ = ["Node", "NodeConfig", "load_config"]
