"""docker-compose.yml checked offline (CI has no Docker daemon): against the Compose
Specification's JSON Schema (vendored: tests/data/compose-spec.json, see
compose-spec.SOURCE.md), then against what the grid needs, with `init` run for real into a
scratch copy of the containers' file system (its bind mounts and volumes as empty folders):

* every service that logs in to the broker has its own URL file once `init` has run, for
  the broker user its command logs in as (a node's config names broker/node-<id>.url);
* the broker speaks TLS only, and is replicated: every Redis service (a server or a sentinel)
  runs a template `init` wrote, TLS on the port it is reached by and no plain port; the
  replica follows the primary, the sentinels watch it with a majority quorum, every user logs
  in (the servers' own users in users.acl, the sentinels' `default` off); the URLs name the
  sentinels' services and the CA, the certificate names every host anything dials, and its
  CA is the one `init` hands the host (./deploy/tls/ca.crt); the grid's services wait for
  every sentinel;
* no port is published beyond this machine (each names a loopback host address);
* every bind-mounted host path exists in the repository (no absolute host paths), read-only
  but in `init`; and every file or folder a command names under a mount `init` writes
  exists once it has run — each node config among them loads, with its users' public keys.

The checks are also run on broken copies of the file, which they must refuse."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from ops import compose_init
from ops.tls import certificate_names
from protocol.broker import parse_broker
from workers.config import load_config

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
SCHEMA = REPO / "tests" / "data" / "compose-spec.json"
INIT = "init"
ROLE_COMMANDS = {"gateway": "gateway", "flower": "flower", "edge": "edge"}  # `gridq <sub>` → its broker user
NODE_COMMANDS = ("node", "mpc")  # `gridq node|mpc start CONFIG`: the config's [node] broker_file


# --- reading the file as compose does --------------------------------------------------------


def interpolated(value: Any, env: dict[str, str] | None = None) -> Any:
    """``value`` with compose's ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}`` and ``$$``
    replaced (every variable unset unless in ``env``): what compose runs with."""
    env = env or {}

    def one(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, default = m.group("name") or m.group("bare"), m.group("op"), m.group("default")
        if op is None:
            return env.get(name, "")
        if op == ":-":
            return env.get(name) or default
        return env.get(name, default)

    if isinstance(value, str):
        pattern = r"\$\$|\$\{(?P<name>\w+)(?:(?P<op>:?-)(?P<default>[^}]*))?\}|\$(?P<bare>[A-Za-z_]\w*)"
        if re.search(r"\$\{\w+:?[?+]", value):
            raise AssertionError(f"interpolation this test does not follow: {value!r}")
        return re.sub(pattern, one, value)
    if isinstance(value, list):
        return [interpolated(v, env) for v in value]
    if isinstance(value, dict):
        return {k: interpolated(v, env) for k, v in value.items()}
    return value


def load(path: Path = COMPOSE) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())  # anchors and `<<` merge keys resolved, as compose does


@dataclass(frozen=True)
class Mount:
    type: str  # "bind" or "volume"
    source: str | None
    target: str
    read_only: bool


def mounts(service: dict[str, Any]) -> list[Mount]:
    found = []
    for v in service.get("volumes", []):
        if isinstance(v, str):  # [SOURCE:]TARGET[:MODE]
            parts = v.split(":")
            if len(parts) == 1:
                found.append(Mount("volume", None, parts[0], False))
                continue
            source, target, mode = parts[0], parts[1], parts[2] if len(parts) > 2 else "rw"
            kind = "bind" if source.startswith((".", "/", "~")) else "volume"
            found.append(Mount(kind, source, target, "ro" in mode.split(",")))
        else:
            found.append(Mount(v["type"], v.get("source"), v["target"], bool(v.get("read_only"))))
    return found


def published(service: dict[str, Any]) -> list[tuple[str | None, str]]:
    """Each published port as (host address or None for every interface, the entry)."""
    found: list[tuple[str | None, str]] = []
    for p in service.get("ports", []):
        if isinstance(p, dict):
            found.append((p.get("host_ip"), str(p)))
            continue
        text = str(p).split("/")[0]
        if text.startswith("["):  # [::1]:5555:5555
            ip, _, rest = text[1:].partition("]")
            found.append((ip if rest.count(":") == 2 else None, str(p)))
            continue
        parts = text.split(":")
        found.append((parts[0] if len(parts) == 3 else None, str(p)))  # "5555" and "5555:5555": every interface
    return found


def command(service: dict[str, Any]) -> list[str]:
    cmd = service.get("command", [])
    return cmd if isinstance(cmd, list) else cmd.split()


def named_paths(service: dict[str, Any]) -> list[str]:
    """Absolute container paths a service's command, entrypoint or healthcheck names."""
    text = json.dumps([service.get("command"), service.get("entrypoint"), service.get("healthcheck")])
    return re.findall(r"(?<![\w.])(/(?:etc|var|data|app|srv|opt)/[^\s\"'();,]+)", text)


# --- the checks --------------------------------------------------------------------------------


def schema_errors(doc: dict[str, Any]) -> list[str]:
    schema = json.loads(SCHEMA.read_text())
    validator = jsonschema.Draft7Validator(schema)
    return [f"{'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
            for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))]


@dataclass
class AfterInit:
    """The containers' file system once `init` has run: each of init's mounts (its volumes and
    bind-mounted host folders, fresh) as a folder under ``root`` at its target."""

    root: Path
    content: dict[str, Path]  # a mount's source (volume name or host path) → where init left it
    init_mounts: list[Mount]

    def resolve(self, service: dict[str, Any], path: str) -> Path | None:
        """Where ``path`` of ``service``'s container is once init has run, if under a mount
        that init writes (a host folder init does not mount: its files in the repository);
        None for the rest. A path whose place init sees on another of its mounts (a nested
        one) is not in this one's volume: a path that does not exist."""
        mount = _under(mounts(service), path)
        if mount is None:
            return None
        rest = PurePosixPath(path).relative_to(mount.target)
        if mount.source in self.content:
            seen = str(PurePosixPath(self.init_targets[mount.source]) / rest)
            if _under(self.init_mounts, seen) != self.init_by_source[mount.source]:
                return self.root / "(not in this volume)" / rest
            return self.content[mount.source] / rest
        if mount.type == "bind" and mount.source:
            return REPO / mount.source / rest
        return None

    def inside(self, path: Path) -> str:
        """``path``, where init left it under ``root``, as a path in the containers."""
        return "/" + str(path.relative_to(self.root)) if path.is_relative_to(self.root) else str(path)

    def seen_by(self, service: dict[str, Any], path: Path) -> Path:
        """``path``, where init left it under ``root``, as ``service`` sees it (through its own mounts)."""
        if not path.is_relative_to(self.root):
            return self.root / "(outside the containers)"
        return self.resolve(service, self.inside(path)) or self.root / "(on no mount init writes)"

    @property
    def init_targets(self) -> dict[str, str]:
        return {m.source or m.target: m.target for m in self.init_mounts}

    @property
    def init_by_source(self) -> dict[str, Mount]:
        return {m.source or m.target: m for m in self.init_mounts}


def _under(found: list[Mount], path: str) -> Mount | None:
    """The mount ``path`` is on: the one with the longest target that holds it."""
    for m in sorted(found, key=lambda m: len(m.target), reverse=True):
        if path == m.target or path.startswith(m.target.rstrip("/") + "/"):
            return m
    return None


def run_init(doc: dict[str, Any], root: Path) -> AfterInit:
    """``init``'s command (``python -m ops.compose_init …``) run with its mounts under ``root``."""
    services = interpolated(doc["services"])
    init = services[INIT]
    content = {}
    for m in mounts(init):
        where = root / m.target.lstrip("/")
        where.mkdir(parents=True, exist_ok=True)
        content[m.source or m.target] = where
    cmd = command(init)
    assert cmd[:3] == ["python", "-m", "ops.compose_init"], cmd
    argv = [str(root / a.lstrip("/")) if a.startswith("/") else a for a in cmd[3:]]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRIDQ_HOME", str(root / init["environment"]["GRIDQ_HOME"].lstrip("/")))
        mp.setattr(compose_init, "SERVICE_USER", None)  # here: no switch to the image's user
        compose_init.main(argv)
    return AfterInit(root, content, mounts(init))


def own_errors(doc: dict[str, Any], after: AfterInit) -> list[str]:
    errors: list[str] = []
    services = interpolated(doc["services"])
    volumes = set(doc.get("volumes") or {})
    init_mounts = {m.source: m for m in mounts(services[INIT])}
    for name, service in services.items():
        where = f"services.{name}"
        if service.get("network_mode") == "host":
            errors.append(f"{where}: network_mode host publishes every port it listens on")
        for ip, entry in published(service):
            if ip is None or not ipaddress.ip_address(ip).is_loopback:
                errors.append(f"{where}.ports: {entry!r} is published on {ip or 'every interface (0.0.0.0)'}: "
                              "name 127.0.0.1 (TLS in front first, to widen it)")
        for m in mounts(service):
            if m.type == "volume" and m.source and m.source not in volumes:
                errors.append(f"{where}.volumes: {m.source!r} is not declared under the top-level volumes")
            if m.type == "bind":
                if not m.source or not m.source.startswith("./"):
                    errors.append(f"{where}.volumes: bind source {m.source!r} is not a folder of the repository (./…)")
                elif not (REPO / m.source).exists():
                    errors.append(f"{where}.volumes: bind source {m.source} does not exist in the repository")
                if name != INIT and not m.read_only:
                    errors.append(f"{where}.volumes: {m.source} is mounted read-write; only init may write it")
        cmd = command(service)
        if name == INIT or cmd[:1] != ["gridq"]:
            continue
        for m in mounts(service):
            shared = init_mounts.get(m.source)
            if shared is not None and shared.target != m.target:
                errors.append(f"{where}.volumes: {m.source} at {m.target}, where init has it at {shared.target}")
        needs = service.get("depends_on") or {}
        if not (isinstance(needs, dict) and needs.get(INIT, {}).get("condition") == "service_completed_successfully"
                and all(needs.get(b, {}).get("condition") == "service_healthy" for b in ["redis", *sentinels(doc)])):
            errors.append(f"{where}.depends_on: must wait for init (completed), redis and every sentinel (healthy)")
        home = (service.get("environment") or {}).get("GRIDQ_HOME")
        if not home:
            errors.append(f"{where}: GRIDQ_HOME is not set")
            continue
        errors += broker_login_errors(where, service, cmd, home, after)
    errors += broker_server_errors(doc, after)
    for name, service in services.items():  # what a command names under a mount init writes exists
        for path in named_paths(service):
            found = after.resolve(service, path)
            if found is not None and not found.exists():
                errors.append(f"services.{name}: {path} does not exist once init has run")
    return errors


def redis_services(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The broker's servers and sentinels: the services that run the Redis image."""
    return {n: s for n, s in interpolated(doc["services"]).items() if str(s.get("image", "")).startswith("redis")}


def sentinels(doc: dict[str, Any]) -> list[str]:
    return sorted(n for n, s in redis_services(doc).items() if "--sentinel" in command(s))


def directives(text: str) -> list[list[str]]:
    """A Redis configuration file's lines, split as Redis does (quotes kept together)."""
    return [shlex.split(line) for line in text.splitlines() if line.strip() and not line.startswith("#")]


def one(found: list[list[str]], name: str) -> list[str] | None:
    lines = [d[1:] for d in found if d[0] == name]
    return lines[0] if len(lines) == 1 else None


def broker_server_errors(doc: dict[str, Any], after: AfterInit) -> list[str]:
    """The broker's servers and sentinels run what init wrote, over TLS only, replicated; the
    URLs, the certificate and the host's CA agree with them."""
    errors: list[str] = []
    servers = redis_services(doc)
    primary = next((n for n, s in servers.items() if "--sentinel" not in command(s)
                    and not any(d[0] == "replicaof" for d in _template(s, after)[1])), None)
    watchers = sentinels(doc)
    if primary is None or not watchers:
        return ["services: the broker needs a primary Redis (a server that follows nobody) and sentinels"]
    dialled: set[str] = set()
    for name, service in servers.items():
        where = f"services.{name}"
        template, found = _template(service, after)
        if template is None:
            errors.append(f"{where}: its command's first argument must be a configuration template init writes")
            continue
        tls_port = one(found, "tls-port")
        if one(found, "port") != ["0"] or tls_port is None:
            errors.append(f"{where}: {template} must turn the plain port off (port 0) and name one tls-port")
            continue
        if one(found, "tls-auth-clients") != ["no"] or one(found, "tls-ca-cert-file") is None:
            errors.append(f"{where}: {template} must name the CA and log clients in by ACL user (tls-auth-clients no)")
        for _, entry in published(service):
            if entry.rsplit(":", 1)[-1] != tls_port[0]:
                errors.append(f"{where}.ports: {entry!r} publishes another port than its TLS port {tls_port[0]}")
        if name in watchers:
            monitor = [d[2:] for d in found if d[:2] == ["sentinel", "monitor"]]  # NAME HOST PORT QUORUM
            quorum = len(watchers) // 2 + 1
            if not monitor or monitor[0][1:3] != [primary, _port(servers[primary], after)] or \
                    monitor[0][3] != str(quorum):
                errors.append(f"{where}: {template} must watch {primary} with a quorum of {quorum} (a majority)")
            if not any(d[:3] == ["user", "default", "off"] for d in found):
                errors.append(f"{where}: {template} must turn the sentinel's default user off")
            if [d for d in found if d[:2] == ["sentinel", "auth-user"]] == []:
                errors.append(f"{where}: {template} must log in to the servers (sentinel auth-user)")
        else:
            if one(found, "aclfile") is None or one(found, "masteruser") != ["replica"]:
                errors.append(f"{where}: {template} must load the ACL file and log in to a primary as `replica`")
            follows = one(found, "replicaof")
            if name != primary and (follows is None or follows != [primary, _port(servers[primary], after)]):
                errors.append(f"{where}: {template} must follow the primary, {primary}")
        announced = one(found, "replica-announce-ip") or [d[2] for d in found if d[:2] == ["sentinel", "announce-ip"]]
        if announced != [name]:
            errors.append(f"{where}: {template} must announce its service name, {name}, which the certificate holds")
        dialled.add(name)
    broker = after.content.get("gridq-broker")
    if broker is None:
        return [*errors, "services.init: does not write the broker volume"]
    for url_file in sorted(p for p in broker.glob("*.url") if not p.name.endswith(compose_init.OUTSIDE)):
        url = parse_broker(url_file.read_text().strip())
        hosts = {h for h, _ in url.hosts}
        if url.scheme != "sentinels" or hosts != set(watchers) or not url.tls.get("ssl_ca_certs"):
            errors.append(f"{url_file.name}: must reach the broker through every sentinel over TLS, with the CA "
                          f"(not {url.scheme}://{','.join(sorted(hosts))})")
        dialled |= hosts
    acl = (broker / "users.acl").read_text().split("\n")
    for user in ("replica", "sentinel"):
        if not any(line.startswith(f"user {user} on ") for line in acl):
            errors.append(f"users.acl: no user {user!r}: the servers could not replicate or be watched")
    certificate = broker / "tls" / "server.crt"
    missing = dialled - set(certificate_names(certificate)) if certificate.exists() else {"(no certificate)"}
    if missing:
        errors.append(f"broker/tls/server.crt does not name {', '.join(sorted(missing))}")
    handed = after.content.get("./deploy/tls")
    if handed is None or (handed / "ca.crt").read_bytes() != (broker / "tls" / "ca.crt").read_bytes():
        errors.append("services.init: must copy the broker's CA certificate into ./deploy/tls (--tls-out)")
    return errors


def _template(service: dict[str, Any], after: AfterInit) -> tuple[str | None, list[list[str]]]:
    cmd = command(service)
    path = after.resolve(service, cmd[0]) if cmd and cmd[0].startswith("/") else None
    if path is None or not path.is_file():
        return None, []
    return cmd[0], directives(path.read_text())


def _port(service: dict[str, Any], after: AfterInit) -> str:
    return (one(_template(service, after)[1], "tls-port") or ["?"])[0]


def broker_login_errors(where: str, service: dict[str, Any], cmd: list[str], home: str, after: AfterInit) -> list[str]:
    """The URL file the command logs in with, written by init for the user it should be."""
    sub = cmd[1] if len(cmd) > 1 else ""
    if sub in ROLE_COMMANDS:
        user, url_path = ROLE_COMMANDS[sub], f"{home}/broker/{ROLE_COMMANDS[sub]}.url"
        url_file = after.resolve(service, url_path)
        if url_file is None or not url_file.exists():
            return [f"{where}: `gridq {sub}` logs in with {url_path}, which init does not write where it looks"]
    elif sub in NODE_COMMANDS and cmd[2:3] == ["start"] and len(cmd) > 3:
        config_file = after.resolve(service, cmd[3])
        if config_file is None or not config_file.is_file():
            return [f"{where}: node config {cmd[3]} is not one init writes (or the repository holds)"]
        home_dir = after.resolve(service, home)
        if home_dir is None:
            return [f"{where}: GRIDQ_HOME {home} is on no volume init writes"]
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("GRIDQ_HOME", str(home_dir))
            try:
                config = load_config(config_file)  # reads its broker_file
                config.keyring()  # and its users' public keys
            except Exception as exc:  # noqa: BLE001 - any refusal is the finding
                return [f"{where}: node config {cmd[3]} does not load once init has run: {exc}"]
        user = f"node-{config.node.id}"
        url_file = config.node.broker_file
        if url_file is None:
            return [f"{where}: node config {cmd[3]} names no broker_file (its own broker user's URL)"]
        # the files it names, as this service's mounts show them (it loaded above as init left them)
        named = [Path(f) for f in (config.node.identity, url_file, *(u.public_key_file for u in config.users.values()),
                                   *(d.path for d in config.datasets)) if f is not None]
        missing = [after.inside(f) for f in named if not after.seen_by(service, f).exists()]
        if missing:
            return [f"{where}: node config {cmd[3]} names what this service does not see: {', '.join(missing)}"]
    else:
        return [f"{where}: which broker user does `{' '.join(cmd[:3])}` log in as? (teach this test)"]
    logged_in = urlsplit(Path(url_file).read_text().strip()).username
    if logged_in != user:
        return [f"{where}: logs in as {logged_in!r}, not its own broker user {user!r}"]
    return []


# --- the tests ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load()


@pytest.fixture(scope="module")
def after_init(compose: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> AfterInit:
    return run_init(compose, tmp_path_factory.mktemp("containers"))


def test_the_vendored_schema_is_the_compose_spec():
    schema = json.loads(SCHEMA.read_text())
    assert schema["title"] == "Compose Specification" and "service" in schema["definitions"]
    jsonschema.Draft7Validator.check_schema(schema)


def test_the_compose_file_follows_the_compose_spec(compose: dict[str, Any]):
    assert schema_errors(compose) == []


def test_the_compose_file_runs_the_grid_it_describes(compose: dict[str, Any], after_init: AfterInit):
    assert own_errors(compose, after_init) == []


def test_init_seeds_the_host_folders_and_the_outside_url(compose: dict[str, Any], after_init: AfterInit):
    services = interpolated(compose["services"])
    nodes = after_init.content["./deploy/nodes"]
    keys = after_init.content["./deploy/keys"]
    demo = sorted(p.name for p in compose_init.NODE_CONFIGS.glob("*.toml"))
    assert sorted(p.name for p in nodes.glob("*.toml")) == demo
    assert sorted(p.name for p in keys.iterdir()) == compose_init.demo_user_keys() and not list(keys.glob("*.key"))
    # the scientist outside the compose network: same user and password, at the published port
    (ip, entry), = published(services["redis"])
    port = entry.split(":")[1]
    broker = after_init.content["gridq-broker"]
    inside = parse_broker((broker / "scientist.url").read_text().strip())
    outside = parse_broker((broker / "scientist.outside.url").read_text().strip())
    assert (inside.scheme, inside.hosts) == ("sentinels", (("sentinel-1", 26379), ("sentinel-2", 26379),
                                                           ("sentinel-3", 26379)))
    assert after_init.inside(Path(inside.tls["ssl_ca_certs"])) == "/var/lib/gridq/broker/tls/ca.crt"  # the volume
    assert (outside.scheme, outside.hosts) == ("rediss", (("127.0.0.1", 6379),)) and (ip, port) == ("127.0.0.1", "6379")
    assert (outside.username, outside.password, outside.db) == (inside.username, inside.password, inside.db)
    # the CA as the host sees it, from this folder: the copy init hands it
    assert outside.tls["ssl_ca_certs"] == "deploy/tls/ca.crt" and (REPO / "deploy" / "tls").is_dir()
    assert (after_init.content["./deploy/tls"] / "ca.crt").read_text().startswith("-----BEGIN CERTIFICATE-----")
    assert (broker / "scientist.outside.url").stat().st_mode & 0o077 == 0
    for secret in ("tls/ca.key", "tls/server.key", "replica.secret", "sentinel.secret", "discovery.secret",
                   "redis.conf", "sentinel-1.conf"):
        assert (broker / secret).stat().st_mode & 0o077 == 0, secret


def test_the_published_broker_port_follows_its_variable(compose: dict[str, Any]):
    redis = interpolated(compose["services"]["redis"], {"GRIDQ_BROKER_PORT": "6390"})
    init = interpolated(compose["services"][INIT], {"GRIDQ_BROKER_PORT": "6390"})
    assert redis["ports"] == ["127.0.0.1:6390:6379"]
    assert command(init)[command(init).index("--outside") + 1] == "127.0.0.1:6390"


def fresh(compose: dict[str, Any]) -> dict[str, Any]:
    """A copy to break, each service's own (yaml shares what an anchor gives several)."""
    return json.loads(json.dumps(compose))


def broken(compose: dict[str, Any], change: str) -> dict[str, Any]:
    doc = fresh(compose)
    s = doc["services"]
    if change == "misspelled key":
        s["hospital"]["restrat"] = s["hospital"].pop("restart")
    elif change == "misspelled top-level key":
        doc["volume"] = doc.pop("volumes")
    elif change == "wrong type":
        s["flower"]["ports"] = "127.0.0.1:5555:5555"
    return doc


BROKEN_OWN = {
    "a port on every interface": lambda s: s["flower"].__setitem__("ports", ["5555:5555"]),
    "a port on 0.0.0.0": lambda s: s["redis"].__setitem__("ports", ["0.0.0.0:6379:6379"]),
    "a container port published at random": lambda s: s["edge"].__setitem__("ports", ["8750"]),
    "a long-syntax port without host_ip": lambda s: s["edge"].__setitem__("ports", [{"target": 8750,
                                                                                      "published": 8750}]),
    "a misspelled node config": lambda s: s["clinic"].__setitem__("command", ["gridq", "node", "start",
                                                                              "/etc/gridq/nodes/clnic.toml"]),
    "a missing host folder": lambda s: s["gateway"]["volumes"].append("./deploy/secrets:/etc/gridq/secrets:ro"),
    "an absolute host path": lambda s: s["gateway"]["volumes"].append("/srv/gridq:/srv/gridq:ro"),
    "a host folder mounted read-write": lambda s: s["hospital"]["volumes"].__setitem__(
        2, {**s["hospital"]["volumes"][2], "read_only": False}),
    "no broker volume": lambda s: s["edge"].__setitem__("volumes", [v for v in s["edge"]["volumes"]
                                                                    if "gridq-broker" not in str(v)]),
    "the broker volume elsewhere": lambda s: s["flower"].__setitem__(
        "volumes", ["gridq-home:/var/lib/gridq", "gridq-broker:/srv/broker"]),
    "GRIDQ_HOME off the volume": lambda s: s["hospital-mpc"].__setitem__("environment", {"GRIDQ_HOME": "/srv"}),
    "an unknown command": lambda s: s["gateway"].__setitem__("command", ["gridq", "relay"]),
    "no wait for init": lambda s: s["clinic"].__setitem__("depends_on", {"redis": {"condition": "service_healthy"}}),
    "a missing key file": lambda s: s["gateway"]["command"].__setitem__(3, "/var/lib/gridq/keys/gatewy.key"),
    "a missing auth file": lambda s: s["flower"]["command"].__setitem__(5, "/var/lib/gridq/flower.pass"),
    "host networking": lambda s: s["edge"].__setitem__("network_mode", "host"),
    "a node without the keys folder": lambda s: s["hospital"].__setitem__(
        "volumes", [v for v in s["hospital"]["volumes"] if "deploy/keys" not in str(v)]),
    "a node without the broker volume": lambda s: s["clinic"].__setitem__(
        "volumes", [v for v in s["clinic"]["volumes"] if "gridq-broker" not in str(v)]),
    "a node that does not wait for a sentinel": lambda s: s["hospital"]["depends_on"].pop("sentinel-2"),
    "a replica that follows nobody": lambda s: s["redis-replica"]["command"].__setitem__(
        0, "/etc/gridq-broker/redis.conf"),
    "a server's template init does not write": lambda s: s["redis"]["command"].__setitem__(
        0, "/etc/gridq-broker/primary.conf"),
    "a sentinel of another's template": lambda s: s["sentinel-3"]["command"].__setitem__(
        0, "/etc/gridq-broker/sentinel-1.conf"),
    "a published port that is not the TLS one": lambda s: s["redis"].__setitem__("ports", ["127.0.0.1:6379:6380"]),
    "a fourth sentinel, so the quorum is no majority": lambda s: s.__setitem__(
        "sentinel-4", {**s["sentinel-3"], "command": ["/etc/gridq-broker/sentinel-3.conf", "redis-server",
                                                      "/data/sentinel.conf", "--sentinel"]}),
}


@pytest.mark.parametrize("change", ["misspelled key", "misspelled top-level key", "wrong type"])
def test_the_schema_refuses_a_broken_file(compose: dict[str, Any], change: str):
    assert schema_errors(broken(compose, change)) != []


@pytest.mark.parametrize("change", sorted(BROKEN_OWN))
def test_our_checks_refuse_a_broken_file(compose: dict[str, Any], after_init: AfterInit, change: str):
    doc = fresh(compose)
    BROKEN_OWN[change](doc["services"])
    assert own_errors(doc, after_init) != [], change


def test_a_misspelled_key_in_the_file_itself_is_caught(tmp_path: Path):
    """The whole path, on text: the file with one key misspelled fails the schema check."""
    text = COMPOSE.read_text()
    assert "    restart: unless-stopped\n" in text
    bad = tmp_path / "docker-compose.yml"
    bad.write_text(text.replace("    restart: unless-stopped\n", "    restrat: unless-stopped\n", 1))
    errors = schema_errors(load(bad))
    assert any("restrat" in e for e in errors), errors


def test_no_secret_of_the_deploy_folder_goes_into_git_or_the_image():
    ignored = (REPO / "deploy" / ".gitignore").read_text().split()
    assert "/nodes/*" in ignored and "/keys/*" in ignored
    assert "deploy" in (REPO / ".dockerignore").read_text().split()
    assert os.path.isdir(REPO / "deploy" / "nodes") and os.path.isdir(REPO / "deploy" / "keys")
