"""The node store on disk: what it holds (private data, kept results, MPC shares, request
envelopes) is readable by the node's owner only."""

from __future__ import annotations

from pathlib import Path

from workers.storage.store import Store


def test_a_node_store_is_its_owners_only(tmp_path: Path) -> None:
    """Issue 15: node.db holds shares and request envelopes; the store folder private data."""
    folder = tmp_path / "ward"
    folder.mkdir(mode=0o755)
    store = Store(folder, f"sqlite:///{folder / 'node.db'}")
    try:
        for path in (folder, folder / "objects", folder / "datasets"):
            assert path.stat().st_mode & 0o777 == 0o700, path
        assert (folder / "node.db").stat().st_mode & 0o777 == 0o600
    finally:
        store.close()
