"""The ``gridq`` command line."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from ops.cli_audit import audit_app
from ops.cli_common import CONFIG, broker_option, home_dir, owner_node, role_broker
from ops.cli_datasets import datasets_app
from ops.cli_my_requests import my_requests_app
from ops.cli_operator import dead_letters, purge, status
from ops.cli_output import say, sentence
from ops.cli_records import budget, requests_app, runs_app

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
app.command()(status)
app.command("dead-letters")(dead_letters)
app.command()(purge)
GATEWAY_DATABASE = typer.Option(None, "--database", help="SQLAlchemy URL of the gateway's registry (default: "
                                                         "gateway.db in $GRIDQ_HOME, ~/.gridq)")


@keys.command("new")
def keys_new(name: str, folder: Path = typer.Option(None, "--dir", help="where to write (default: "
                                                                         "$GRIDQ_HOME/keys, ~/.gridq/keys)"),
             force: bool = typer.Option(False, help="overwrite an existing key")) -> None:
    """Write NAME.key (readable only by you) and NAME.pub; print the public key.

    Example: gridq keys new zoe   (then give zoe.pub to the owners of the data)
    """
    from ops.keys import write_identity
    from protocol.errors import GridError

    folder = (folder or home_dir() / "keys").expanduser()
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
       mpc: bool = typer.Option(True, "--mpc/--no-mpc", help="start the MPC pool (--no-mpc: up sooner, and no model "
                                                             "served encrypted until `gridq mpc start`)"),
       edge_port: int = typer.Option(8750, help="the HTTP edge's port on 127.0.0.1 (0, or taken: a free one)")
       ) -> None:
    """Start a whole grid on this machine — Redis, gateway, nodes hospital and clinic, the MPC
    pool (unless --no-mpc), the HTTP edge — and keep it up until Ctrl-C. Its broker keeps its port across
    restarts (HOME/broker.port), so the URLs handed out stay valid. `. HOME/env.sh` in another
    shell points gridq and the README's examples at it, and puts this project's gridq on PATH.

    Example: gridq up --home ~/.gridq
    """
    from ops.demo import run

    run(stay_up=True, home=(home or home_dir()).expanduser(), play=play, edge_port=edge_port, mpc=mpc)


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

    start_gateway(role_broker("gateway", broker), read_identity(identity), _gateway_database(database), loglevel)


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
    from ops.edge.run import run_edge
    from ops.edge.settings import DEFAULT_STATIC, EdgeSettings

    settings = EdgeSettings(
        broker=role_broker("edge", broker), users=(users or home_dir() / "keys").expanduser(),
        static=(static or DEFAULT_STATIC).expanduser(), host=host, port=port, job_body_max=job_body_max,
        blob_body_max=blob_body_max, job_rate=job_rate, job_burst=job_burst, ip_rate=ip_rate, ip_burst=ip_burst,
        blob_rate=blob_rate, max_waiters=max_waiters, access_log=access_log)
    typer.echo(f"edge on http://{host}:{port} (users: {settings.users}; static: "
               f"{settings.static if settings.static and settings.static.is_dir() else 'none'})")
    run_edge(settings, loglevel)


def _gateway_database(database: str | None) -> str:
    from ops.enrol import gateway_database

    return database or gateway_database(home_dir())


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

    if sync_broker_users(home_dir(), _gateway_database(database)) is not None:
        typer.echo(what)


@app.command()
def unenrol(node: str, database: str | None = GATEWAY_DATABASE) -> None:
    """Withdraw a node's admission: its registration and datasets leave the registry, and
    its messages are refused until it is enrolled again.

    Example: gridq unenrol clinic
    """
    from workers.gateway.registry import Registry

    Registry(_gateway_database(database)).unenrol(node)
    typer.echo(f"{node} unenrolled: its datasets are no longer found")
    _follow_enrolments(database, f"broker user node-{node} deleted: its connections are closed")


@app.command()
def enrolled(database: str | None = GATEWAY_DATABASE) -> None:
    """The nodes enrolled at the gateway, with their public keys.

    Example: gridq enrolled
    """
    from workers.gateway.registry import Registry

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

    os.environ["GRIDQ_BROKER"] = role_broker("flower", broker)  # before ops.flower_app builds its Celery app
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
             port: int = 6379, db: int = 0, database: str | None = GATEWAY_DATABASE,
             tls: bool = typer.Option(False, "--tls", help="Redis' own TLS: make the grid's CA and the server's "
                                      "certificate (HOME/broker/tls) and write rediss:// URLs"),
             tls_name: list[str] = typer.Option([], "--tls-name", help="another name the certificate holds")) -> None:
    """Write the broker's ACL file (users.acl: hashed passwords, the default user off) and one
    URL file per user (gateway, scientist, edge, flower, admin, and node-<id> for each node enrolled
    at the gateway), all mode 0600, keeping the passwords already there. Start Redis with the
    file; give each participant its URL. `gridq enrol`/`unenrol` keep it up to date.

    With --tls, the broker speaks only TLS: the grid's CA and the server's certificate are
    made (kept if there), the URLs are rediss:// with the CA's certificate, which every
    participant gets with its URL.

    Example: gridq acl init --host redis.example --port 6379 --tls
    """
    from ops.broker_users import ensure_broker_users
    from ops.enrol import enrolled_nodes, gateway_database

    where = (home or home_dir()).expanduser()
    endpoint, tls_args, ca_cert = None, "", None
    if tls:
        from ops.tls import ensure_tls

        files = ensure_tls(where / "broker" / "tls", [host, "localhost", "127.0.0.1", *tls_name])
        ca_cert = files.ca_cert
        endpoint = f"rediss://{host}:{port}/{db}?ssl_ca_certs={ca_cert}"
        tls_args = (f" --port 0 --tls-port {port} --tls-cert-file {files.server_cert} --tls-key-file "
                    f"{files.server_key} --tls-ca-cert-file {ca_cert} --tls-auth-clients no")
    users = ensure_broker_users(where, host, port, db, nodes=enrolled_nodes(database or gateway_database(where)),
                                endpoint=endpoint)
    typer.echo(f"redis-server{tls_args} --aclfile {users.acl_file} --maxmemory <bytes> --maxmemory-policy noeviction")
    if ca_cert is not None:
        typer.echo(f"the CA's certificate, for every participant (ssl_ca_certs in its URL): {ca_cert}")
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
        broker = node.config.node.broker if node is not None else role_broker("scientist", url)
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
        typer.echo(f"error: {type(exc).__name__}: {sentence(str(exc))}", err=True)  # as say() does, tidied
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
