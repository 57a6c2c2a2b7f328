"""The ``gridq`` command line."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from workers import Node

app = typer.Typer(help="gridq: private data science over a message queue.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
keys = typer.Typer(help="Identities (Ed25519 signing + X25519 sealing keys).", no_args_is_help=True)
node = typer.Typer(help="Run a data owner's node.", no_args_is_help=True)
gateway = typer.Typer(help="Run the grid's gateway (registry and search).", no_args_is_help=True)
app.add_typer(keys, name="keys")
app.add_typer(node, name="node")
budget = typer.Typer(help="Privacy budgets of a node's users (owner side).", no_args_is_help=True)
app.add_typer(gateway, name="gateway")
app.add_typer(budget, name="budget")
requests_app = typer.Typer(help="The owner's approval queue.", no_args_is_help=True)
app.add_typer(requests_app, name="requests")
mpc = typer.Typer(help="Run a node's MPC worker: encrypted ML-as-a-service.", no_args_is_help=True)
app.add_typer(mpc, name="mpc")
runs_app = typer.Typer(help="Federated runs of grid.fit, from the client's history database.", no_args_is_help=True)
app.add_typer(runs_app, name="runs")
RUNS_DB = typer.Option(None, "--db", help="SQLAlchemy URL of the history (default: ~/.gridq/runs.db, "
                                          "or under $GRIDQ_CLIENT_HOME)")

@contextmanager
def owner_node(config: Path) -> Iterator[Node]:
    """The node's admin API for an owner's command; a GridError ends it with its message."""
    from protocol.errors import GridError
    from workers import Node

    try:
        node = Node.from_config(config)
    except GridError as exc:
        _say(exc)
        raise typer.Exit(1) from None
    try:
        yield node
    except GridError as exc:
        _say(exc)
        raise typer.Exit(1) from None
    finally:
        node.close()


def _say(exc: Exception) -> None:
    """A typed error is for people: its message, not a traceback."""
    typer.echo(f"error: {type(exc).__name__}: {exc}", err=True)


BROKER = typer.Option("redis://127.0.0.1:6379/0", "--broker", envvar="GRIDQ_BROKER", help="Redis URL")


@keys.command("new")
def keys_new(name: str, folder: Path = typer.Option(Path("~/.gridq"), "--dir", help="where to write"),
             force: bool = typer.Option(False, help="overwrite an existing key")) -> None:
    """Write NAME.key (readable only by you) and NAME.pub; print the public key."""
    from ops.keys import write_identity

    identity = write_identity(folder.expanduser(), name, overwrite=force)
    typer.echo(f"secret key: {folder.expanduser() / (name + '.key')} (mode 0600)")
    typer.echo(f"public key: {identity.public.text()}")


@app.command()
def demo() -> None:
    """Start a whole grid on this machine, run the private statistics use case, stop it."""
    from ops.demo import run

    run(stay_up=False)


@app.command()
def up(home: Path = typer.Option(None, help="keep keys, data and logs here (default: a temp dir)")) -> None:
    """Like demo, but the grid stays up until Ctrl-C."""
    from ops.demo import run

    run(stay_up=True, home=home)


@node.command("start")
def node_start(config: Path, loglevel: str = "INFO") -> None:
    """Serve a node's queue from its TOML config."""
    from workers.worker import start_node

    start_node(config, loglevel)


@mpc.command("start")
def mpc_start(config: Path, loglevel: str = "INFO") -> None:
    """Serve a node's MPC queue (mpc.<id>): host served models, hold shares, or deal triples."""
    from workers.worker import start_mpc

    start_mpc(config, loglevel)


@gateway.command("start")
def gateway_start(broker: str = BROKER, identity: Path = typer.Option(..., help="the gateway's key file"),
                  database: str = typer.Option("sqlite:///gateway.db", help="SQLAlchemy URL of the registry"),
                  loglevel: str = "INFO") -> None:
    """Serve the gateway queue: node registrations and dataset search."""
    from ops.keys import read_identity
    from orchestrator.gateway import start_gateway

    start_gateway(broker, read_identity(identity), database, loglevel)


@budget.command("show")
def budget_show(config: Path, user: str = typer.Option(None, help="one user (default: every user)"),
                dataset: str = typer.Option(None, help="one dataset (default: every dataset)")) -> None:
    """What each user has spent of their budget on each dataset."""
    from rich.console import Console
    from rich.table import Table

    with owner_node(config) as node:
        table = Table("user", "dataset", "ε spent", "ε budget", "δ", "releases")
        users = [user] if user else sorted(node.config.users)
        datasets = [dataset] if dataset else [d.name for d in node.datasets()]
        for u in users:
            for d in datasets:
                info = node.ledger.info(u, d)
                table.add_row(u, d, f"{info.spent_epsilon:.4g}", f"{info.epsilon:g}", f"{info.delta:g}",
                              str(info.releases))
        Console().print(table)


@budget.command("set")
def budget_set(config: Path, user: str, dataset: str, epsilon: float = typer.Option(..., min=0.0),
               delta: float = typer.Option(1e-6, min=0.0, max=0.999)) -> None:
    """Give USER a total budget of (ε, δ) on DATASET (what is spent stays spent)."""
    with owner_node(config) as node:
        node.store.dataset_row(dataset)
        node.ledger.set(user, dataset, epsilon, delta)
        info = node.ledger.info(user, dataset)
        typer.echo(f"{user} on {dataset}: ε {info.spent_epsilon:.4g} spent of {info.epsilon:g}, δ = {info.delta:g}")


@requests_app.command("list")
def requests_list(config: Path, all_: bool = typer.Option(False, "--all", help="decided ones too")) -> None:
    """Requests waiting for your decision."""
    from datetime import datetime

    from rich.console import Console
    from rich.table import Table

    with owner_node(config) as node:
        table = Table("id", "when", "who", "kind", "datasets", "release", "status")
        for r in node.requests(None if all_ else "pending"):
            when = datetime.fromtimestamp(r.created_at).strftime("%Y-%m-%d %H:%M:%S")
            table.add_row(r.job_id, when, r.requester, r.kind, ", ".join(r.datasets), r.release, r.status)
        Console().print(table)


@requests_app.command("show")
def requests_show(config: Path, request_id: str) -> None:
    """Everything about one request: who, when, what it computes, what it releases."""
    from datetime import datetime

    with owner_node(config) as node:
        r = node.request(request_id)
        typer.echo(f"request  {r.job_id}\nfrom     {r.requester}\n"
                   f"when     {datetime.fromtimestamp(r.created_at):%Y-%m-%d %H:%M:%S}\nkind     {r.kind}\n"
                   f"datasets {', '.join(r.datasets)}\nrelease  {r.release}\nstatus   {r.status}"
                   + (f" ({r.decision})" if r.decision else ""))
        if r.reason:
            typer.echo(f"reason   {r.reason}")
        typer.echo("plan:\n  " + r.summary.replace("\n", "\n  "))


@requests_app.command("approve")
def requests_approve(config: Path, request_id: str) -> None:
    """Approve: the job runs as asked and the requester's ticket completes."""
    with owner_node(config) as node:
        node.approve(request_id)
        typer.echo(f"approved {request_id}: its requester has the answer")


@requests_app.command("deny")
def requests_deny(config: Path, request_id: str,
                  reason: str = typer.Option(..., "--reason", help="the requester reads it")) -> None:
    """Deny, with a reason: the requester's ticket raises RequestDenied."""
    with owner_node(config) as node:
        node.deny(request_id, reason)
        typer.echo(f"denied {request_id}")


@runs_app.command("list")
def runs_list(db: str = RUNS_DB) -> None:
    """Every run, newest first: strategy, nodes, rounds done, the last round's loss and accuracy."""
    from datetime import datetime

    from rich.console import Console
    from rich.table import Table

    from orchestrator.history import History, summarize

    history = History(db)
    table = Table()
    table.add_column("run", no_wrap=True, min_width=32)  # whole: it is what `gridq runs show` takes
    for column in ("started", "strategy", "nodes", "rounds", "loss", "accuracy"):
        table.add_column(column)
    for run_id, started, config in history.runs():
        rounds = summarize(history.rounds(run_id))
        last = rounds[-1] if rounds else None
        table.add_row(run_id, datetime.fromtimestamp(started).strftime("%Y-%m-%d %H:%M:%S"),
                      str(config.get("strategy", "")), str(len(config.get("nodes", []))),
                      f"{len(rounds)}/{config.get('rounds', '?')}",
                      f"{last['loss']:.4f}" if last else "", f"{last['accuracy']:.3f}" if last else "")
    Console().print(table)


@runs_app.command("show")
def runs_show(run_id: str, db: str = RUNS_DB) -> None:
    """One run: how it was asked, then each round — who answered, training loss and accuracy,
    the global model's evaluation if the run asked for one, who dropped out and why."""
    from rich.console import Console
    from rich.table import Table

    from orchestrator.evaluation import weighted
    from orchestrator.history import History, summarize

    history = History(db)
    try:
        config = history.config(run_id)
    except KeyError as exc:
        _say(exc)
        raise typer.Exit(1) from None
    typer.echo("\n".join(f"{k:14s} {v}" for k, v in config.items()))
    records, evaluations = history.rounds(run_id), history.evaluations(run_id)
    table = Table("round", "nodes", "train loss", "train acc", *(("eval loss", "eval acc") if evaluations else ()),
                  "dropped out")
    for summary in summarize(records):
        why = [f"{h.node} ({h.status}: {h.error})" if h.error else f"{h.node} ({h.status})"
               for h in records if h.round == summary["round"] and h.status != "done"]
        evaluated = []
        if evaluations:
            ev = weighted(evaluations[summary["round"]]) if summary["round"] in evaluations else None
            evaluated = [f"{ev.loss:.4f}" if ev else "", f"{ev.accuracy:.3f}" if ev and ev.accuracy is not None else ""]
        table.add_row(str(summary["round"]), str(summary["nodes"]), f"{summary['loss']:.4f}",
                      f"{summary['accuracy']:.3f}", *evaluated, "; ".join(why))
    Console().print(table)


@app.command()
def flower(broker: str = BROKER, port: int = 5555, address: str = "127.0.0.1") -> None:
    """Open Celery Flower on the grid's broker (http://127.0.0.1:5555)."""
    os.environ.setdefault("FLOWER_UNAUTHENTICATED_API", "true")  # its JSON API, for scripts on this host
    os.environ["GRIDQ_BROKER"] = broker
    from celery.bin.celery import main as celery_main

    sys.argv = ["celery", "-A", "ops.flower_app:app", "flower", f"--address={address}", f"--port={port}"]
    celery_main()


@app.command()
def status(broker: str = BROKER, identity: Path = typer.Option(None, help="a key file to ask as")) -> None:
    """Nodes registered at the gateway, queue lengths and live workers."""
    import redis
    from rich.console import Console
    from rich.table import Table

    from ops.keys import read_identity
    from orchestrator.grid import Grid
    from protocol.identity import Identity

    me = read_identity(identity) if identity else Identity.generate("operator")
    client = redis.Redis.from_url(broker)
    with Grid.connect(broker, me, timeout=10) as grid:
        live = {name.split("@")[0] for reply in grid.app.control.ping(timeout=1.0) for name in reply}
        table = Table("node", "queue", "waiting jobs", "worker", "datasets")
        found = grid.search()
        queues = [("gateway", "gateway")] + [(n.node, n.queue) for n in grid.nodes()]
        for name, queue in queues:
            table.add_row(name, queue, str(client.llen(queue)), "up" if name in live else "[red]down[/]",
                          ", ".join(p.name for p in found.get(name, [])))
    Console().print(table)


def main() -> None:
    from protocol.errors import GridError

    try:
        app()
    except GridError as exc:
        _say(exc)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
