"""``gridq my-requests``: a data scientist's own requests in the nodes' approval queues —
list them, cancel a pending one — as ``grid.requests()`` and ``grid.cancel_request(id)``
do from Python. Run as the scientist (``--identity``), with the scientist's broker user."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from ops.cli_records import say

if TYPE_CHECKING:
    from orchestrator.grid import Grid

my_requests_app = typer.Typer(help="Your own requests in the nodes' approval queues (scientist side).",
                              no_args_is_help=True)
IDENTITY = typer.Option(..., "--identity", "-i", envvar="GRIDQ_IDENTITY",
                        help="who you are: a key file, or a name for $GRIDQ_HOME/keys/NAME.key ($GRIDQ_IDENTITY)")
BROKER = typer.Option(None, "--broker", help="Redis URL (default: $GRIDQ_HOME/broker/scientist.url, else "
                                             "$GRIDQ_BROKER)")


def _connect(identity: str, broker: str | None) -> Grid:
    from ops.broker_users import role_url
    from orchestrator.grid import Grid
    from protocol.contract import gridq_home

    return Grid.connect(broker or role_url(gridq_home(), "scientist") or os.environ.get("GRIDQ_BROKER"),
                        identity=Path(identity) if "/" in identity else identity, timeout=30)


@my_requests_app.command("list")
def my_requests_list(identity: str = IDENTITY, broker: str | None = BROKER,
                     node: str = typer.Option(None, help="one node (default: every node that is up)"),
                     status: str = typer.Option(None, help="pending, approved, denied, expired or cancelled "
                                                           "(default: all)")) -> None:
    """Your requests waiting for (or past) an owner's decision: id, node, kind, datasets,
    release, status, when sent, and when a pending one expires. Tab-separated when piped.

    Example: gridq my-requests list -i alice --status pending
    """
    from datetime import UTC, datetime

    from protocol.errors import GridError

    def when(t: float | None) -> str:
        return "" if t is None else datetime.fromtimestamp(t, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    try:
        with _connect(identity, broker) as grid:
            found = grid.requests(node, status)
    except GridError as exc:
        say(exc)
        raise typer.Exit(1) from None
    headers = ("id", "kind", "datasets", "release", "status", "sent (UTC)", "expires / decided (UTC)", "decision")
    rows = [(r.id, r.kind, ", ".join(r.datasets), r.release, r.status, when(r.created_at),
             when(r.expires_at if r.status == "pending" else r.decided_at), r.decision) for r in found]
    if not sys.stdout.isatty():
        typer.echo("\t".join(headers))
        for row in rows:
            typer.echo("\t".join(v.replace("\t", " ").replace("\n", " ") for v in row))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table()
    table.add_column("id", no_wrap=True, min_width=41)
    for column in headers[1:]:
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    Console().print(table if rows else "no requests")


@my_requests_app.command("cancel")
def my_requests_cancel(request_id: str = typer.Argument(..., help="the request's id (its ticket's: node:hex)"),
                       identity: str = IDENTITY, broker: str | None = BROKER) -> None:
    """Withdraw one of your pending requests: it never runs, and its ticket raises JobCancelled.

    Example: gridq my-requests cancel hospital:9f3c0e5b7d4e1f8a6b2c9d0e1f2a3b4c -i alice
    """
    from protocol.errors import GridError

    try:
        with _connect(identity, broker) as grid:
            request = grid.cancel_request(request_id)
    except GridError as exc:
        say(exc)
        raise typer.Exit(1) from None
    typer.echo(f"cancelled {request.id} ({request.kind} on {', '.join(request.datasets)}): it will not run")
