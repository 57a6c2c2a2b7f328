"""Node configs and key files: what an owner writes by hand must fail clearly when wrong."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ops.cli import app
from ops.keys import read_identity
from protocol.errors import InvalidRequest
from protocol.identity import PublicIdentity
from workers.config import load_config
from workers.storage.datasets import load_table


def test_keys_new_writes_a_private_key_file_and_prints_the_public_key(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["keys", "new", "alice", "--dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    secret = tmp_path / "alice.key"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    identity = read_identity(secret)
    assert identity.public.text() in result.output
    assert (tmp_path / "alice.pub").read_text().strip() == identity.public.text()
    again = CliRunner().invoke(app, ["keys", "new", "alice", "--dir", str(tmp_path)])
    assert again.exit_code != 0 and read_identity(secret) == identity  # never overwritten silently


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(text)
    return path


def test_config_paths_are_relative_to_the_file_and_keys_resolve(tmp_path: Path, monkeypatch) -> None:
    CliRunner().invoke(app, ["keys", "new", "bob", "--dir", str(tmp_path / "keys")])
    monkeypatch.setenv("BROKER_URL", "redis://127.0.0.1:1234/0")
    config = load_config(_write(tmp_path, """
[node]
id = "lab"
broker = "${BROKER_URL}"
store = "store"
identity = "keys/bob.key"
[users.bob]
public_key_file = "keys/bob.pub"
[[datasets]]
name = "d"
path = "data/d.csv"
"""))
    assert config.node.broker == "redis://127.0.0.1:1234/0"
    assert config.node.store == tmp_path / "store"
    assert config.datasets[0].path == tmp_path / "data" / "d.csv"
    assert isinstance(config.keyring()["bob"], PublicIdentity)
    assert config.database_url == f"sqlite:///{tmp_path / 'store' / 'node.db'}"


@pytest.mark.parametrize("text, message", [
    ("[node]\nid = 'x'\nstore = 's'\n", "node.identity"),
    ("[node]\nid = 'bad id!'\nstore = 's'\nidentity = 'k'\n", "node.id"),
    ("[node]\nid = 'x'\nstore = '${NOT_SET_ANYWHERE}'\nidentity = 'k'\n", "NOT_SET_ANYWHERE"),
    ("[node]\nid = 'x'\nstore = 's'\nidentity = 'k'\n[users.a]\nrole = 'scientist'\n", "public_key"),
    ("[node]\nid = 'x'\nstore = 's'\nidentity = 'k'\nsurprise = 1\n", "surprise"),
    ("[node\n", "not valid TOML"),
])
def test_bad_configs_name_what_is_wrong(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        load_config(_write(tmp_path, text))


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="does not exist"):
        load_config(tmp_path / "nope.toml")


def test_datasets_load_from_csv_npy_and_safetensors_never_pickle(tmp_path: Path) -> None:
    import numpy as np
    import torch
    from safetensors.torch import save_file

    (tmp_path / "t.csv").write_text("weight,height\n3.5,50\n2.9,48.5\n")
    table, columns = load_table(tmp_path / "t.csv")
    expected = torch.tensor([[3.5, 50.0], [2.9, 48.5]], dtype=torch.float64)  # a CSV's decimals, exactly
    assert columns == ["weight", "height"] and torch.equal(table, expected) and table.dtype == torch.float64
    np.save(tmp_path / "a.npy", np.arange(4, dtype=np.int64))
    assert load_table(tmp_path / "a.npy")[0].tolist() == [0, 1, 2, 3]
    save_file({"x": torch.ones(2)}, str(tmp_path / "s.safetensors"))
    assert load_table(tmp_path / "s.safetensors")[0].tolist() == [1.0, 1.0]
    np.save(tmp_path / "o.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(InvalidRequest, match="pickle"):
        load_table(tmp_path / "o.npy")  # an object array would need pickle: refused
    (tmp_path / "m.pt").write_bytes(b"\x80\x04")
    with pytest.raises(InvalidRequest, match="unsupported"):
        load_table(tmp_path / "m.pt")
    (tmp_path / "bad.csv").write_text("a,b\n1,x\n")
    with pytest.raises(InvalidRequest, match="bad.csv:2"):
        load_table(tmp_path / "bad.csv")
