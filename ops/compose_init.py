"""One-shot set-up of a docker-compose grid (the ``init`` service of docker-compose.yml).

Into the shared volume at ``$GRIDQ_HOME``: keys of every demo participant, the demo data,
Flower's basic-auth credentials, the demo nodes enrolled at the gateway (its registry
database), and the broker's users (``broker/users.acl`` and one ``broker/<user>.url`` each),
plus ``broker/scientist.outside.url``: the scientist's URL as seen from outside the compose
network (``--outside``, the port Redis is published on).

The broker speaks TLS only: ``broker/tls`` holds the grid's CA and the servers' certificate
(``ops.tls``; it names every service and ``--outside``'s host, and ``--tls-names``), and
``--tls-out`` (the host's ``deploy/tls``) gets the CA's certificate — the one file besides its
URL a node at another site needs. With ``--sentinels`` the broker is the primary
(``--broker``), its replica (``--replica``) and the sentinels, and every service's URL goes
through the sentinels (``sentinels://…?master=gridq``); the servers' and sentinels'
configuration templates are written into ``broker/`` too (``redis.conf``,
``redis-replica.conf``, ``sentinel-<n>.conf``: ``ops.redis_servers``), which each container
copies into its own volume on its first start (Sentinel rewrites them as the roles change).

Into the host's deploy folder (bind-mounted at ``--nodes`` and ``--keys``), only where it is
empty: the demo node configs (no ``*.toml`` there yet), whose users' public keys are
``../keys/NAME.pub``, and those public keys (no ``*.pub`` there yet, and demo configs beside).
An owner's own configs and keys are never touched; the nodes' secret keys stay in the volume.

    python -m ops.compose_init --nodes /etc/gridq/nodes --keys /etc/gridq/keys --tls-out /etc/gridq/tls \\
        --broker redis:6379 --replica redis-replica:6379 \\
        --sentinels sentinel-1:26379,sentinel-2:26379,sentinel-3:26379 --outside 127.0.0.1:6379

Idempotent: existing keys are kept (a restarted ``init`` never replaces an identity the
nodes and the gateway already know), and so are Flower's password and the broker users'
passwords; the seeded demo data is rewritten identically.

Run as root (compose does: the host folder belongs to the host's user), it writes the host
folder's files owned as that folder is, and everything in the volume as ``gridq``.
"""

from __future__ import annotations

import argparse
import os
import pwd
import re
import secrets
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from ops.broker_users import broker_folder
from ops.demo import prepare
from ops.enrol import enrol, enrolled_nodes, gateway_database
from ops.local import NODE_CONFIGS
from protocol.broker import parse_broker, with_user

FLOWER_AUTH = "flower.auth"  # "operator:<secret>", mode 0600: `gridq flower --auth-file` reads it
FLOWER_USER = "operator"
SERVICE_USER = "gridq"  # the image's user (Dockerfile): owns everything in the volume
OUTSIDE = ".outside.url"  # broker/<role>.outside.url: the role's URL from outside the compose network
OUTSIDE_ROLES = ("scientist",)
OUTSIDE_CA = "deploy/tls/ca.crt"  # the CA as an outside URL names it: the host's copy, from the compose folder
CONTAINER_DATA = "/data"  # where the Redis containers keep their files (docker-compose.yml's entrypoint)
# a demo config's user key, "${GRIDQ_HOME}/keys/alice.pub": in the deploy folder "../keys/alice.pub"
DEMO_PUBLIC_KEY = re.compile(r'"\$\{GRIDQ_HOME\}/keys/([A-Za-z0-9_.\-]+\.pub)"')
SEEDED_MARK = "# Seeded by docker compose's `init`"
SEEDED_HEADER = SEEDED_MARK + """ from ops/nodes/{name} (it writes into an empty folder only:
# this file is yours to edit). Users' public keys are ../keys/NAME.pub: ./deploy/keys on the
# host, /etc/gridq/keys in the containers. After an edit, restart the services whose command
# names this file in docker-compose.yml (for hospital.toml: docker compose restart hospital hospital-mpc).
"""


def flower_auth(home: Path) -> Path:
    """Write ``home/flower.auth`` — ``operator:<random secret>``, readable by its owner only —
    unless it exists: a re-run keeps the password the operator was given."""
    path = home / FLOWER_AUTH
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        os.chmod(path, 0o600)  # the secret is kept; its mode is put right if it was loosened
        return path
    with os.fdopen(fd, "w") as f:
        f.write(f"{FLOWER_USER}:{secrets.token_urlsafe(24)}\n")
    os.chmod(path, 0o600)  # whatever the umask
    return path


def enrol_demo_nodes(home: Path) -> list[str]:
    """Enrol every demo node (its key in ``home/keys``) in the gateway's database in ``home``;
    a node enrolled already keeps its key (a changed key is refused, not replaced)."""
    nodes = sorted(config.stem for config in NODE_CONFIGS.glob("*.toml"))
    for node in nodes:
        enrol(gateway_database(home), node, home / "keys" / f"{node}.pub")
    return nodes


# --- the host's deploy folder -----------------------------------------------------------------


def deploy_config(text: str, name: str) -> str:
    """A demo config as the deploy folder holds it: its users' public keys taken from
    ``../keys`` (next to the configs on the host and in the containers), the rest as is."""
    return SEEDED_HEADER.format(name=name) + DEMO_PUBLIC_KEY.sub(lambda m: f'"../keys/{m.group(1)}"', text)


def demo_user_keys(source: Path = NODE_CONFIGS) -> list[str]:
    """The public key files (``alice.pub``, …) the demo configs name for their users."""
    texts = [config.read_text() for config in source.glob("*.toml")]
    return sorted({m.group(1) for text in texts for m in DEMO_PUBLIC_KEY.finditer(text)})


def seed_nodes(folder: Path, source: Path = NODE_CONFIGS) -> list[Path]:
    """The demo configs written into ``folder`` if it holds no ``*.toml`` yet (else nothing:
    an owner's configs are theirs); returns the files written."""
    if any(folder.glob("*.toml")):
        return []
    written = []
    for config in sorted(source.glob("*.toml")):
        text = deploy_config(config.read_text(), config.name)
        if _write_public(folder / config.name, text, folder):
            written.append(folder / config.name)
    return written


def seeded_configs(folder: Path) -> list[Path]:
    """The configs in ``folder`` that ``init`` seeded (an owner may have edited them since)."""
    return sorted(p for p in folder.glob("*.toml") if p.read_text().startswith(SEEDED_MARK))


def seed_keys(folder: Path, home: Path, source: Path = NODE_CONFIGS, configs: Path | None = None) -> list[Path]:
    """The public keys of the demo configs' users (from ``home/keys``) copied into ``folder``
    if it holds no ``*.pub`` yet — and, given the ``configs`` folder, only if it holds demo
    configs (an owner's own configs admit no demo user); returns the files written. Never a
    secret key."""
    if any(folder.glob("*.pub")) or (configs is not None and not seeded_configs(configs)):
        return []
    written = []
    for name in demo_user_keys(source):
        if _write_public(folder / name, (home / "keys" / name).read_text(), folder):
            written.append(folder / name)
    return written


def unreadable(folder: Path) -> list[Path]:
    """What in ``folder`` the services (another user, through a read-only mount) cannot
    read: the folder or a file in it that others may not read."""
    paths = [folder, *sorted(p for p in folder.iterdir() if not p.name.startswith("."))]
    need = {True: 0o005, False: 0o004}  # a folder: r-x for others; a file: r
    return [p for p in paths if p.stat().st_mode & need[p.is_dir()] != need[p.is_dir()]]


def _write_public(path: Path, text: str, folder: Path) -> bool:
    """Write a new world-readable file (never over an existing one), owned as ``folder`` is
    when run as root; False if it was there already."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o644)
    if os.geteuid() == 0:
        owner = folder.stat()
        try:
            os.chown(path, owner.st_uid, owner.st_gid)
        except OSError:  # a bind mount that maps owners itself (Docker Desktop): it is the host user's already
            pass
    return True


# --- the broker's users -----------------------------------------------------------------------


def host_port(text: str) -> tuple[str, int]:
    """``"redis:6379"``, ``"127.0.0.1:6380"``, ``"[::1]:6379"`` → (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r} is not HOST:PORT")
    return host.removeprefix("[").removesuffix("]"), int(port)


def outside_url(url: str, host: str, port: int) -> str:
    """``url`` with its host and port replaced (user, password and database kept): the same
    broker user, reached from outside the compose network."""
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    where = f"[{host}]" if ":" in host else host
    return urlunsplit(parts._replace(netloc=f"{userinfo}@{where}:{port}" if userinfo else f"{where}:{port}"))


def broker_users(home: Path, broker: str, outside: str | None, roles: Sequence[str] = OUTSIDE_ROLES, *,
                 replica: str | None = None, sentinels: Sequence[str] = (), tls_names: Sequence[str] = (),
                 outside_ca: str = OUTSIDE_CA) -> list[Path]:
    """``gridq acl init`` for the nodes enrolled at the gateway in ``home``, over TLS: the
    CA and the servers' certificate in ``broker/tls``, and every URL ``rediss://`` to the
    primary as the services reach it (``broker``), or with ``sentinels`` (HOST:PORT each)
    ``sentinels://`` through them — then, for each of ``roles``,
    ``broker/<role>.outside.url`` (0600) reaching the primary at ``outside`` with the CA at
    ``outside_ca`` (as the host sees it); returns those files. With ``sentinels``, the
    configuration templates of the servers and sentinels as well (:func:`server_templates`)."""
    from ops.broker_users import ensure_broker_users
    from ops.redis_servers import sentinel_endpoint
    from ops.tls import ensure_tls

    host, port = host_port(broker)
    places = [(host, port), *([host_port(replica)] if replica else []), *(host_port(s) for s in sentinels)]
    out = host_port(outside) if outside else None
    names = [h for h, _ in places] + ["localhost", "127.0.0.1"] + ([out[0]] if out else []) + list(tls_names)
    tls = ensure_tls(broker_folder(home) / "tls", names)
    if sentinels:
        endpoint = sentinel_endpoint([host_port(s) for s in sentinels], tls.ca_cert)
    else:
        endpoint = f"rediss://{_netloc(host, port)}/0?ssl_ca_certs={tls.ca_cert}"
    users = ensure_broker_users(home, nodes=enrolled_nodes(gateway_database(home)), endpoint=endpoint)
    if sentinels:
        server_templates(users.folder, (host, port), replica, sentinels, users.secrets)
    written = []
    if out:
        for role in roles:
            login = parse_broker(users.urls[role])
            url = with_user(f"rediss://{_netloc(*out)}/{login.db}?ssl_ca_certs={outside_ca}", role, login.password)
            path = users.folder / f"{role}{OUTSIDE}"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(url + "\n")
            os.chmod(path, 0o600)
            written.append(path)
    return written


def server_templates(folder: Path, primary: tuple[str, int], replica: str | None, sentinels: Sequence[str],
                     secrets: dict[str, str]) -> list[Path]:
    """The configuration templates of a replicated broker's servers and sentinels, into
    ``folder`` (0600: they hold the replication and sentinel passwords), with the paths the
    Redis containers copy the files to (``/data``: docker-compose.yml's entrypoint)."""
    from ops.redis_servers import sentinel_config, server_config
    from ops.tls import tls_files

    tls = tls_files(Path(CONTAINER_DATA) / "tls")
    common: dict[str, Any] = {"tls": tls, "acl_file": f"{CONTAINER_DATA}/users.acl", "folder": CONTAINER_DATA,
                              "secrets": secrets}
    files = {"redis.conf": server_config(port=primary[1], announce=primary[0], **common)}
    if replica:
        host, port = host_port(replica)
        files["redis-replica.conf"] = server_config(port=port, announce=host, replica_of=primary, **common)
    for n, sentinel in enumerate(sentinels, start=1):
        host, port = host_port(sentinel)
        files[f"sentinel-{n}.conf"] = sentinel_config(port=port, tls=tls, folder=CONTAINER_DATA, announce=host,
                                                      primary=primary, quorum=len(sentinels) // 2 + 1,
                                                      secrets=secrets)
    written = []
    for name, text in files.items():
        path = folder / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(path, 0o600)
        written.append(path)
    return written


def publish_ca(folder: Path, ca: Path) -> Path:
    """The CA's certificate copied into the host's ``folder`` (world-readable, owned as the
    folder is): what a participant at another site is handed with its URL. Written again
    when it differs (a new volume, a new CA)."""
    target = folder / "ca.crt"
    data = ca.read_text()
    if target.exists() and target.read_text() == data:
        return target
    target.unlink(missing_ok=True)
    _write_public(target, data, folder)
    return target


def _netloc(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@contextmanager
def acting_as(user: str | None) -> Iterator[None]:
    """Files made inside are ``user``'s (the effective uid and gid switched) when run as
    root and ``user`` exists; else nothing changes."""
    try:
        account = pwd.getpwnam(user) if user and os.geteuid() == 0 else None
    except KeyError:
        account = None
    if account is None:
        yield
        return
    os.setegid(account.pw_gid)
    os.seteuid(account.pw_uid)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ops.compose_init", description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=Path, help="the host's node-config folder, as mounted (filled if empty)")
    parser.add_argument("--keys", type=Path, help="the host's public-key folder, as mounted (filled if empty)")
    parser.add_argument("--broker", default="redis:6379", help="HOST:PORT of Redis (its TLS port) inside the "
                                                                "compose network: the primary")
    parser.add_argument("--replica", help="HOST:PORT of the primary's replica (with --sentinels)")
    parser.add_argument("--sentinels", default="", help="HOST:PORT,… of the sentinels: every service's URL goes "
                                                         "through them (sentinels://)")
    parser.add_argument("--outside", help="HOST:PORT of Redis from this machine (its published port)")
    parser.add_argument("--tls-names", default="", help="more names (comma-separated) the broker's certificate "
                                                         "holds: those other sites reach it by")
    parser.add_argument("--tls-out", type=Path, help="the host's folder for the CA's certificate (deploy/tls)")
    args = parser.parse_args(argv)
    home = os.environ.get("GRIDQ_HOME")
    if not home:
        sys.exit("GRIDQ_HOME is not set: it names the folder shared by the gateway and the nodes")
    home_path = Path(home)
    for folder in (args.nodes, args.keys, args.tls_out):
        if folder is not None and not folder.is_dir():
            sys.exit(f"gridq init: {folder} is not a folder: docker-compose.yml bind-mounts ./deploy/nodes, "
                     "./deploy/keys and ./deploy/tls there (they are in the repository)")
    seeded: list[Path] = []
    try:
        if args.nodes:
            seeded += seed_nodes(args.nodes)
        with acting_as(SERVICE_USER):
            prepare(home_path)  # its copies of the demo configs in $GRIDQ_HOME/nodes are not the ones compose runs
            nodes = enrol_demo_nodes(home_path)
            auth = flower_auth(home_path)
            outside = broker_users(home_path, args.broker, args.outside, replica=args.replica,
                                   sentinels=[s for s in args.sentinels.split(",") if s.strip()],
                                   tls_names=[n for n in args.tls_names.split(",") if n.strip()])
        if args.keys:
            seeded += seed_keys(args.keys, home_path, configs=args.nodes)
        ca = publish_ca(args.tls_out, broker_folder(home_path) / "tls" / "ca.crt") if args.tls_out else None
    except PermissionError as exc:
        sys.exit(f"gridq init: {exc}: the host's deploy folders are written as root (docker-compose.yml runs init "
                 "with user: root), or fill them yourself (deploy/README.md)")
    keys = sorted(p.name for p in (home_path / "keys").glob("*.pub"))
    data = sorted(p.name for p in (home_path / "data").iterdir())
    print(
        f"gridq init: {home_path}: public keys {', '.join(keys)}; data {', '.join(data)}; "
        f"nodes enrolled at the gateway: {', '.join(nodes)}; "
        f"Flower's basic auth in {auth} (mode 0600); broker users in {home_path / 'broker'}",
        flush=True,
    )
    for folder in (args.nodes, args.keys):
        if folder is None:
            continue
        mine = [p for p in seeded if p.parent == folder]
        print(f"gridq init: {folder}: " + (f"seeded with the demo's {', '.join(p.name for p in mine)}" if mine
                                            else "kept as it is (not empty)"), flush=True)
        bad = unreadable(folder)
        if bad:
            print(f"gridq init: WARNING: the services (user {SERVICE_USER}) cannot read {', '.join(map(str, bad))}: "
                  "on the host, chmod o+rX them", flush=True)
    for path in outside:
        print(f"gridq init: from this machine (in this folder: its URL names {OUTSIDE_CA}): "
              f"export GRIDQ_BROKER=\"$(docker compose exec -T gateway cat {path})\"", flush=True)
    if ca is not None:
        print(f"gridq init: the broker speaks TLS only; its CA's certificate is {ca} (./deploy/tls/ca.crt on the "
              "host): hand it, with broker/node-<id>.url, to a node's owner at another site", flush=True)


if __name__ == "__main__":
    main()
