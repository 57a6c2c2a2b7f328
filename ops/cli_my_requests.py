"""``gridq my-requests``: a data scientist's own requests in the nodes' approval queues —
list them, cancel a pending one — as ``grid.requests()`` and ``grid.cancel_request(id)``
do from Python. Run as the scientist (``--identity``), with the scientist's broker user."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from ops.cli_common import role_broker
from ops.cli_output import say, show, table
from protocol.messages import RequestStatus

if TYPE_CHECKING:
    from orchestrator.grid import Grid

my_requests_app = typer.Typer(help="Your own requests in the nodes' approval queues (scientist side).",
                              no_args_is_help=True)
IDENTITY = typer.Option(..., "--identity", "-i", envvar="GRIDQ_IDENTITY",
                        help="who you are: a key file, or a name for $GRIDQ_HOME/keys/NAME.key ($GRIDQ_IDENTITY)")
BROKER = typer.Option(None, "--broker", help="Redis URL (default: $GRIDQ_HOME/broker/scientist.url, else "
                                             "$GRIDQ_BROKER)")


def _connect(identity: str, broker: str | None) -> Grid:
    from orchestrator.grid import Grid

    return Grid.connect(role_broker("scientist", broker), identity=Path(identity) if "/" in identity else identity,
                        timeout=30)


@my_requests_app.command("list")
def my_requests_list(identity: str = IDENTITY, broker: str | None = BROKER,
                     node: str = typer.Option(None, help="one node (default: every node that is up)"),
                     status: str = typer.Option(None, help="pending, approved, denied, expired or cancelled "
                                                           "(default: all)"),
                     as_json: bool = typer.Option(False, "--json", help="one JSON object per line, for scripts")
                     ) -> None:
    """Your requests waiting for (or past) an owner's decision: id, node, kind, datasets,
    release, status, when sent, and when a pending one expires (--json: every field, for scripts).
    Of every node, a node that does not answer within a few seconds is named on stderr, and the
    others' requests are listed; --node waits for that one node up to the timeout.

    Example: gridq my-requests list -i alice --status pending
    """
    import json
    from datetime import UTC, datetime

    from orchestrator.grid import REQUESTS_WAIT_SECONDS
    from protocol.contract import ALIVE_TTL_SECONDS
    from protocol.errors import GridError

    def when(t: float | None) -> str:
        return "" if t is None else datetime.fromtimestamp(t, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    try:
        with _connect(identity, broker) as grid:
            found = grid.requests(node, status)
            wait, timeout = min(grid.timeout, REQUESTS_WAIT_SECONDS), grid.timeout
    except GridError as exc:
        say(exc)
        raise typer.Exit(1) from None

    def silent() -> None:
        """The nodes that did not answer, on stderr (--json's stdout stays one request a line)."""
        if found.missing:
            typer.echo(f"not listed: {', '.join(sorted(found.missing))} did not answer within {wait:g} s (a node whose "
                       f"worker stopped in the last {ALIVE_TTL_SECONDS:g} s still counts as up, or it is busy); "
                       f"--node NAME asks one alone and waits up to {timeout:g} s", err=True)

    headers = ("id", "kind", "datasets", "release", "status", "sent (UTC)", "expires / decided (UTC)", "decision")
    rows = [(r.id, r.kind, ", ".join(r.datasets), r.release, r.status, when(r.created_at),
             when(r.expires_at if r.status == RequestStatus.PENDING else r.decided_at), r.decision) for r in found]
    if as_json:
        for r in found:
            typer.echo(json.dumps(r.model_dump(mode="json"), ensure_ascii=False))
        silent()
        return
    from rich.markup import escape

    shown = table(*headers, whole=("id",))
    for row in rows:
        shown.add_row(*map(escape, row))
    where = f" at {node}" if node else " at the nodes that answered" if found.missing else ""
    show(shown if rows else "no requests" + (f" {status}" if status else "") + where)
    silent()


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
