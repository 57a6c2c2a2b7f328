"""``gridq datasets``: a node owner's published datasets — list, show, publish, unpublish —
from the shell, with the node's admin API (``workers.Node``: what ``node.publish``,
``node.unpublish`` and ``node.datasets()`` do from Python). The node is named as for
``gridq budget`` and ``gridq requests``: its config, or its name under ``$GRIDQ_HOME/nodes``.

Tables as every ``gridq`` command prints them (``ops.cli_output``: never a value cut);
``--json`` for scripts, one JSON object a line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from ops.cli_common import CONFIG, owner_node
from ops.cli_output import show, table

if TYPE_CHECKING:
    from workers import Node

datasets_app = typer.Typer(help="A node's published datasets (owner side).", no_args_is_help=True)
NAME = typer.Argument(..., help="the dataset's name, as scientists find it")
JSON = typer.Option(False, "--json", help="one JSON object per line (list) or one object (show), every value whole")


def _published(node: Node, name: str) -> None:
    """NotFound, saying where to look, for a dataset this node does not publish."""
    from protocol.errors import NotFound

    names = [d.name for d in node.datasets()]
    if name not in names:
        raise NotFound(f"node {node.id!r} publishes no dataset {name!r}; it publishes "
                       f"{', '.join(names) or 'none'} (`gridq datasets list {node.id}`)")


def _in_config(node: Node, name: str) -> bool:
    return any(ds.name == name for ds in node.config.datasets)


def _describe(node: Node, name: str) -> dict[str, Any]:
    """Everything the owner knows of a published dataset (what the grid knows is its metadata)."""
    from datetime import UTC, datetime

    from sqlalchemy import select

    from protocol.messages import DatasetMeta
    from workers.storage.tables import GrantRow

    def when(t: float) -> str:
        return datetime.fromtimestamp(t, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    row = node.store.dataset_row(name)
    meta = DatasetMeta.model_validate(row.meta)
    with node.store.session() as s:
        grants = list(s.scalars(select(GrantRow).where(GrantRow.dataset == name).order_by(GrantRow.user)))
    publications = node.publications(name)
    bounds: Any = None
    if meta.bounds is not None:
        per_column = meta.columns and len(meta.bounds) == len(meta.columns)
        bounds = dict(zip(meta.columns, meta.bounds, strict=True)) if per_column else meta.bounds[0]
    return {
        "name": meta.name, "node": meta.node, "rows": meta.shape[0] if meta.shape else 1, "shape": list(meta.shape),
        "dtype": meta.dtype, "columns": list(meta.columns), "description": meta.description, "tags": list(meta.tags),
        "bounds": bounds, "allowed_users": list(row.allowed_users),
        "granted": [{"user": g.user, "request": g.job_id, "at": when(g.granted_at)} for g in grants],
        "mock": "supplied" if row.mock_file else ("drawn within the bounds" if meta.bounds else "none"),
        "published_at": when(row.updated_at), "in_config": _in_config(node, name), "stored_as": row.file,
        "publications": [{"at": when(p.published_at), "rows": p.rows, "dtype": p.dtype, "clamped": p.clamped,
                          "replaced": p.replaced} for p in publications],
    }


def _bounds(given: list[str], name: str) -> Any:
    """``--bounds col=lo:hi`` (one per column) or ``--bounds lo:hi`` (every value) as
    ``Node.publish`` takes them."""
    from protocol.errors import InvalidRequest

    if not given:
        return None
    pairs: dict[str, tuple[float, float]] = {}
    whole: tuple[float, float] | None = None
    for text in given:
        column, _, span = text.rpartition("=")
        lo, sep, hi = span.partition(":")
        try:
            pair = (float(lo), float(hi))
        except ValueError:
            pair = None
        if not sep or pair is None:
            raise InvalidRequest(f"--bounds {text!r} of {name!r}: write COLUMN=LO:HI (e.g. weight=0:7), or LO:HI "
                                 "for every value")
        if column:
            pairs[column] = pair
        else:
            whole = pair
    if whole is not None and pairs:
        raise InvalidRequest(f"--bounds of {name!r}: give either one LO:HI for every value or COLUMN=LO:HI for "
                             "each column, not both")
    return whole if whole is not None else pairs


def _shown_bounds(bounds: Any) -> str:
    """Declared bounds for people: ``weight [0, 7], height [20, 65]``, or ``[0, 1]`` for every value."""
    if bounds is None:
        return "none declared (DP releases of it are refused)"
    if isinstance(bounds, dict):
        return ", ".join(f"{column} [{lo:g}, {hi:g}]" for column, (lo, hi) in bounds.items())
    lo, hi = bounds
    return f"[{lo:g}, {hi:g}] for every value"


def _cell(value: Any) -> str:
    """A value whole, on one line: lists joined with ', ', tabs and newlines escaped."""
    if value is None:
        return ""
    if isinstance(value, list | tuple):
        value = ", ".join(_cell(v) for v in value)
    if isinstance(value, dict):
        value = ", ".join(f"{k}={_cell(v)}" for k, v in value.items())
    return str(value).replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")


@datasets_app.command("list")
def datasets_list(config: str = CONFIG, as_json: bool = JSON) -> None:
    """The datasets the node publishes: size, dtype, columns, tags, who may see them raw.

    Example: gridq datasets list hospital
    """
    with owner_node(config) as node:
        described = [_describe(node, meta.name) for meta in node.datasets()]
    if as_json:
        for d in described:
            typer.echo(json.dumps(d, ensure_ascii=False))
        return
    headers = ("name", "rows", "shape", "dtype", "columns", "tags", "allowed users", "granted", "published (UTC)",
               "in config", "description")
    rows = [(d["name"], d["rows"], "x".join(map(str, d["shape"])) or "()", d["dtype"], d["columns"], d["tags"],
             d["allowed_users"], [g["user"] for g in d["granted"]], d["published_at"],
             "yes" if d["in_config"] else "no", d["description"]) for d in described]
    from rich.markup import escape

    shown = table(*headers, whole=("name",))
    for r in rows:
        shown.add_row(*(escape(_cell(v)) for v in r))
    show(shown if rows else "no datasets published")


@datasets_app.command("show")
def datasets_show(config: str = CONFIG, name: str = NAME, as_json: bool = JSON) -> None:
    """One dataset: its public metadata, who may see it raw (listed, or granted by an approved
    access request), its mock twin and every time it was published.

    Example: gridq datasets show hospital birth-records-feb
    """
    with owner_node(config) as node:
        _published(node, name)
        d = _describe(node, name)
    if as_json:
        typer.echo(json.dumps(d, ensure_ascii=False, indent=2))
        return
    shown = {**d, "shape": " x ".join(map(str, d["shape"])) or "() (one value)", "bounds": _shown_bounds(d["bounds"])}
    for key in ("name", "node", "rows", "shape", "dtype", "columns", "description", "tags", "bounds",
                "allowed_users", "mock", "published_at", "stored_as"):
        typer.echo(f"{key.replace('_', ' '):14s} {_cell(shown[key])}")
    again = "yes: the node publishes it again from its config at every start"
    typer.echo(f"{'in config':14s} {again if d['in_config'] else 'no'}")
    for g in d["granted"]:
        typer.echo(f"{'granted':14s} {g['user']} (request {g['request']}, {g['at']})")
    for p in d["publications"]:
        typer.echo(f"{'published':14s} {p['at']}: {p['rows']} rows, {p['dtype']}"
                   + (f", {p['clamped']} value(s) clamped to the bounds" if p["clamped"] else "")
                   + (", replacing the one before" if p["replaced"] else ""))


FILE = typer.Argument(..., help="the data: a CSV with a header row, .npy or .safetensors (never pickle)")
TAGS = typer.Option([], "--tag", "-t", help="a tag scientists search by, '#' first (repeat it)")
ALLOWED = typer.Option([], "--allow", "-a", help="a user of the node who may see it raw (repeat it)")
BOUNDS = typer.Option([], "--bounds", "-b", help="COLUMN=LO:HI for each column, or LO:HI for every value: public, "
                                                 "what DP releases rest on (repeat it)")
MOCK = typer.Option(None, help="a synthetic twin with rows like the data's (else drawn within the bounds)")


@datasets_app.command("publish")
def datasets_publish(
    config: str = CONFIG, name: str = NAME, file: Path = FILE,
    description: str = typer.Option("", "--description", "-d", help="what scientists read in search results"),
    tags: list[str] = TAGS, allowed: list[str] = ALLOWED,
    columns: str = typer.Option(None, help="column names, comma-separated (default: a CSV's header)"),
    bounds: list[str] = BOUNDS,
    clamp: bool = typer.Option(False, help="clamp values outside the bounds to them (else they are refused)"),
    dtype: str = typer.Option(None, help="store the values as this dtype (a CSV loads as float64)"),
    mock: Path = MOCK,
    replace: bool = typer.Option(False, help="replace a dataset of this name: data and policy together"),
) -> None:
    """Publish FILE as dataset NAME: the values stay at the node, its metadata goes to the
    gateway (scientists find it at once). Bounds are checked against every value.

    Example: gridq datasets publish hospital births-mar mar.csv -t '#march' -a alice -b weight=0:7 -b height=20:65
    """
    from safetensors import SafetensorError

    from protocol.errors import GridError, InvalidRequest

    with owner_node(config) as node:
        if not file.is_file():
            raise InvalidRequest(f"{file} {'is a folder' if file.is_dir() else 'does not exist'}: give the data's "
                                 "file (.csv with a header row, .npy or .safetensors)")
        if mock is not None and not mock.is_file():
            raise InvalidRequest(f"--mock {mock} is not a file")
        if not replace and name in [d.name for d in node.datasets()]:
            raise InvalidRequest(f"{name!r} is already published on {node.id!r}; --replace replaces its data and its "
                                 "policy together: give its tags, allowed users, bounds and mock again")
        try:
            meta = node.publish(name, file, description=description, tags=tags, allowed_users=allowed,
                                columns=[c.strip() for c in columns.split(",")] if columns else None,
                                bounds=_bounds(bounds, name), mock=mock, dtype=dtype, clamp=clamp, replace=replace)
        except GridError:
            raise
        except (OSError, ValueError, SafetensorError) as exc:  # a file no reader makes sense of (not UTF-8, …)
            raise InvalidRequest(f"{file}: cannot be read as a dataset ({type(exc).__name__}: {exc})") from None
        clamped = node.publications(name)[-1].clamped
        typer.echo(f"published {meta.name} on {node.id}: {' x '.join(map(str, meta.shape))} {meta.dtype}"
                   + (f", columns {', '.join(meta.columns)}" if meta.columns else "")
                   + (f"; tags {' '.join(meta.tags)}" if meta.tags else "")
                   + f"; raw to {', '.join(allowed) or 'no one'}"
                   + ("" if meta.bounds else "; no bounds declared (DP releases of it are refused)")
                   + (f"; {clamped} value(s) clamped to the bounds" if clamped else ""))
        if _in_config(node, name):
            typer.echo(f"note: {name} is also in the node's config ([[datasets]]): the node publishes that one again "
                       "at its next start, replacing this", err=True)


@datasets_app.command("unpublish")
def datasets_unpublish(config: str = CONFIG, name: str = NAME,
                       yes: bool = typer.Option(False, "--yes", "-y", help="do not ask")) -> None:
    """Withdraw dataset NAME: the gateway stops listing it, jobs can no longer read it, its
    stored copy and the access granted to it go (your own file stays). What the ledger
    charged on it stays charged, and the audit keeps its releases.

    Example: gridq datasets unpublish hospital births-mar --yes
    """
    with owner_node(config) as node:
        _published(node, name)
        granted = _describe(node, name)["granted"]
        if not yes and sys.stdin.isatty() and not typer.confirm(
                f"Unpublish {name} from {node.id}{f' and drop {len(granted)} access grant(s)' if granted else ''}?"):
            raise typer.Exit(1)
        node.unpublish(name)
        typer.echo(f"unpublished {name} from {node.id}" + (f"; {len(granted)} access grant(s) dropped" if granted
                                                            else ""))
        if _in_config(node, name):
            typer.echo(f"note: {name} is in the node's config ([[datasets]]): the node publishes it again at its next "
                       "start unless you remove it there", err=True)
