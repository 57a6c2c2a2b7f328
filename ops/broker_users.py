"""The broker's users on disk and in a running broker: ``<home>/broker/users.acl`` (the rules
of :mod:`ops.acl`), one ``<user>.url`` per user (0600), and the live users kept in step
with enrolments (``ACL SETUSER``/``DELUSER``: ``ACL LOAD`` would drop every client).

The URLs reach the broker however its ``endpoint`` says (``protocol.broker``): plain
``redis://`` on the embedded grid, ``rediss://…?ssl_ca_certs=…`` over TLS, or
``sentinels://…?master=gridq`` for a replicated broker, whose servers then also hold their own
users (``replica``, ``sentinel``: ``ops.acl.SERVER_USERS``) and whose sentinels let every
participant in as ``discovery``; those three passwords are kept in ``<user>.secret`` (0600).
ACLs are not replicated: on a replicated broker every server is given the users.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit

import redis
from redis.sentinel import Sentinel

from ops.acl import (
    DISCOVERY_USER,
    NODE_ID,
    NODE_USER_PREFIX,
    ROLES,
    SERVER_USERS,
    checked_nodes,
    flattened,
    rules_table,
    server_line,
    setuser_args,
    users,
)
from orchestrator.transport import redis_client
from protocol.broker import parse_broker, sentinel_arguments, with_user
from protocol.errors import BrokerUnavailable

DEFAULT_OFF = "user default off resetkeys resetchannels -@all"  # unauthenticated connections can do nothing


@dataclass(frozen=True)
class BrokerUsers:
    """The broker's ACL file, each user's URL, and its rules as ``ACL SETUSER`` takes them."""

    folder: Path
    acl_file: Path
    urls: dict[str, str]
    setuser: dict[str, list[str]]
    secrets: dict[str, str] = field(default_factory=dict)  # a replicated broker's: replica, sentinel, discovery


def broker_folder(home: Path) -> Path:
    return Path(home) / "broker"


def ensure_broker_users(home: Path, host: str = "127.0.0.1", port: int = 6379, db: int = 0,
                        nodes: Sequence[str] = (), selectors: bool | None = None,
                        endpoint: str | None = None) -> BrokerUsers:
    """Write ``<home>/broker/users.acl`` and one ``<user>.url`` per user (all 0600) for a grid
    where ``nodes`` are enrolled, reusing passwords already there; the URL files of nodes no
    longer enrolled are removed. Returns the URLs. ``selectors=False``: for a Redis 6 server
    (:func:`flattened`); None keeps what the folder was written for (``users.flat`` says).
    ``endpoint``: how participants reach the broker, a broker URL without a user (any form
    ``protocol.broker`` reads: ``rediss://redis:6379/0?ssl_ca_certs=…``, ``sentinels://…``);
    default ``redis://HOST:PORT/DB``. A Sentinel endpoint adds the servers' own users to the
    ACL file and the sentinels' ``discovery`` login to every URL."""
    nodes = checked_nodes(nodes)
    base = endpoint or f"redis://{f'[{host}]' if ':' in host else host}:{port}/{db}"
    broker = parse_broker(base)
    db = broker.db
    folder = broker_folder(home)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(folder, 0o700)
    flat = folder / "users.flat"
    selectors = not flat.exists() if selectors is None else selectors
    if selectors:
        flat.unlink(missing_ok=True)
    else:
        flat.write_text("the broker is Redis 6: users.acl has no selectors (ops.acl.flattened)\n")
    names = users(nodes)
    passwords = {u: _password(folder / f"{u}.url") for u in names}
    setuser = {u: setuser_args(u, passwords[u], db, nodes) for u in names}
    if not selectors:
        setuser = {u: flattened(args) for u, args in setuser.items()}
    kept = {u: _secret(folder / f"{u}.secret") for u in (*SERVER_USERS, DISCOVERY_USER)} if broker.sentinel else {}
    if broker.sentinel:
        base = _with_query(base, sentinel_user=DISCOVERY_USER, sentinel_password=kept[DISCOVERY_USER])
    acl_file = folder / "users.acl"
    _write_private(acl_file, "\n".join([DEFAULT_OFF, *(f"user {u} " + " ".join(setuser[u]) for u in names),
                                        *(server_line(u, kept[u]) for u in SERVER_USERS if u in kept)]) + "\n")
    (folder / "users.rules.md").write_text(rules_table(db, nodes))
    urls = {}
    for u in names:
        urls[u] = with_user(base, u, passwords[u])
        _write_private(folder / f"{u}.url", urls[u] + "\n")
    _remove_stale_node_urls(folder, names)
    return BrokerUsers(folder, acl_file, urls, setuser, kept)


def apply_users(admin_url: str, broker_users: BrokerUsers) -> None:
    """Make the running broker's users those of ``broker_users``: each one set afresh (``ACL
    SETUSER name reset …``: its connections stay, under the new rules), and node users that
    are no longer enrolled deleted (which closes their connections)."""
    wanted = broker_users.setuser
    try:
        with _servers(admin_url) as servers:
            for admin in servers:  # ACLs are not replicated: each server of a replicated broker is told
                for name, args in wanted.items():
                    admin.execute_command("ACL", "SETUSER", name, "reset", *args)
                stale = [u for u in (_text(x) for x in admin.acl_users()) if u.startswith(NODE_USER_PREFIX)
                         and u not in wanted]
                if stale:
                    admin.acl_deluser(*stale)
    except redis.RedisError as exc:
        raise BrokerUnavailable(
            f"{broker_users.acl_file} is written, but the broker could not be given its users: "
            f"{type(exc).__name__}: {exc}. They take effect when Redis starts with --aclfile on that file; or run "
            "the same command again once Redis is up") from None


def follow_enrolments(home: Path, nodes: Sequence[str]) -> BrokerUsers | None:
    """The broker users of ``home`` (its ``broker/`` folder) made to follow the enrolled
    ``nodes``, on disk and, through the admin URL there, in the running broker. A grid without
    ACLs (no ``users.acl``) only gets each node's URL file, holding the one open URL; a home
    with no broker folder is left alone (None)."""
    admin = role_url(home, "admin")
    if admin is None:
        return None
    if not (broker_folder(home) / "users.acl").exists():
        open_broker_urls(home, admin, nodes)
        return None
    written = ensure_broker_users(home, nodes=nodes, endpoint=with_user(admin, None, None))
    apply_users(written.urls["admin"], written)
    return written


def open_broker_urls(home: Path, url: str, nodes: Sequence[str] = ()) -> None:
    """A broker without ACLs (the test grid): every user's URL file holds the one open URL, so
    configs that read ``<home>/broker/<user>.url`` work the same on both kinds of grid."""
    folder = broker_folder(home)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    names = users(nodes)
    for u in names:
        _write_private(folder / f"{u}.url", url + "\n")
    _remove_stale_node_urls(folder, names)


def role_url(home: Path, user: str) -> str | None:
    """``user``'s broker URL as written under ``<home>/broker``, or None if there is none (a
    grid without ACLs): what a command run as that user connects with by default."""
    if user not in ROLES and not (user.startswith(NODE_USER_PREFIX) and NODE_ID.fullmatch(user.split("-", 1)[1])):
        raise ValueError(f"unknown broker user {user!r}; the users are {', '.join(ROLES)} and "
                         f"{NODE_USER_PREFIX}<id> for each enrolled node")
    path = broker_folder(home) / f"{user}.url"
    return path.read_text().strip() if path.exists() else None


def _remove_stale_node_urls(folder: Path, names: Sequence[str]) -> None:
    for path in folder.glob(f"{NODE_USER_PREFIX}*.url"):
        if path.stem not in names:
            path.unlink()


@contextmanager
def _servers(admin_url: str) -> Iterator[list[redis.Redis]]:
    """Admin clients of every server of the broker: the one, or a replicated broker's primary
    and the replicas its sentinels know."""
    broker = parse_broker(admin_url)
    with ExitStack() as stack:
        if broker.master is None:
            yield [stack.enter_context(redis_client(admin_url))]
            return
        connect = sentinel_arguments(broker)
        sentinel = Sentinel(connect.sentinels, sentinel_kwargs=connect.sentinel_kwargs, **connect.connection_kwargs)
        servers = [stack.enter_context(sentinel.master_for(connect.master))]
        for host, port in sentinel.discover_slaves(connect.master):
            replica = redis.Redis(host=str(host), port=int(port), **connect.connection_kwargs)
            servers.append(stack.enter_context(replica))
        yield servers


def _with_query(url: str, **params: str) -> str:
    parts = urlsplit(url)
    kept = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in params]
    return parts._replace(query=urlencode([*kept, *params.items()], safe="/")).geturl()


def _secret(path: Path) -> str:
    """The password kept in ``path`` (made and kept, 0600, if there is none)."""
    if path.exists() and path.read_text().strip():
        return path.read_text().strip()
    secret = secrets.token_urlsafe(32)
    _write_private(path, secret + "\n")
    return secret


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _password(url_file: Path) -> str:
    if url_file.exists():
        old = urlsplit(url_file.read_text().strip()).password
        if old:
            return old
    return secrets.token_urlsafe(32)


def _write_private(path: Path, text: str) -> None:
    """Readable only by its owner, and replaced whole (a new file renamed over the old one): a
    worker starting while the files are written again for the next node enrolled reads the
    old URL or the new one, never an empty file."""
    fresh = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(fresh, 0o600)
    os.replace(fresh, path)
