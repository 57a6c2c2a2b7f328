"""One-shot set-up of a docker-compose grid: keys of every demo participant, the demo data
and Flower's basic-auth credentials, written into the shared volume at ``$GRIDQ_HOME``
(see docker-compose.yml); the demo nodes enrolled at the gateway (its registry database in
the same volume), since their keys are made here.

    GRIDQ_HOME=/var/lib/gridq python -m ops.compose_init

Idempotent: existing keys are kept (a restarted ``init`` never replaces an identity the
nodes and the gateway already know), and so is Flower's password; the seeded demo data is
rewritten identically.
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

from ops.demo import prepare
from ops.enrol import enrol, gateway_database
from ops.local import NODE_CONFIGS

FLOWER_AUTH = "flower.auth"  # "operator:<secret>", mode 0600: `gridq flower --auth-file` reads it
FLOWER_USER = "operator"


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


def main() -> None:
    home = os.environ.get("GRIDQ_HOME")
    if not home:
        sys.exit("GRIDQ_HOME is not set: it names the folder shared by the gateway and the nodes")
    home_path = Path(home)
    configs = prepare(home_path)
    nodes = enrol_demo_nodes(home_path)
    auth = flower_auth(home_path)
    keys = sorted(p.name for p in (home_path / "keys").glob("*.pub"))
    data = sorted(p.name for p in (home_path / "data").iterdir())
    print(
        f"gridq init: {home_path}: public keys {', '.join(keys)}; data {', '.join(data)}; "
        f"node configs {', '.join(str(c) for c in configs)}; nodes enrolled at the gateway: {', '.join(nodes)}; "
        f"Flower's basic auth in {auth} (mode 0600)",
        flush=True,
    )


if __name__ == "__main__":
    main()
