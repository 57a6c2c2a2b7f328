"""The operator's ``gridq`` commands over the broker: ``status`` (each queue, its jobs and
its worker; ``--watch`` keeps it on screen), ``dead-letters`` (what workers would not run,
and why) and ``purge`` (a dead node's jobs, with a confirmation). ``ops.cli`` mounts them."""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from ops.cli_common import broker_option, role_broker
from ops.cli_output import fitted, plural, say, sentence, show, table

if TYPE_CHECKING:
    from rich.console import RenderableType

    from orchestrator.grid import Grid


def status(broker: str | None = broker_option("flower"),
           identity: Path = typer.Option(None, help="a key file to ask as"),
           watch: bool = typer.Option(False, "--watch", "-w", help="refresh it every --interval seconds, until "
                                                                      "Ctrl-C"),
           interval: float = typer.Option(2.0, "--interval", "-n", min=0.1, help="seconds between refreshes, with "
                                                                                  "--watch"),
           count: int = typer.Option(0, "--count", min=0, help="with --watch: stop after this many refreshes "
                                                                 "(0: until Ctrl-C)")) -> None:
    """Nodes registered at the gateway and every live worker: each queue (a node's own, and
    mpc.<id> and mpc-peer.<id> for its MPC worker), how many jobs wait in it, and whether a
    worker serves it.

    Example: gridq status --watch --interval 5
    """
    from ops.keys import read_identity
    from orchestrator.grid import Grid
    from protocol.identity import Identity

    me = read_identity(identity) if identity else Identity.generate("operator")
    with Grid.connect(role_broker("flower", broker), me, timeout=10) as grid:
        if watch:
            _watch_status(grid, interval, count)
        else:
            show(*_status_view(grid))


def _status_view(grid: Grid) -> list[RenderableType]:
    """What `gridq status` shows: the table of queues, then a line on the jobs waiting."""
    from rich.markup import escape
    from rich.text import Text

    from protocol.contract import GATEWAY_QUEUE, dead_letter_key, mpc_peer_queue, mpc_queue

    mpc_kinds = ("mpc.", "mpc-peer.")
    transport = grid.transport
    queues_up = transport.served_queues()
    found = grid.search()
    registered = grid.nodes()
    nodes = {info.node for info in registered}
    rows = [("gateway", GATEWAY_QUEUE)] + [(info.node, info.queue) for info in registered]
    rows += [(q.split(".", 1)[1], q) for q in sorted(queues_up) if q.startswith(mpc_kinds)]
    rows += [(n, q) for n in sorted(nodes) for q in (mpc_queue(n), mpc_peer_queue(n))
             if q not in queues_up and transport.queue_length(q)]
    shown = table("node", "queue", "waiting jobs", "dead letters", "worker", "datasets", whole=("node", "queue"))
    waiting = dead_total = 0
    stranded = []  # queues holding jobs that no worker serves
    for name, queue in sorted(rows, key=lambda r: (r[0] != "gateway", r[0], r[1])):
        if queue in queues_up:
            state = "up"
        elif name in nodes and queue.startswith(mpc_kinds):
            state = "[yellow]no MPC worker[/]"
        elif mpc_queue(name) in queues_up:
            state = "[dim]MPC worker only[/]"
        else:
            state = "[red]down[/]"
        datasets = "" if queue.startswith(mpc_kinds) else ", ".join(p.name for p in found.get(name, []))
        jobs = transport.queue_length(queue)
        dead = transport.queue_length(dead_letter_key(queue))
        waiting, dead_total = waiting + jobs, dead_total + dead
        if jobs and queue not in queues_up:
            stranded.append(queue)
        shown.add_row(escape(name), escape(queue), str(jobs), f"[red]{dead}[/]" if dead else "0", state,
                      escape(datasets))
    notes = [plural(waiting, "job") + " waiting" if waiting else "no jobs waiting in any queue"]
    if stranded:
        notes.append(f"no worker serves {', '.join(stranded)}: its jobs wait until one starts (`gridq purge QUEUE` "
                     "removes them)")
    if dead_total:
        notes.append("`gridq dead-letters` shows what the workers would not run, and why")
    return [shown, *(Text(n) for n in notes)]


def _watch_status(grid: Grid, interval: float, count: int) -> None:
    """`gridq status --watch`: the view redrawn in place in a terminal, printed again and
    again otherwise; a refresh that fails (the broker restarting) says why and the next one
    tries again. Ctrl-C ends it (exit 0); so does ``count`` refreshes, if not 0."""
    from rich.console import Console, Group
    from rich.live import Live
    from rich.text import Text

    from protocol.errors import GridError

    def frame(number: int) -> list[RenderableType]:
        stopping = f"refresh {number} of {count}" if count else "Ctrl-C stops"
        head = Text(f"gridq status at {time.strftime('%H:%M:%S')}, every {interval:g} s ({stopping})", style="dim")
        try:
            return [head, *_status_view(grid)]
        except GridError as exc:  # e.g. BrokerUnavailable while Redis restarts: keep watching
            return [head, Text(f"error: {type(exc).__name__}: {sentence(str(exc))} (trying again in {interval:g} s)",
                               style="red")]

    console = Console()
    number = 0
    try:
        if console.is_terminal:
            with Live(console=console, auto_refresh=False, vertical_overflow="visible") as live:
                while not count or number < count:
                    number += 1
                    _, shown = fitted(console, frame(number))  # ids kept whole at the terminal's width
                    live.update(Group(*shown), refresh=True)
                    if not count or number < count:
                        time.sleep(interval)
        else:  # piped: each refresh in full, one after the other
            while not count or number < count:
                number += 1
                show(*frame(number), blank_line=number > 1)
                sys.stdout.flush()
                if not count or number < count:
                    time.sleep(interval)
    except KeyboardInterrupt:
        pass


def dead_letters(queues: list[str] = typer.Argument(None, help="queues to show (default: the gateway's, and each "
                                                                "registered node's node.<id>, mpc.<id> and "
                                                                "mpc-peer.<id>)"),
                 broker: str | None = broker_option("flower"), limit: int = 20) -> None:
    """What the workers took off their queues and would not run, newest first: junk (not a
    gridq message, a task they do not serve) and jobs given up after too many deliveries.
    Each list keeps its newest 1000.

    Example: gridq dead-letters node.hospital --limit 5
    """
    import json

    from rich.markup import escape

    from orchestrator.transport import redis_client
    from protocol.contract import GATEWAY_QUEUE, dead_letter_key, mpc_peer_queue, mpc_queue, node_queue

    url = role_broker("flower", broker)
    with redis_client(url) as client:
        if not queues:
            from orchestrator.grid import Grid
            from protocol.identity import Identity

            with Grid.connect(url, Identity.generate("operator"), timeout=10) as grid:
                names = [info.node for info in grid.nodes()]
            queues = [GATEWAY_QUEUE, *(q for n in names for q in (node_queue(n), mpc_queue(n), mpc_peer_queue(n)))]
        shown = table("queue", "when (UTC)", "reason", "task / id", "what", whole=("queue",))
        for queue in queues:
            for raw in client.lrange(dead_letter_key(queue), 0, limit - 1):
                entry = json.loads(raw)
                shown.add_row(escape(queue), time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(entry["at"])),
                              escape(entry["reason"]), escape(f"{entry.get('task', '')} {entry.get('id', '')}".strip()),
                              escape(preview(entry.get("head") or "", entry.get("bytes"))))
    show(shown if shown.row_count else f"no dead letters in {', '.join(queues)}")


def preview(head: str, size: int | None, shown: int = 80) -> str:
    """The start of a junk item, control characters escaped (a newline would break the row),
    cut with an ellipsis and its size if longer."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in head)
    if len(text) <= shown and (size is None or size <= len(head)):
        return text
    return f"{text[:shown]}… ({plural(size, 'byte') if size is not None else 'cut'})"


NODE_QUEUE = re.compile(r"(node|mpc|mpc-peer)\.[A-Za-z0-9_.\-]{1,64}")  # a node's queues (ids: ops.acl.NODE_ID)


def purge(queue: str = typer.Argument(..., help="a node's queue: node.<id>, mpc.<id> or mpc-peer.<id> (`gridq "
                                                 "status` lists them)"),
          broker: str | None = broker_option("admin"),
          yes: bool = typer.Option(False, "--yes", "-y", help="purge without asking")) -> None:
    """Remove the jobs of a dead node's queue: those waiting in it, and those its worker had
    taken and not finished (which the next worker would take up again). Refused while a
    worker serves the queue. Its dead letters stay (`gridq dead-letters QUEUE`). Needs the
    broker's admin user ($GRIDQ_HOME/broker/admin.url).

    Example: gridq purge node.clinic
    """
    import redis

    from ops.acl import SEP
    from orchestrator.transport import redis_client
    from protocol.contract import ALIVE_TTL_SECONDS, alive_key, in_flight_keys
    from protocol.errors import GridError, InvalidRequest

    try:
        if not NODE_QUEUE.fullmatch(queue):
            raise InvalidRequest(f"{queue!r} is not a node's queue: `gridq purge` takes node.<id>, mpc.<id> or "
                                 "mpc-peer.<id> (`gridq status` lists them)")
        waiting_keys = [queue, *(f"{queue}{SEP}{priority}" for priority in range(1, 10))]  # kombu's priority lists
        flight = in_flight_keys(queue)
        alive = alive_key(queue)
        served = InvalidRequest(f"a worker serves {queue} (it said so within the last {ALIVE_TTL_SECONDS:.0f} s): "
                                "stop it first; one stopped just now counts as up until then")
        with redis_client(role_broker("admin", broker), socket_timeout=30) as client:
            if client.exists(alive):
                raise served
            with client.pipeline() as pipe:
                for key in waiting_keys:
                    pipe.llen(key)
                pipe.hlen(flight["unacked_key"])
                *lengths, taken = pipe.execute()
            if not sum(lengths) and not taken:
                typer.echo(f"{queue} is empty (no jobs waiting, none taken): nothing to purge")
                return
            typer.echo(f"{queue}: {plural(sum(lengths), 'job')} waiting"
                       + (f", {taken} taken by a worker that stopped before finishing" if taken else "")
                       + "; no worker serves it")
            try:
                sure = yes or typer.confirm("Remove them all?", default=False)
            except typer.Abort:  # Ctrl-C, or no answer (stdin closed): the prompt's line is still open
                typer.echo()
                sure = False
            if not sure:
                typer.echo("nothing removed")
                raise typer.Exit(1)
            with client.pipeline() as pipe:
                try:
                    pipe.watch(alive)  # a worker that starts now makes EXEC fail: nothing is removed
                    if pipe.exists(alive):
                        raise served
                    pipe.multi()
                    for key in waiting_keys:
                        pipe.llen(key)
                    pipe.hlen(flight["unacked_key"])
                    pipe.delete(*waiting_keys, flight["unacked_key"], flight["unacked_index_key"])
                    *lengths, taken, _deleted = pipe.execute()
                except redis.WatchError:
                    raise served from None
    except GridError as exc:
        say(exc)
        raise typer.Exit(1) from None
    typer.echo(f"removed {plural(sum(lengths) + taken, 'job')} from {queue}"
               + (f" ({sum(lengths)} waiting, {taken} taken)" if taken else ""))
