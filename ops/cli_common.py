"""What the ``gridq`` commands share: the node an owner's command acts on (``CONFIG``,
:func:`owner_node`) and the broker user a command logs in as (:func:`broker_option`,
:func:`role_broker`)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from ops.cli_output import say

if TYPE_CHECKING:
    from workers import Node

CONFIG = typer.Argument(..., help="the node's TOML config, or a node name for $GRIDQ_HOME/nodes/NAME.toml "
                                  "(where `gridq up` writes its nodes' configs)")


@contextmanager
def owner_node(config: str | Path) -> Iterator[Node]:
    """The node's admin API for an owner's command; a GridError ends it with its message."""
    from protocol.errors import GridError
    from workers import Node

    try:
        node = Node.from_config(config)
    except GridError as exc:
        say(exc)
        raise typer.Exit(1) from None
    try:
        yield node
    except GridError as exc:
        say(exc)
        raise typer.Exit(1) from None
    finally:
        node.close()


def broker_option(role: str) -> str | None:
    return typer.Option(None, "--broker", help=f"Redis URL (default: the {role} broker user's, "
                                               f"$GRIDQ_HOME/broker/{role}.url, else $GRIDQ_BROKER)")


def role_broker(role: str, broker: str | None) -> str:
    """The broker URL a command acting as ``role`` logs in with: ``--broker``, else the role's
    URL file in the home (`gridq up`, `gridq acl init` and compose's init write them: e.g.
    the operator's view needs Flower's user, which may ping workers), else $GRIDQ_BROKER."""
    from ops.broker_users import role_url

    url = broker or role_url(home_dir(), role) or os.environ.get("GRIDQ_BROKER")
    if not url:
        from protocol.errors import InvalidRequest

        raise InvalidRequest("which grid? pass --broker URL, or export GRIDQ_HOME (or GRIDQ_BROKER) as "
                             "`gridq up` prints")
    return url


def home_dir() -> Path:
    from protocol.contract import gridq_home

    return gridq_home()
