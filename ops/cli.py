"""The ``gridq`` command line."""

from __future__ import annotations

import os
import re
import sys
import time
import weakref
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from ops.cli_audit import audit_app
from ops.cli_datasets import datasets_app
from ops.cli_my_requests import my_requests_app
from ops.cli_records import CONFIG, budget, owner_node, requests_app, runs_app, say

if TYPE_CHECKING:
    from collections.abc import Sequence

    from rich.console import Console, RenderableType
    from rich.table import Table

    from orchestrator.grid import Grid

app = typer.Typer(help="gridq: private data science over a message queue.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
keys = typer.Typer(help="Identities (Ed25519 signing + X25519 sealing keys).", no_args_is_help=True)
node = typer.Typer(help="Run a data owner's node.", no_args_is_help=True)
gateway = typer.Typer(help="Run the grid's gateway (registry and search).", no_args_is_help=True)
app.add_typer(keys, name="keys")
app.add_typer(node, name="node")
app.add_typer(gateway, name="gateway")
app.add_typer(budget, name="budget")
app.add_typer(requests_app, name="requests")
mpc = typer.Typer(help="Run a node's MPC worker: encrypted ML-as-a-service.", no_args_is_help=True)
app.add_typer(mpc, name="mpc")
acl_app = typer.Typer(help="The broker's users: one Redis ACL user per enrolled node, and per role.",
                      no_args_is_help=True)
app.add_typer(acl_app, name="acl")
app.add_typer(runs_app, name="runs")
app.add_typer(datasets_app, name="datasets")
app.add_typer(audit_app, name="audit")
app.add_typer(my_requests_app, name="my-requests")
GATEWAY_DATABASE = typer.Option(None, "--database", help="SQLAlchemy URL of the gateway's registry (default: "
                                                         "gateway.db in $GRIDQ_HOME, ~/.gridq)")


def broker_option(role: str) -> str | None:
    return typer.Option(None, "--broker", help=f"Redis URL (default: the {role} broker user's, "
                                               f"$GRIDQ_HOME/broker/{role}.url, else $GRIDQ_BROKER)")


def _role_broker(role: str, broker: str | None) -> str:
    """The broker URL a command acting as ``role`` logs in with: ``--broker``, else the role's
    URL file in the home (`gridq up`, `gridq acl init` and compose's init write them: e.g.
    the operator's view needs Flower's user, which may ping workers), else $GRIDQ_BROKER."""
    from ops.broker_users import role_url

    url = broker or role_url(_home(), role) or os.environ.get("GRIDQ_BROKER")
    if not url:
        from protocol.errors import InvalidRequest

        raise InvalidRequest("which grid? pass --broker URL, or export GRIDQ_HOME (or GRIDQ_BROKER) as "
                             "`gridq up` prints")
    return url


def _home() -> Path:
    from protocol.contract import gridq_home

    return gridq_home()


@keys.command("new")
def keys_new(name: str, folder: Path = typer.Option(None, "--dir", help="where to write (default: "
                                                                         "$GRIDQ_HOME/keys, ~/.gridq/keys)"),
             force: bool = typer.Option(False, help="overwrite an existing key")) -> None:
    """Write NAME.key (readable only by you) and NAME.pub; print the public key.

    Example: gridq keys new zoe   (then give zoe.pub to the owners of the data)
    """
    from ops.keys import write_identity
    from protocol.errors import GridError

    folder = (folder or _home() / "keys").expanduser()
    try:
        identity = write_identity(folder, name, overwrite=force)
    except GridError as exc:
        say(exc)
        raise typer.Exit(1) from None
    typer.echo(f"secret key: {folder / (name + '.key')} (mode 0600)")
    typer.echo(f"public key: {folder / (name + '.pub')}: {identity.public.text()}")
    from protocol.pinning import fingerprint

    # what a gateway's operator announces, and participants compare (`gridq trust-gateway`)
    typer.echo(f"fingerprint: {fingerprint(identity.public.text())}")


@app.command()
def demo() -> None:
    """Start a whole grid on this machine, play the three use cases on it (private statistics,
    federated learning, encrypted inference), then stop it. Nothing is kept.

    Example: gridq demo
    """
    from ops.demo import run

    run(stay_up=False)


@app.command()
def up(home: Path = typer.Option(None, help="keys, node configs, data and logs (default: $GRIDQ_HOME, "
                                            "~/.gridq); kept across runs"),
       play: bool = typer.Option(False, "--demo", help="play the demo's use cases once it is up"),
       edge_port: int = typer.Option(8750, help="the HTTP edge's port on 127.0.0.1 (0, or taken: a free one)")
       ) -> None:
    """Start a whole grid on this machine — Redis, gateway, nodes hospital and clinic, the MPC
    pool, the HTTP edge — and keep it up until Ctrl-C. Its broker keeps its port across
    restarts (HOME/broker.port), so the URLs handed out stay valid. `. HOME/env.sh` in another
    shell points gridq and the README's examples at it, and puts this project's gridq on PATH.

    Example: gridq up --home ~/.gridq
    """
    from ops.demo import run

    run(stay_up=True, home=(home or _home()).expanduser(), play=play, edge_port=edge_port)


@node.command("start")
def node_start(config: str = CONFIG, loglevel: str = "INFO") -> None:
    """Serve a node's queue from its TOML config.

    Example: gridq node start ./hospital.toml
    """
    from workers.worker import start_node

    start_node(config, loglevel)


@mpc.command("start")
def mpc_start(config: str = CONFIG, loglevel: str = "INFO",
              serve: str = typer.Option("both", help="both; users: only mpc.<id> (host, aggregation); peers: only "
                                                     "mpc-peer.<id> (party, crypto provider)")) -> None:
    """Serve a node's MPC queues: its users' requests (mpc.<id>: host served models, add up
    federated rounds) and other nodes' (mpc-peer.<id>: hold shares, run sessions, deal
    triples), each with a pool of its own.

    Example: gridq mpc start ./company.toml
    """
    from workers.worker import MPC_ROLES, start_mpc

    if serve not in MPC_ROLES:
        raise typer.BadParameter(f"one of {', '.join(MPC_ROLES)}", param_hint="--serve")
    start_mpc(config, loglevel, serve)


@gateway.command("start")
def gateway_start(broker: str | None = broker_option("gateway"),
                  identity: Path = typer.Option(..., help="the gateway's key file"),
                  database: str | None = GATEWAY_DATABASE, loglevel: str = "INFO") -> None:
    """Serve the gateway queue: node registrations and dataset search.

    Example: gridq gateway start --broker redis://127.0.0.1:6379/0 --identity keys/gateway.key
    """
    from ops.gateway import start_gateway
    from ops.keys import read_identity

    start_gateway(_role_broker("gateway", broker), read_identity(identity), _gateway_database(database), loglevel)


@app.command("edge")
def edge_start(broker: str | None = broker_option("edge"),
               host: str = typer.Option("127.0.0.1", help="address to listen on"),
               port: int = typer.Option(8750, help="port to listen on"),
               users: Path = typer.Option(None, help="folder of NAME.pub files: the senders admitted (default: "
                                                     "$GRIDQ_HOME/keys; only .pub files are read)"),
               static: Path = typer.Option(None, help="static files served at / if the folder exists (default: "
                                                      "clients/ts/web in the repository)"),
               job_body_max: int = typer.Option(1 << 20, help="bytes of a POST /v1/jobs body, at most"),
               blob_body_max: int = typer.Option(16 << 20, help="bytes of a POST /v1/blobs body, at most"),
               job_rate: float = typer.Option(50.0, help="jobs a second per sender (token bucket) …"),
               job_burst: float = typer.Option(100.0, help="… saved up to this many"),
               ip_rate: float = typer.Option(100.0, help="other requests a second per client address …"),
               ip_burst: float = typer.Option(200.0, help="… saved up to this many"),
               blob_rate: float = typer.Option(8.0 * (1 << 20), help="blob bytes a second per client address"),
               max_waiters: int = typer.Option(1000, help="long-polls at once, at most (429 beyond)"),
               access_log: bool = typer.Option(False, help="log every request"),
               loglevel: str = "INFO") -> None:
    """Serve the HTTP edge for clients that cannot reach Redis: it verifies signed envelopes,
    enqueues them as its own broker user, and relays the signed replies. It holds no key.

    Example: gridq edge --port 8750
    """
    from ops.edge.run import serve
    from ops.edge.settings import DEFAULT_STATIC, EdgeSettings

    settings = EdgeSettings(
        broker=_role_broker("edge", broker), users=(users or _home() / "keys").expanduser(),
        static=(static or DEFAULT_STATIC).expanduser(), host=host, port=port, job_body_max=job_body_max,
        blob_body_max=blob_body_max, job_rate=job_rate, job_burst=job_burst, ip_rate=ip_rate, ip_burst=ip_burst,
        blob_rate=blob_rate, max_waiters=max_waiters, access_log=access_log)
    typer.echo(f"edge on http://{host}:{port} (users: {settings.users}; static: "
               f"{settings.static if settings.static and settings.static.is_dir() else 'none'})")
    serve(settings, loglevel)


def _gateway_database(database: str | None) -> str:
    from ops.enrol import gateway_database

    return database or gateway_database(_home())


@app.command()
def enrol(node: str = typer.Argument(..., help="the node's id, as in its config's [node] id"),
          key: Path = typer.Option(..., "--key", help="the node's public key file (NAME.pub, from its owner)"),
          replace: bool = typer.Option(False, help="replace the key the node is enrolled with (its registration "
                                                   "is dropped until it registers with the new key)"),
          database: str | None = GATEWAY_DATABASE) -> None:
    """Admit a node at the gateway (run on the gateway's host): only enrolled nodes may
    register and publish datasets, and only signed with the key enrolled.

    Example: gridq enrol hospital --key hospital.pub
    """
    from ops.enrol import enrol as enrol_node

    changed = enrol_node(_gateway_database(database), node, key, replace=replace)
    typer.echo(f"{node} {'enrolled' if changed else 'was already enrolled'} with {key}; it registers when it "
               "starts (`gridq node start`)")
    _follow_enrolments(database, f"broker user node-{node}: its URL is $GRIDQ_HOME/broker/node-{node}.url "
                                 "(hand it to the node's owner, for its config's broker_file)")


def _follow_enrolments(database: str | None, what: str) -> None:
    """The broker's users after an enrolment changed, when this host keeps them
    ($GRIDQ_HOME/broker with users.acl: the gateway's host in compose and `gridq up`)."""
    from ops.enrol import sync_broker_users

    if sync_broker_users(_home(), _gateway_database(database)) is not None:
        typer.echo(what)


@app.command()
def unenrol(node: str, database: str | None = GATEWAY_DATABASE) -> None:
    """Withdraw a node's admission: its registration and datasets leave the registry, and
    its messages are refused until it is enrolled again.

    Example: gridq unenrol clinic
    """
    from orchestrator.registry import Registry

    Registry(_gateway_database(database)).unenrol(node)
    typer.echo(f"{node} unenrolled: its datasets are no longer found")
    _follow_enrolments(database, f"broker user node-{node} deleted: its connections are closed")


@app.command()
def enrolled(database: str | None = GATEWAY_DATABASE) -> None:
    """The nodes enrolled at the gateway, with their public keys.

    Example: gridq enrolled
    """
    from orchestrator.registry import Registry

    for node, key in Registry(_gateway_database(database)).enrolments():
        typer.echo(f"{node:24s} {key}")


@app.command()
def flower(broker: str | None = broker_option("flower"), port: int = 5555, address: str = "127.0.0.1",
           auth_file: Path | None = typer.Option(None, "--auth-file", help="a file of one line 'user:password' "
                                                 "(mode 0600) that Flower asks for (HTTP basic auth); "
                                                 "or set FLOWER_BASIC_AUTH=user:password")) -> None:
    """Open Celery Flower on the grid's broker (http://127.0.0.1:5555).

    On loopback it may go without a password; on any other address it needs basic auth.

    Example: gridq flower --address 0.0.0.0 --auth-file /var/lib/gridq/flower.auth
    """
    from protocol.errors import GridError

    os.environ["GRIDQ_BROKER"] = _role_broker("flower", broker)  # before ops.flower_app builds its Celery app
    from ops.flower_app import basic_auth, is_loopback, run

    try:
        auth = basic_auth(auth_file)
    except GridError as exc:
        say(exc)
        raise typer.Exit(1) from None
    if auth:  # through the environment, not argv: `ps` would show a --basic-auth password
        os.environ["FLOWER_BASIC_AUTH"] = auth
        os.environ.pop("FLOWER_UNAUTHENTICATED_API", None)
    elif is_loopback(address):
        os.environ.setdefault("FLOWER_UNAUTHENTICATED_API", "true")  # its JSON API, for scripts on this host
    else:
        typer.echo(f"error: Flower on {address or 'every interface'} would let anyone who reaches it watch the "
                   "grid and revoke jobs or shut workers down: give --auth-file PATH (one line 'user:password', "
                   "mode 0600) or set FLOWER_BASIC_AUTH=user:password, or bind --address 127.0.0.1", err=True)
        raise typer.Exit(1)
    run(["celery", "-A", "ops.flower_app:app", "flower", f"--address={address}", f"--port={port}"])


@acl_app.command("init")
def acl_init(home: Path = typer.Option(None, help="where broker/ is written (default: $GRIDQ_HOME, ~/.gridq)"),
             host: str = typer.Option("127.0.0.1", help="the broker's host, as the participants reach it"),
             port: int = 6379, db: int = 0, database: str | None = GATEWAY_DATABASE) -> None:
    """Write the broker's ACL file (users.acl: hashed passwords, the default user off) and one
    URL file per user (gateway, scientist, edge, flower, admin, and node-<id> for each node enrolled
    at the gateway), all mode 0600, keeping the passwords already there. Start Redis with the
    file; give each participant its URL. `gridq enrol`/`unenrol` keep it up to date.

    Example: gridq acl init --host redis.example --port 6379
    """
    from ops.broker_users import ensure_broker_users
    from ops.enrol import enrolled_nodes, gateway_database

    where = (home or _home()).expanduser()
    users = ensure_broker_users(where, host, port, db, nodes=enrolled_nodes(database or gateway_database(where)))
    typer.echo(f"redis-server --aclfile {users.acl_file} --maxmemory <bytes> --maxmemory-policy noeviction")
    for user in users.urls:
        typer.echo(f"{user:24s} {users.folder / f'{user}.url'}")
    typer.echo(f"what each role may do, and why: {users.folder / 'users.rules.md'}")


@acl_app.command("show")
def acl_show(db: int = 0, database: str | None = GATEWAY_DATABASE,
             markdown: bool = typer.Option(False, "--markdown", help="as Markdown tables, as in broker/users.rules.md")
             ) -> None:
    """Every broker user's rules (one per role, one per enrolled node), with the reason for each.

    Example: gridq acl show
    """
    from ops.acl import rules_table
    from ops.enrol import enrolled_nodes

    nodes = enrolled_nodes(_gateway_database(database))
    typer.echo(rules_table(db, nodes) if markdown else _rules_text(db, nodes))


def _rules_text(db: int, nodes: list[str]) -> str:
    """The broker users' rules as a terminal shows them: each rule whole, as Redis takes it
    (no Markdown escapes: a `|` is a `|`), its reason below it; kombu's separator, two control
    characters, written \\x06\\x16."""
    from ops.acl import NODE_USER_PREFIX, ROLE_WHO, SEP, rules, users

    shown_sep = "\\x06\\x16"  # as kombu's source writes it
    out = ["Broker ACL users (ops/acl.py; broker/users.acl holds the same rules). `user default off`: a connection "
           "that does not log in as one of them can do nothing. No user but admin may run scripts or functions.", ""]
    for user in users(nodes):
        who = ROLE_WHO["node"] if user.startswith(NODE_USER_PREFIX) else ROLE_WHO[user]
        out.append(f"{user}: {who}")
        for rule in rules(user, db, nodes):
            out += [f"  {rule.rule.replace(SEP, shown_sep)}", f"      {rule.why}"]
        out.append("")
    return "\n".join(out).rstrip("\n")


@app.command("trust-gateway")
def trust_gateway(url: str | None = typer.Argument(None, help="the broker's URL (default: your broker user's, "
                                                               "$GRIDQ_HOME/broker/scientist.url, else $GRIDQ_BROKER)"),
                  node_config: str | None = typer.Option(None, "--node", help="pin for a node (its config, or its "
                                                         "name under $GRIDQ_HOME/nodes) in its database, not for you "
                                                         "in $GRIDQ_HOME/known_gateways; its broker is its config's"),
                  key: str | None = typer.Option(None, "--key", help="the key to pin, gridq1:… as the gateway's "
                                                 "operator gave it (default: the one the broker posts now)"),
                  yes: bool = typer.Option(False, "--yes", "-y", help="pin without asking")) -> None:
    """Accept a rotated gateway key. Clients and nodes pin the key a broker's gateway posts on
    first contact and refuse another one later (GatewayKeyChanged): whoever can write the
    broker could post their own. Run this once the gateway's operator has told you the new
    key's fingerprint, and compare it with the one shown.

    Example: gridq trust-gateway redis://127.0.0.1:6379/0
    """
    from contextlib import nullcontext

    from orchestrator.known_gateways import KnownGateways
    from orchestrator.transport import posted_key
    from protocol.contract import GATEWAY
    from protocol.identity import PublicIdentity
    from protocol.pinning import broker_address, fingerprint

    with owner_node(node_config) if node_config else nullcontext() as node:
        broker = node.config.node.broker if node is not None else _role_broker("scientist", url)
        pins = node.store if node is not None else KnownGateways()
        address = broker_address(broker)
        new = PublicIdentity.parse(GATEWAY, key).text() if key else posted_key(broker)
        old = pins.pinned_gateway(address)
        if old == new:
            typer.echo(f"{fingerprint(new)} is already the gateway key pinned for {address} in {pins.where}")
            return
        typer.echo(f"broker {address}\n  pinned: {fingerprint(old) if old else '(none)'}\n  new:    "
                   f"{fingerprint(new)}{'' if key else ' (as the broker posts it now)'}")
        if not yes and not typer.confirm("Has the gateway's operator given you this new fingerprint? Pin it"):
            raise typer.Exit(1)
        pins.pin_gateway(address, new, replace=True)
        typer.echo(f"pinned {fingerprint(new)} for {address} in {pins.where}")


@app.command()
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
    with Grid.connect(_role_broker("flower", broker), me, timeout=10) as grid:
        if watch:
            _watch_status(grid, interval, count)
        else:
            _show(*_status_view(grid))


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
    table = _table("node", "queue", "waiting jobs", "dead letters", "worker", "datasets", whole=("node", "queue"))
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
        table.add_row(escape(name), escape(queue), str(jobs), f"[red]{dead}[/]" if dead else "0", state,
                      escape(datasets))
    notes = [_plural(waiting, "job") + " waiting" if waiting else "no jobs waiting in any queue"]
    if stranded:
        notes.append(f"no worker serves {', '.join(stranded)}: its jobs wait until one starts (`gridq purge QUEUE` "
                     "removes them)")
    if dead_total:
        notes.append("`gridq dead-letters` shows what the workers would not run, and why")
    return [table, *(Text(n) for n in notes)]


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
            return [head, Text(f"error: {type(exc).__name__}: {_sentence(str(exc))} (trying again in {interval:g} s)",
                               style="red")]

    console = Console()
    number = 0
    try:
        if console.is_terminal:
            with Live(console=console, auto_refresh=False, vertical_overflow="visible") as live:
                while not count or number < count:
                    number += 1
                    shown = frame(number)
                    _fitted(console, shown)  # in a terminal: its tables' widths set to keep ids whole
                    live.update(Group(*shown), refresh=True)
                    if not count or number < count:
                        time.sleep(interval)
        else:  # piped: each refresh in full, one after the other
            while not count or number < count:
                number += 1
                _show(*frame(number), blank_line=number > 1)
                sys.stdout.flush()
                if not count or number < count:
                    time.sleep(interval)
    except KeyboardInterrupt:
        pass


@app.command("dead-letters")
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

    import redis
    from rich.markup import escape

    from protocol.contract import GATEWAY_QUEUE, dead_letter_key, mpc_peer_queue, mpc_queue, node_queue

    url = _role_broker("flower", broker)
    with redis.Redis.from_url(url) as client:
        if not queues:
            from orchestrator.grid import Grid
            from protocol.identity import Identity

            with Grid.connect(url, Identity.generate("operator"), timeout=10) as grid:
                names = [info.node for info in grid.nodes()]
            queues = [GATEWAY_QUEUE, *(q for n in names for q in (node_queue(n), mpc_queue(n), mpc_peer_queue(n)))]
        table = _table("queue", "when (UTC)", "reason", "task / id", "what", whole=("queue",))
        for queue in queues:
            for raw in client.lrange(dead_letter_key(queue), 0, limit - 1):
                entry = json.loads(raw)
                table.add_row(escape(queue), time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(entry["at"])),
                              escape(entry["reason"]), escape(f"{entry.get('task', '')} {entry.get('id', '')}".strip()),
                              escape(_head(entry.get("head") or "", entry.get("bytes"))))
    _show(table if table.row_count else f"no dead letters in {', '.join(queues)}")


def _head(head: str, size: int | None, shown: int = 80) -> str:
    """The start of a junk item, control characters escaped (a newline would break the row),
    cut with an ellipsis and its size if longer."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in head)
    if len(text) <= shown and (size is None or size <= len(head)):
        return text
    return f"{text[:shown]}… ({_plural(size, 'byte') if size is not None else 'cut'})"


NODE_QUEUE = re.compile(r"(node|mpc|mpc-peer)\.[A-Za-z0-9_.\-]{1,64}")  # a node's queues (ids: ops.acl.NODE_ID)


@app.command()
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
        with redis.Redis.from_url(_role_broker("admin", broker), socket_timeout=30) as client:
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
            typer.echo(f"{queue}: {_plural(sum(lengths), 'job')} waiting"
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
    typer.echo(f"removed {_plural(sum(lengths) + taken, 'job')} from {queue}"
               + (f" ({sum(lengths)} waiting, {taken} taken)" if taken else ""))


# --- output as a terminal shows it -------------------------------------------------------------


_WHOLE: weakref.WeakKeyDictionary[Table, tuple[str, ...]] = weakref.WeakKeyDictionary()  # see _table


def _table(*columns: str, whole: tuple[str, ...] = ()) -> Table:
    """A table whose cells fold rather than cut: at 80 columns a value wraps onto the next
    line, never ends in an ellipsis; the ``whole`` columns (ids, names) keep each value on one
    line when the others can be narrowed to make room (:func:`_show`). Piped, every column
    gets the room its values need."""
    from rich.table import Table

    table = Table()
    for column in columns:
        table.add_column(column, overflow="fold")
    _WHOLE[table] = whole
    return table


def _show(*renderables: RenderableType | str, blank_line: bool = False) -> None:
    """Print tables and lines: in a terminal, at its width; piped or captured (not a terminal),
    wide enough that no table wraps or cuts a value, and lines never wrapped (a script, grep or
    a file gets each value whole, on its row)."""
    from rich.console import Console
    from rich.table import Table

    console = _fitted(Console(), renderables)
    if blank_line:
        console.print()
    for renderable in renderables:
        console.print(renderable, soft_wrap=not isinstance(renderable, Table))


def _fitted(console: Console, renderables: Sequence[RenderableType | str]) -> Console:
    """The console to print ``renderables`` on: not a terminal, one wide enough for their
    tables; a terminal, this one, with each table too wide for it given widths that keep its
    ids whole (:func:`_keep_whole`)."""
    from rich.console import Console
    from rich.table import Table

    wide = Console(width=1 << 16)
    tables = [(r, wide.measure(r).maximum) for r in renderables if isinstance(r, Table)]
    if not console.is_terminal:
        return Console(width=max([console.width, *(width for _, width in tables)]))
    for table, width in tables:
        if width > console.width:
            _keep_whole(table, console.width)
    return console


def _keep_whole(table: Table, width: int) -> None:
    """Widths for a table wider than the terminal: its ``whole`` columns (ids, names) as wide
    as their longest value, the room left shared out among the others, the narrowest needs
    met first (their cells wrap). Rich's own narrowing would fold an id as soon as a name.
    Left to rich (cells fold) if the whole columns would take more than 60% of ``width``."""
    from rich.cells import cell_len
    from rich.text import Text

    whole = _WHOLE.get(table, ())
    want = {}
    for index, column in enumerate(table.columns):
        cells = [cell_len(Text.from_markup(str(cell)).plain) for cell in column.cells]
        header = str(column.header)
        if header in whole:
            want[index] = max([cell_len(header), *cells])
        else:  # its header may wrap between words
            want[index] = max([cell_len(word) for word in header.split()] + cells)
    fixed = [i for i, column in enumerate(table.columns) if str(column.header) in whole]
    room = width - (3 * len(table.columns) + 1) - sum(want[i] for i in fixed)  # borders and padding
    others = sorted((i for i in want if i not in fixed), key=lambda i: want[i])
    if not fixed or room < 4 * len(others) or sum(want[i] for i in fixed) > 0.6 * width:
        return
    for left, index in enumerate(others):
        want[index] = max(1, min(want[index], room // (len(others) - left)))
        room -= want[index]
    for index, column in enumerate(table.columns):
        column.width = want[index]


def _plural(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _sentence(message: str) -> str:
    """A message on one line, without punctuation doubled where texts were joined (an
    exception's "… refused." inside "…: {exc}. Is Redis running?" reads "refused.. Is")."""
    return re.sub(r"(?<=[\w)\]'\"`])([.!?])\.(?=\s|$)", r"\1", " ".join(message.split()))


def main() -> None:
    """Every error ends the command with one `error:` line (GRIDQ_DEBUG=1 shows the traceback)."""
    import redis
    from kombu.exceptions import KombuError, OperationalError

    from protocol.errors import GridError

    try:
        app()
    except (GridError, OSError, redis.RedisError, KombuError, OperationalError) as exc:
        if os.environ.get("GRIDQ_DEBUG"):
            raise
        typer.echo(f"error: {type(exc).__name__}: {_sentence(str(exc))}", err=True)  # as say() does, tidied
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
