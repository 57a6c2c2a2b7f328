"""One-shot set-up of a docker-compose grid: keys of every demo participant and the demo
data, written into the shared volume at ``$GRIDQ_HOME`` (see docker-compose.yml).

    GRIDQ_HOME=/var/lib/gridq python -m ops.compose_init

Idempotent: existing keys are kept (a restarted ``init`` never replaces an identity the
nodes and the gateway already know); the seeded demo data is rewritten identically.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ops.demo import prepare


def main() -> None:
    home = os.environ.get("GRIDQ_HOME")
    if not home:
        sys.exit("GRIDQ_HOME is not set: it names the folder shared by the gateway and the nodes")
    home_path = Path(home)
    configs = prepare(home_path)
    keys = sorted(p.name for p in (home_path / "keys").glob("*.pub"))
    data = sorted(p.name for p in (home_path / "data").iterdir())
    print(
        f"gridq init: {home_path}: public keys {', '.join(keys)}; data {', '.join(data)}; "
        f"node configs {', '.join(str(c) for c in configs)}",
        flush=True,
    )


if __name__ == "__main__":
    main()
