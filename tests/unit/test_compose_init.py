"""Flower's password in a compose grid: written once by `init` (mode 0600, kept on re-run),
and `gridq flower` refusing to serve off loopback without basic auth. Flower itself is never
started here: Celery's entry point is replaced by a stand-in that records its argv."""

from __future__ import annotations

import os
import pwd
import stat
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from typer.testing import CliRunner

from ops.broker_users import ensure_broker_users
from ops.cli import app
from ops.compose_init import (
    NODE_CONFIGS,
    acting_as,
    broker_users,
    demo_user_keys,
    flower_auth,
    host_port,
    main,
    outside_url,
    seed_keys,
    seed_nodes,
    unreadable,
)
from ops.flower_app import is_loopback
from ops.keys import write_identity
from workers.config import load_config


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_writes_a_random_secret_once_readable_by_its_owner_only(tmp_path: Path):
    old = os.umask(0)  # the file's mode must not depend on the umask
    try:
        path = flower_auth(tmp_path)
    finally:
        os.umask(old)
    assert path == tmp_path / "flower.auth" and mode(path) == 0o600
    user, secret = path.read_text().strip().split(":")
    assert user == "operator" and len(secret) >= 32
    first = path.read_text()
    path.chmod(0o644)
    assert flower_auth(tmp_path) == path  # a re-run keeps the secret the operator was given ...
    assert path.read_text() == first and mode(path) == 0o600  # ... and puts its mode right
    other = tmp_path / "other"
    other.mkdir()
    assert flower_auth(other).read_text() != first  # random, not a constant


@pytest.mark.parametrize(("address", "loopback"), [
    ("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("localhost", True),
    ("0.0.0.0", False), ("", False), ("::", False), ("192.168.1.10", False), ("flower.example.org", False)])
def test_loopback_addresses(address: str, loopback: bool):
    assert is_loopback(address) is loopback


@pytest.fixture()
def flower_runs(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Each argv `gridq flower` would start Flower with; the environment is restored after."""
    started: list[list[str]] = []
    # ops.flower_app.run ends the process when Flower stops (os._exit): it must not run here
    monkeypatch.setattr("ops.flower_app.run", lambda argv: started.append(list(argv)))
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    for name in ("FLOWER_BASIC_AUTH", "FLOWER_UNAUTHENTICATED_API"):
        # set, then delete: monkeypatch then restores the variable's absence even after the
        # command under test sets it (a bare delenv of an unset name records nothing to undo,
        # and the password leaked into later tests' Flower processes)
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    monkeypatch.setenv("GRIDQ_BROKER", "redis://127.0.0.1:1/0")
    return started


def flower(*args: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(app, ["flower", "--broker", "redis://127.0.0.1:1/0", *args])


def test_flower_off_loopback_without_auth_is_refused(flower_runs: list[list[str]]):
    for address in ("0.0.0.0", "", "10.0.0.5"):
        result = flower("--address", address)
        assert result.exit_code == 1, result.output
        assert result.output.startswith("error: Flower on ")
        assert "--auth-file" in result.output and "FLOWER_BASIC_AUTH" in result.output
    assert flower_runs == [] and "FLOWER_UNAUTHENTICATED_API" not in os.environ


def test_flower_off_loopback_with_an_auth_file(flower_runs: list[list[str]], tmp_path: Path):
    auth = flower_auth(tmp_path)
    os.environ["FLOWER_UNAUTHENTICATED_API"] = "true"  # no effect once a password is set: it is taken away
    result = flower("--address", "0.0.0.0", "--auth-file", str(auth))
    assert result.exit_code == 0, result.output
    (argv,) = flower_runs
    assert "--address=0.0.0.0" in argv
    assert os.environ["FLOWER_BASIC_AUTH"] == auth.read_text().strip()
    assert not any(auth.read_text().strip().split(":")[1] in a for a in argv)  # `ps` shows no password
    assert "FLOWER_UNAUTHENTICATED_API" not in os.environ


def test_flower_off_loopback_with_flower_basic_auth(flower_runs: list[list[str]]):
    os.environ["FLOWER_BASIC_AUTH"] = "ops:s3cret-enough"
    assert flower("--address", "0.0.0.0").exit_code == 0
    assert len(flower_runs) == 1 and "FLOWER_UNAUTHENTICATED_API" not in os.environ


def test_flower_on_loopback_needs_no_password(flower_runs: list[list[str]]):
    result = flower()
    assert result.exit_code == 0, result.output
    assert "--address=127.0.0.1" in flower_runs[0] and os.environ["FLOWER_UNAUTHENTICATED_API"] == "true"
    assert "FLOWER_BASIC_AUTH" not in os.environ


def test_flower_auth_files_that_are_refused(flower_runs: list[list[str]], tmp_path: Path):
    missing = tmp_path / "nope.auth"
    result = flower("--address", "0.0.0.0", "--auth-file", str(missing))
    assert result.exit_code == 1 and result.output.startswith("error: NotFound: no Flower auth file at")
    loose = tmp_path / "loose.auth"
    loose.write_text("operator:a-long-enough-secret\n")
    loose.chmod(0o644)
    result = flower("--address", "0.0.0.0", "--auth-file", str(loose))
    assert result.exit_code == 1 and f"chmod 600 {loose}" in result.output
    for text in ("no-colon-here", "operator:", "op erator:secret", "a:b,c:d", "a:b\nc:d"):
        bad = tmp_path / "bad.auth"
        bad.write_text(text)
        bad.chmod(0o600)
        result = flower("--address", "0.0.0.0", "--auth-file", str(bad))
        assert result.exit_code == 1 and "one line 'user:password'" in result.output, text
    os.environ["FLOWER_BASIC_AUTH"] = "no password"
    result = flower("--address", "0.0.0.0")
    assert result.exit_code == 1 and "FLOWER_BASIC_AUTH must be user:password" in result.output
    assert flower_runs == []


# --- the host's deploy folder and the broker seen from outside (docker-compose.yml's init) -------

DEMO_NODES = sorted(p.stem for p in NODE_CONFIGS.glob("*.toml"))


@pytest.fixture()
def demo_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A compose volume's keys and broker URLs, without the demo data (not needed to load a config)."""
    home = tmp_path / "home"
    for name in [*DEMO_NODES, *(k.removesuffix(".pub") for k in demo_user_keys())]:
        write_identity(home / "keys", name)
    ensure_broker_users(home, "redis", 6379, nodes=DEMO_NODES)
    monkeypatch.setenv("GRIDQ_HOME", str(home))
    return home


def test_seeded_configs_take_their_users_keys_from_the_host_folder(demo_home: Path, tmp_path: Path):
    nodes, keys = tmp_path / "deploy" / "nodes", tmp_path / "deploy" / "keys"
    nodes.mkdir(parents=True)
    keys.mkdir()
    (nodes / ".gitkeep").touch()  # as in the repository: not a config, the folder counts as empty
    assert [p.name for p in seed_nodes(nodes)] == [f"{n}.toml" for n in DEMO_NODES]
    assert [p.name for p in seed_keys(keys, demo_home)] == demo_user_keys()
    assert "alice.pub" in demo_user_keys() and not list(keys.glob("*.key"))  # public keys only
    for config_file in nodes.glob("*.toml"):
        assert mode(config_file) == 0o644 and config_file.read_text().startswith("# Seeded by docker compose's `init`")
        config = load_config(config_file)
        assert config.node.identity == demo_home / "keys" / f"{config.node.id}.key"  # its secret stays in the volume
        for name, user in config.users.items():
            assert user.public_key_file == keys / f"{name}.pub"
        for name, public in config.keyring().items():
            assert public.text() == (demo_home / "keys" / f"{name}.pub").read_text().strip()
    assert unreadable(nodes) == [] and unreadable(keys) == []
    (keys / "alice.pub").chmod(0o600)
    assert unreadable(keys) == [keys / "alice.pub"]


def test_seeding_never_touches_an_owners_folder(demo_home: Path, tmp_path: Path):
    nodes, keys = tmp_path / "nodes", tmp_path / "keys"
    nodes.mkdir()
    keys.mkdir()
    (nodes / "ward.toml").write_text("# the owner's\n")
    (keys / "zoe.pub").write_text("gridq1:the-owner's\n")
    assert seed_nodes(nodes) == [] and seed_keys(keys, demo_home) == []
    (keys / "zoe.pub").unlink()
    assert seed_keys(keys, demo_home, configs=nodes) == []  # an owner's own configs admit no demo user
    (keys / "zoe.pub").write_text("gridq1:the-owner's\n")
    assert sorted(p.name for p in nodes.iterdir()) == ["ward.toml"]
    assert sorted(p.name for p in keys.iterdir()) == ["zoe.pub"]
    seeded = tmp_path / "seeded"
    seeded.mkdir()
    seed_nodes(seeded)
    (seeded / "hospital.toml").write_text("# edited\n")
    (seeded / "clinic.toml").unlink()  # an owner who runs no clinic
    assert seed_nodes(seeded) == []
    assert (seeded / "hospital.toml").read_text() == "# edited\n" and not (seeded / "clinic.toml").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root writes files for another user")
def test_as_root_seeded_files_belong_to_the_folders_owner(demo_home: Path, tmp_path: Path):
    nodes = tmp_path / "nodes"
    nodes.mkdir()
    os.chown(nodes, 4242, 4343)  # the host user who cloned the repository
    for path in seed_nodes(nodes):
        assert (path.stat().st_uid, path.stat().st_gid) == (4242, 4343)
    with tempfile.TemporaryDirectory() as folder:  # not under pytest's tmp_path, which only root may enter
        shared = Path(folder)
        shared.chmod(0o777)
        with acting_as("nobody"):  # in compose: the image's user, gridq
            (shared / "made").touch()
        assert (shared / "made").stat().st_uid == pwd.getpwnam("nobody").pw_uid
    assert os.geteuid() == 0 and os.getegid() == 0  # back to root
    with acting_as("no-such-user"):  # nothing changes
        assert os.geteuid() == 0


def test_the_outside_url_is_the_same_user_at_another_address():
    url = "redis://scientist:pa%2Fss@redis:6379/0"
    assert outside_url(url, "127.0.0.1", 6390) == "redis://scientist:pa%2Fss@127.0.0.1:6390/0"
    assert outside_url(url, "::1", 6379) == "redis://scientist:pa%2Fss@[::1]:6379/0"
    assert outside_url("redis://redis:6379/0", "127.0.0.1", 6379) == "redis://127.0.0.1:6379/0"
    assert host_port("redis:6379") == ("redis", 6379) and host_port("[::1]:6380") == ("::1", 6380)
    for bad in ("redis", ":6379", "redis:", "redis:http", "redis:0", "redis:65536"):
        with pytest.raises(ValueError):
            host_port(bad)


def test_broker_users_write_the_scientists_outside_url(tmp_path: Path):
    (written,) = broker_users(tmp_path, "redis:6379", "127.0.0.1:6390")
    assert written == tmp_path / "broker" / "scientist.outside.url" and mode(written) == 0o600
    inside = urlsplit((tmp_path / "broker" / "scientist.url").read_text().strip())
    outside = urlsplit(written.read_text().strip())
    assert (inside.hostname, inside.port, outside.hostname, outside.port) == ("redis", 6379, "127.0.0.1", 6390)
    assert (outside.username, outside.password) == ("scientist", inside.password)
    first = written.read_text()
    broker_users(tmp_path, "redis:6379", "127.0.0.1:6390")
    assert written.read_text() == first  # passwords are kept: the URL handed out stays valid
    broker_users(tmp_path, "redis:6379", "127.0.0.1:6391")  # another published port
    assert urlsplit(written.read_text().strip()).port == 6391
    (tmp_path / "other").mkdir()
    assert broker_users(tmp_path / "other", "redis:6379", None) == []  # no --outside: no such file


def test_init_run_twice_keeps_what_the_owner_wrote(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]):
    home, nodes, keys = tmp_path / "home", tmp_path / "nodes", tmp_path / "keys"
    nodes.mkdir()
    keys.mkdir()
    monkeypatch.setenv("GRIDQ_HOME", str(home))
    monkeypatch.setattr("ops.compose_init.SERVICE_USER", None)
    argv = ["--nodes", str(nodes), "--keys", str(keys), "--broker", "redis:6379", "--outside", "127.0.0.1:6379"]
    main(argv)
    out = capsys.readouterr().out
    assert f"{nodes}: seeded with the demo's" in out and f"{keys}: seeded with the demo's" in out
    assert f'export GRIDQ_BROKER="$(docker compose exec -T gateway cat {home}/broker/scientist.outside.url)"' in out
    url = (home / "broker" / "scientist.outside.url").read_text()
    hospital = nodes / "hospital.toml"
    hospital.write_text(hospital.read_text() + '\n[users.zoe]\npublic_key_file = "../keys/zoe.pub"\n')
    write_identity(tmp_path / "zoe", "zoe")
    (keys / "zoe.pub").write_text((tmp_path / "zoe" / "zoe.pub").read_text())
    (keys / "eve.pub").unlink()
    main(argv)
    out = capsys.readouterr().out
    assert f"{nodes}: kept as it is (not empty)" in out and f"{keys}: kept as it is (not empty)" in out
    assert "[users.zoe]" in hospital.read_text() and not (keys / "eve.pub").exists()
    assert (home / "broker" / "scientist.outside.url").read_text() == url
    assert "zoe" in load_config(hospital).keyring()


def test_the_broker_speaks_tls_and_its_ca_is_handed_to_the_host(tmp_path: Path):
    from ops.compose_init import publish_ca
    from ops.tls import certificate_names, ensure_tls
    from protocol.broker import parse_broker

    home, host = tmp_path / "home", tmp_path / "deploy-tls"
    host.mkdir()
    broker_users(home, "redis:6379", "127.0.0.1:6390", replica="redis-replica:6379",
                 sentinels=["sentinel-1:26379", "sentinel-2:26379"], tls_names=["broker.example.org"])
    folder = home / "broker"
    names = set(certificate_names(folder / "tls" / "server.crt"))
    assert {"redis", "redis-replica", "sentinel-1", "sentinel-2", "127.0.0.1", "broker.example.org"} <= names
    assert mode(folder / "tls" / "ca.key") == mode(folder / "tls" / "server.key") == 0o600
    gateway = parse_broker((folder / "gateway.url").read_text().strip())
    assert gateway.scheme == "sentinels" and gateway.sentinel_auth["username"] == "discovery"
    assert gateway.tls["ssl_ca_certs"] == str(folder / "tls" / "ca.crt")
    for template in ("redis.conf", "redis-replica.conf", "sentinel-1.conf", "sentinel-2.conf"):
        assert mode(folder / template) == 0o600  # they hold the replication and sentinel passwords
    assert "replicaof redis 6379" in (folder / "redis-replica.conf").read_text()
    assert "sentinel monitor gridq redis 6379 2" in (folder / "sentinel-1.conf").read_text()
    ca = publish_ca(host, folder / "tls" / "ca.crt")
    assert ca.read_bytes() == (folder / "tls" / "ca.crt").read_bytes() and mode(ca) == 0o644
    other = ensure_tls(tmp_path / "another", ["x"]).ca_cert  # a new volume, a new CA: the host's copy follows it
    assert publish_ca(host, other).read_bytes() == other.read_bytes()
    first = (folder / "tls" / "server.crt").read_bytes()
    broker_users(home, "redis:6379", "127.0.0.1:6390", replica="redis-replica:6379",
                 sentinels=["sentinel-1:26379", "sentinel-2:26379"], tls_names=["broker.example.org"])
    assert (folder / "tls" / "server.crt").read_bytes() == first  # idempotent: the same names keep the certificate
