"""The ``gridq`` commands over what the grid keeps: a node owner's privacy budgets and
approval queue (``gridq budget``, ``gridq requests``, run with the node's admin API) and a
data scientist's history of federated runs (``gridq runs``). ``ops.cli`` mounts them."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from ops.cli_common import CONFIG, owner_node
from ops.cli_output import say, show, table

if TYPE_CHECKING:
    from orchestrator.history import History

budget = typer.Typer(help="Privacy budgets of a node's users (owner side).", no_args_is_help=True)
requests_app = typer.Typer(help="The owner's approval queue.", no_args_is_help=True)
runs_app = typer.Typer(help="Federated runs of grid.fit, from the client's history database.", no_args_is_help=True)
RUNS_DB = typer.Option(None, "--db", help="the history: a file path or an SQLAlchemy URL (default: "
                                          "runs.db in $GRIDQ_HOME, ~/.gridq)")


@budget.command("show")
def budget_show(config: str = CONFIG, user: str = typer.Option(None, help="one user (default: every user)"),
                dataset: str = typer.Option(None, help="one dataset (default: every dataset)")) -> None:
    """What each user has spent of their budget on each dataset.

    Example: gridq budget show hospital --user carol
    """
    from rich.markup import escape

    with owner_node(config) as node:
        spent = table("user", "dataset", "ε spent", "ε budget", "δ", "releases", whole=("user", "dataset"))
        if user:
            node.check_users([user], "budget show")
        users = [user] if user else sorted(node.config.users)
        datasets = [dataset] if dataset else [d.name for d in node.datasets()]
        for u in users:
            for d in datasets:
                info = node.ledger.info(u, d)
                spent.add_row(escape(u), escape(d), f"{info.spent_epsilon:.4g}", f"{info.epsilon:g}",
                              f"{info.delta:g}", str(info.releases))
    show(spent if spent.row_count else "no users or no datasets: nothing to show")


@budget.command("set")
def budget_set(config: str = CONFIG, user: str = typer.Argument(...), dataset: str = typer.Argument(...),
               epsilon: float = typer.Option(..., min=0.0),
               delta: float = typer.Option(1e-6, min=0.0, max=0.999)) -> None:
    """Give USER a total budget of (ε, δ) on DATASET (what is spent stays spent).

    Example: gridq budget set hospital carol birth-records-feb --epsilon 2
    """
    with owner_node(config) as node:
        node.check_users([user], "budget set")  # a misspelt name would get a budget no one spends
        node.store.dataset_row(dataset)
        node.ledger.set(user, dataset, epsilon, delta)
        info = node.ledger.info(user, dataset)
        typer.echo(f"{user} on {dataset}: ε {info.spent_epsilon:.4g} spent of {info.epsilon:g}, δ = {info.delta:g}")


@requests_app.command("list")
def requests_list(config: str = CONFIG, all_: bool = typer.Option(False, "--all", help="decided ones too"),
                  as_json: bool = typer.Option(False, "--json", help="one JSON object per line, for scripts")
                  ) -> None:
    """Requests waiting for your decision, with their whole ids (approve, deny and show take
    the id or any unique prefix of it).

    Example: gridq requests list hospital
    """
    import json
    from datetime import datetime

    from rich.markup import escape

    with owner_node(config) as node:
        found = node.requests(None if all_ else "pending")
    if as_json:
        for r in found:
            typer.echo(json.dumps({"id": r.job_id, "created_at": r.created_at, "requester": r.requester,
                                   "kind": r.kind, "datasets": list(r.datasets), "release": r.release,
                                   "status": r.status, "decision": r.decision, "reason": r.reason},
                                  ensure_ascii=False))
        return
    shown = table("id", "when", "who", "kind", "datasets", "release", "status", whole=("id",))
    for r in found:  # the whole id: what approve, deny and show take (or a unique prefix of it)
        when = datetime.fromtimestamp(r.created_at).strftime("%Y-%m-%d %H:%M:%S")
        shown.add_row(*map(escape, (r.job_id, when, r.requester, r.kind, ", ".join(r.datasets), r.release,
                                    r.status)))
    show(shown if found else "no requests" if all_ else "no requests waiting for your decision")


@requests_app.command("show")
def requests_show(config: str = CONFIG, request_id: str = typer.Argument(..., help="the id or a unique prefix")
                  ) -> None:
    """Everything about one request: who, when, what it computes, what it releases.

    Example: gridq requests show hospital hospital:9f3c
    """
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
def requests_approve(config: str = CONFIG,
                     request_id: str = typer.Argument(..., help="the id or a unique prefix")) -> None:
    """Approve: the job runs as asked and the requester's ticket completes.

    Example: gridq requests approve hospital hospital:9f3c
    """
    with owner_node(config) as node:
        request = node.request(request_id)
        node.approve(request.job_id)
        typer.echo(f"approved {request.job_id}: {request.requester} has the answer")


@requests_app.command("deny")
def requests_deny(config: str = CONFIG, request_id: str = typer.Argument(..., help="the id or a unique prefix"),
                  reason: str = typer.Option(..., "--reason", help="the requester reads it")) -> None:
    """Deny, with a reason: the requester's ticket raises RequestDenied.

    Example: gridq requests deny hospital hospital:9f3c --reason "not covered by the ethics approval"
    """
    with owner_node(config) as node:
        request = node.request(request_id)
        node.deny(request.job_id, reason)
        typer.echo(f"denied {request.job_id}: {request.requester} reads your reason")


@runs_app.command("list")
def runs_list(db: str = RUNS_DB) -> None:
    """Every run, newest first: strategy, nodes, rounds done, the last round's loss and accuracy.

    Example: gridq runs list --db ~/.gridq/runs.db
    """
    from datetime import datetime

    from orchestrator.history import History, figure, summarize

    history = History(_history_url(db))
    shown = table("run", "started", "strategy", "nodes", "rounds", "loss", "accuracy", "status", whole=("run",))
    for run_id, started, config in history.runs():
        rounds = summarize(history.rounds(run_id))
        last = rounds[-1] if rounds else None
        shown.add_row(run_id, datetime.fromtimestamp(started).strftime("%Y-%m-%d %H:%M:%S"),
                      str(config.get("strategy", "")), str(len(config.get("nodes", []))),
                      f"{len(rounds)}/{config.get('rounds', '?')}",
                      figure(last.loss) if last else "", figure(last.accuracy, 3) if last else "",
                      history.status(run_id)[0])  # running, done, interrupted, failed: `runs show` says why
    show(shown if shown.row_count else "no runs recorded yet: grid.fit records each run here")


RUN_ID = typer.Argument(..., help="the run's id, or a unique prefix of it (as `gridq runs list` shows it)")


@runs_app.command("show")
def runs_show(run_id: str = RUN_ID, db: str = RUNS_DB) -> None:
    """One run: how it was asked — DP-SGD and secure aggregation included — then each round,
    numbered from 1 as fit's progress bar counts them: who answered, training loss and
    accuracy, the global model's evaluation if the run asked for one, the ε charged under
    DP-SGD, who dropped out and why.

    Example: gridq runs show 3f2a9c0e
    """
    from rich.markup import escape

    from orchestrator.history import figure, privacy_settings, round_rows

    with runs_history(db) as history:
        run_id = history.resolve(run_id)  # NotFound, or InvalidRequest naming the runs a prefix matches
    config = history.config(run_id)
    typer.echo(f"{'run':14s} {run_id}")
    typer.echo("\n".join(f"{k:14s} {v}" for k, v in config.items() if k not in ("dp", "secure_aggregation")))
    typer.echo("\n".join(f"{k:14s} {v}" for k, v in privacy_settings(config).items()))
    status, reason = history.status(run_id)
    typer.echo(f"{'status':14s} {status}" + (f": {reason}" if reason else ""))
    records, evaluated = history.rounds(run_id), history.evaluated(run_id)
    rows = round_rows(records, evaluated)
    charged = any(r["epsilon"] is not None for r in rows)
    shown = table("round", "nodes", "train loss", "train acc", *(("eval loss", "eval acc") if evaluated else ()),
                  *(("ε",) if charged else ()), "dropped out")
    for row in rows:
        why = [f"{h.node} ({h.status}: {h.error})" if h.error else f"{h.node} ({h.status})"
               for h in records if h.round + 1 == row["round"] and h.status != "done"]
        shown.add_row(str(row["round"]), f"{row['nodes']}/{row['asked']}", figure(row["loss"]),
                      figure(row["accuracy"], 3),
                      *((figure(row["eval_loss"]), figure(row["eval_accuracy"], 3)) if evaluated else ()),
                      *((figure(row["epsilon"], 3),) if charged else ()), escape("; ".join(why)))
    show(shown if shown.row_count else "no round recorded yet")


PLOT_OUTPUT = typer.Option(None, "--output", "-o", help="the image to write: PNG, SVG or PDF by its suffix "
                                                     "(default: run-<id prefix>.png here)")


@runs_app.command("plot")
def runs_plot(run_id: str = RUN_ID, output: Path = PLOT_OUTPUT, db: str = RUNS_DB,
              width: float = typer.Option(8.0, min=2.0, max=40.0, help="inches"),
              height: float = typer.Option(6.0, min=2.0, max=40.0, help="inches"),
              dpi: int = typer.Option(100, min=30, max=600)) -> None:
    """The run's learning curve: loss and accuracy per round (training solid, the global
    model's evaluation dashed), rounds where nodes dropped out marked in red.

    Example: gridq runs plot 3f2a9c0e -o curve.png
    """
    from orchestrator.history import plot_rounds, round_rows
    from protocol.errors import NotFound

    with runs_history(db) as history:
        run_id = history.resolve(run_id)
        rows = round_rows(history.rounds(run_id), history.evaluated(run_id))
        if not rows:
            raise NotFound(f"run {run_id} has no round recorded yet: nothing to plot")
    config = history.config(run_id)
    guard = [name for name, on in (("DP-SGD", config.get("dp")), ("secure aggregation",
                                                                   config.get("secure_aggregation"))) if on]
    title = (f"run {run_id[:12]}: {config.get('strategy', '?')}, {len(config.get('nodes', []))} nodes, "
             f"{len(rows)}/{config.get('rounds', '?')} rounds" + (f", {' + '.join(guard)}" if guard else ""))
    output = output or Path(f"run-{run_id[:8]}.png")
    plot_rounds(rows, title, (width, height), dpi).savefig(output)
    typer.echo(f"wrote {output}: {len(rows)} rounds, {sum(1 for r in rows if r['dropouts'])} with dropouts")


@contextmanager
def runs_history(db: str | None) -> Iterator[History]:
    """The run history ``--db`` names; a GridError inside (no such file, no such run, an
    ambiguous prefix) ends the command with its message."""
    from orchestrator.history import History
    from protocol.errors import GridError

    try:
        yield History(_history_url(db))
    except GridError as exc:
        say(exc)
        raise typer.Exit(1) from None


def _history_url(db: str | None) -> str | None:
    """``--db`` as given: a URL, or a path to an SQLite file that must exist."""
    if db is None or "://" in db:
        return db
    path = Path(db).expanduser()
    if not path.is_file():
        from protocol.errors import NotFound

        raise NotFound(f"no run history at {path}; grid.fit writes one (history_db=), by default in "
                       f"$GRIDQ_HOME/runs.db")
    return f"sqlite:///{path.resolve()}"
