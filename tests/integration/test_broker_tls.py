"""Across the internet: the broker over Redis' own TLS (Debian's redis-server, ``make redis``:
a TLS port on 127.0.0.1 and no plain one), its CA and certificate made by gridq's own set-up
(``ops.tls``). A node at another site — a folder holding only its key, its config, its
broker user's URL and the CA's certificate — runs the first use case end to end as its own
broker user. A client without the CA, with another CA, in plain text to the TLS port, over
TLS to a plain port, or through sentinels nobody runs, gets BrokerUnavailable saying what to do."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit

import pytest
import redis
import torch

from ops.demo import prepare
from ops.keys import read_identity
from ops.local import LocalGrid, free_port
from ops.redis_servers import tls_server_binary
from ops.tls import certificate_names, ensure_tls
from orchestrator import Grid
from orchestrator.transport import redis_client
from protocol.broker import parse_broker
from protocol.errors import BrokerUnavailable, PermissionDenied
from workers.storage.datasets import load_table

pytestmark = pytest.mark.integration

SITE_CONFIG = """
[node]
id = "ward"
broker_file = "{site}/node-ward.url"    # its own broker user, rediss:// with the CA below
store = "{site}/store"
identity = "{site}/ward.key"

[users.alice]
public_key_file = "{site}/alice.pub"
[users.carol]
public_key_file = "{site}/carol.pub"

[[datasets]]
name = "ward-births"
path = "{site}/births.csv"
description = "birth records of the ward, at another site"
tags = ["#ward", "#birth-records"]
allowed_users = ["alice"]
bounds = {{ weight = [0.0, 7.0], height = [20.0, 65.0] }}
"""


@pytest.fixture(scope="module")
def tls_grid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalGrid]:
    tls_server_binary()  # a clear failure, never a skip, if this machine has no redis-server with TLS
    home = tmp_path_factory.mktemp("tls-grid")
    prepare(home)
    with LocalGrid(home, acl=True, tls=True) as lg:
        lg.start([], timeout=60)  # the broker and the gateway
        yield lg


def with_query(url: str, **params: str | None) -> str:
    """``url`` with query parameters set (None: removed)."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k not in params]
    query += [(k, v) for k, v in params.items() if v is not None]
    return parts._replace(query=urlencode(query, safe="/")).geturl()


def connect(lg: LocalGrid, url: str) -> Grid:
    return Grid.connect(url, read_identity(lg.keys / "alice.key"), gateway_key=lg.gateway_key(), timeout=30)


@pytest.mark.timeout(120)
def test_a_node_at_another_site_runs_the_first_use_case_over_tls(tls_grid: LocalGrid, tmp_path: Path) -> None:
    lg = tls_grid
    ca = lg.home / "broker" / "tls" / "ca.crt"
    assert {"127.0.0.1", "localhost"} <= set(certificate_names(lg.home / "broker" / "tls" / "server.crt"))
    for role in ("gateway", "scientist", "admin"):
        url = parse_broker(lg.url_for(role))
        assert (url.scheme, url.username, url.tls["ssl_ca_certs"]) == ("rediss", role, str(ca))

    # the operator enrols the ward and hands its owner two files: the node's URL and the CA's certificate
    lg.enrol("ward")
    site = tmp_path / "site"
    site.mkdir()
    shutil.copy(ca, site / "ca.crt")
    shutil.copy(lg.keys / "ward.key", site / "ward.key")
    for user in ("alice", "carol"):
        shutil.copy(lg.keys / f"{user}.pub", site / f"{user}.pub")
    shutil.copy(lg.home / "data" / "hospital_births_feb.csv", site / "births.csv")
    url = with_query((lg.home / "broker" / "node-ward.url").read_text().strip(), ssl_ca_certs=str(site / "ca.crt"))
    (site / "node-ward.url").write_text(url + "\n")
    (site / "ward.toml").write_text(SITE_CONFIG.format(site=site))
    assert parse_broker(url).username == "node-ward" and url.startswith("rediss://node-ward:")
    assert sorted(p.name for p in site.iterdir()) == ["alice.pub", "births.csv", "ca.crt", "carol.pub",
                                                      "node-ward.url", "ward.key", "ward.toml"]

    # its worker: a real Celery worker process, with that folder as its whole home (no GRIDQ_BROKER)
    env = {k: v for k, v in os.environ.items() if k != "GRIDQ_BROKER"}
    env.update(GRIDQ_HOME=str(site), PYTHONUNBUFFERED="1")
    with open(lg.logs / "ward.log", "ab") as log:
        lg.procs["ward"] = subprocess.Popen([sys.executable, "-m", "ops.cli", "node", "start", str(site / "ward.toml")],
                                            env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True, cwd=Path(__file__).resolve().parents[2])
    lg.wait_ready(["ward"], timeout=60)
    with redis_client(lg.url_for("admin"), socket_timeout=5) as admin:
        logged_in = {c["user"] for c in admin.client_list()}
    assert "node-ward" in logged_in  # over the one port there is: TLS

    table, _ = load_table(site / "births.csv")
    with connect(lg, lg.url_for("scientist")) as alice:
        births = alice.search("#ward", "#birth-records")["ward"][0]
        assert births.shape == tuple(table.shape) and births.columns == ("weight", "height")
        assert births["weight"].mean().get().item() == table[:, 0].mean().item()
        assert torch.equal(births.sum(dim=0).submit().result().get(), table.sum(dim=0))
    with lg.connect("carol") as carol:
        births = carol.search("#ward")["ward"][0]
        with pytest.raises(PermissionDenied):
            births.mean().get()


@pytest.mark.timeout(60)
def test_a_client_without_the_ca_or_with_another_is_refused_saying_so(tls_grid: LocalGrid, tmp_path: Path) -> None:
    url = tls_grid.url_for("scientist")
    with pytest.raises(BrokerUnavailable, match=r"CERTIFICATE_VERIFY_FAILED.*not signed by a CA this system trusts.*"
                                                r"\?ssl_ca_certs=/path/to/ca\.crt") as refused:
        connect(tls_grid, with_query(url, ssl_ca_certs=None))
    assert urlsplit(url).password not in str(refused.value)  # the URL is shown without its password
    other = ensure_tls(tmp_path / "another-grid", ["127.0.0.1"])
    with pytest.raises(BrokerUnavailable, match=rf"not signed by the CA in {re.escape(str(other.ca_cert))}"):
        connect(tls_grid, with_query(url, ssl_ca_certs=str(other.ca_cert)))
    with pytest.raises(BrokerUnavailable, match=r"ssl_ca_certs\) cannot be read"):
        connect(tls_grid, with_query(url, ssl_ca_certs=str(tmp_path / "no-such-ca.crt")))


@pytest.mark.timeout(60)
def test_plain_text_to_the_tls_port_fails_saying_rediss(tls_grid: LocalGrid) -> None:
    plain = with_query(tls_grid.url_for("scientist"), ssl_ca_certs=None).replace("rediss://", "redis://", 1)
    with pytest.raises(BrokerUnavailable, match=r"The connection was closed on it: if that is a TLS port, the URL "
                                                r"must be rediss://"):
        connect(tls_grid, plain)


@pytest.mark.timeout(60)
def test_tls_to_a_plain_port_and_no_sentinel_fail_saying_so(tls_grid: LocalGrid, tmp_path: Path) -> None:
    port = free_port()
    server = subprocess.Popen([tls_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no", "--dir", str(tmp_path)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        with redis_client(f"redis://127.0.0.1:{port}/0") as plain:
            while True:
                try:
                    plain.ping()
                    break
                except redis.ConnectionError:
                    assert time.monotonic() < deadline, "a plain redis-server did not start"
                    time.sleep(0.1)
        ca = tls_grid.home / "broker" / "tls" / "ca.crt"
        with pytest.raises(BrokerUnavailable, match=rf"127\.0\.0\.1:{port} did not answer the TLS handshake in time: "
                                                    "is that Redis' plain port"):
            connect(tls_grid, f"rediss://scientist:pw@127.0.0.1:{port}/0?ssl_ca_certs={ca}")
    finally:
        server.terminate()
        server.wait(timeout=10)
    nobody = free_port()
    with pytest.raises(BrokerUnavailable, match=rf"No sentinel at 127\.0\.0\.1:{nobody} named a reachable primary "
                                                r"for the group 'gridq'"):
        connect(tls_grid, f"sentinels://scientist:pw@127.0.0.1:{nobody}/0?master=gridq&ssl_ca_certs="
                          f"{tls_grid.home / 'broker' / 'tls' / 'ca.crt'}")
