"""``python -m protocol.schema --write | --check``: regenerate ``protocol/schema/v1/`` from the
models, or say which of its files differ from what the models give (exit 1)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path

from protocol.schema import CHECK_COMMAND, SCHEMA_DIR, WRITE_COMMAND, documents


def drifted(expected: Mapping[str, str], folder: Path) -> list[str]:
    """The files of ``folder`` that are missing, differ from ``expected`` or are not generated."""
    present = {p.name for p in folder.glob("*.json")} if folder.is_dir() else set()
    out = [name for name, text in sorted(expected.items())
           if name not in present or (folder / name).read_text(encoding="utf-8") != text]
    return out + sorted(present - set(expected))


def write(expected: Mapping[str, str], folder: Path) -> list[str]:
    """Make ``folder`` hold exactly ``expected``; the files that changed."""
    changed = drifted(expected, folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in changed:
        if name in expected:
            (folder / name).write_text(expected[name], encoding="utf-8", newline="\n")
        else:
            (folder / name).unlink()  # a schema of a type that is no longer on the wire
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m protocol.schema", description=__doc__)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help=f"rewrite {SCHEMA_DIR} from the models")
    mode.add_argument("--check", action="store_true", help="exit 1 if a file differs from what the models give")
    args = parser.parse_args(argv)
    expected = documents()
    if args.write:
        changed = write(expected, SCHEMA_DIR)
        print(f"{SCHEMA_DIR}: {len(expected)} files, {len(changed)} changed" + "".join(f"\n  {n}" for n in changed))
        return 0
    stale = drifted(expected, SCHEMA_DIR)
    if stale:
        print(f"the wire schema in {SCHEMA_DIR} differs from the models ({CHECK_COMMAND}):", file=sys.stderr)
        for name in stale:
            print(f"  {name}", file=sys.stderr)
        print(f"run `{WRITE_COMMAND}` and commit the result", file=sys.stderr)
        return 1
    print(f"{SCHEMA_DIR}: {len(expected)} files match the models")
    return 0


if __name__ == "__main__":
    sys.exit(main())
