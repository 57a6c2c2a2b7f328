"""``gridq audit``: a node's audit trail for a compliance officer — every release (raw,
approved, differentially private) and every decision of its approval queue, from the node
database (``workers.audit``), as CSV or JSON Lines."""

from __future__ import annotations

import os
import sys
from enum import StrEnum
from pathlib import Path

import typer

from ops.cli_common import CONFIG, owner_node

audit_app = typer.Typer(help="A node's audit trail: releases and decisions (owner side).", no_args_is_help=True)


class Format(StrEnum):
    csv = "csv"
    jsonl = "jsonl"


FORMAT = typer.Option(Format.csv, "--format", "-f", help="csv (a header row) or jsonl (one object a line)")
OUTPUT = typer.Option(None, "--output", "-o", help="write here (mode 0600; replaced whole, never left half-written) "
                                                   "instead of to standard output")


@audit_app.command("export")
def audit_export(config: str = CONFIG, fmt: Format = FORMAT, output: Path = OUTPUT) -> None:
    """Every release and every decision the node database records, oldest first, one row
    each: when (ISO-8601, UTC), what (release or decision), the request id, who, which
    datasets, the door (raw, approved, dp; for a decision, the door asked for), the kind,
    mechanism, ε and δ of a DP release, how a request ended and who ended it (owner,
    expiry, its requester), the owner's reason and the requester's. The columns keep their
    order: new ones are added at the end.

    Example: gridq audit export hospital --format csv -o hospital-audit.csv
    """
    from workers import audit

    with owner_node(config) as node:
        rows = audit.rows(node.store, node.id)
    releases = sum(r["event"] == "release" for r in rows)
    if output is None:
        audit.write(rows, sys.stdout, fmt.value)
        return
    output = output.expanduser()
    if not output.parent.is_dir() or output.is_dir():
        from ops.cli_output import say
        from protocol.errors import InvalidRequest

        say(InvalidRequest(f"cannot write the audit to {output}: "
                           f"{'it is a folder' if output.is_dir() else f'{output.parent} is no folder'}"))
        raise typer.Exit(1)
    partial = output.with_name(f".{output.name}.partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # who asked what, and why: the owner's only
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as out:
            audit.write(rows, out, fmt.value)
        os.replace(partial, output)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    typer.echo(f"wrote {len(rows)} rows ({releases} releases, {len(rows) - releases} decisions) of {node.id} to "
               f"{output} ({fmt.value})", err=True)
