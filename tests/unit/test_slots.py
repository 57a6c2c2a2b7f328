"""Fair shares of a node's worker processes (workers.jobs.slots): a requester holds at most
``per_user`` slots; a slot is let go when its holder is done — or killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from workers.jobs.slots import Slots


def test_a_requester_holds_at_most_its_share_and_others_are_not_counted(tmp_path: Path):
    slots = Slots(tmp_path / "slots", per_user=2)
    with slots.take("alice") as one, slots.take("alice") as two, slots.take("alice") as three:
        assert (one, two, three) == (True, True, False)
        with slots.take("carol") as other:
            assert other
    with slots.take("alice") as again:
        assert again
    assert (tmp_path / "slots").stat().st_mode & 0o777 == 0o700


def test_no_cap_with_a_share_of_zero(tmp_path: Path):
    slots = Slots(tmp_path / "slots", per_user=0)
    with slots.take("alice") as one, slots.take("alice") as two:
        assert one and two
    assert not (tmp_path / "slots").exists()


def test_a_claimed_name_never_becomes_a_path(tmp_path: Path):
    slots = Slots(tmp_path / "slots", per_user=1)
    with slots.take("../../etc/passwd") as held:
        assert held
    assert [p.parent for p in (tmp_path / "slots").iterdir()] == [tmp_path / "slots"]


HOLD = """
import sys, time
from pathlib import Path
from workers.jobs.slots import Slots
with Slots(Path(sys.argv[1]), per_user=1).take("alice") as held:
    print("held" if held else "free", flush=True)
    time.sleep(60)
"""


def test_a_slot_is_let_go_when_its_holder_is_killed(tmp_path: Path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "slots")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        slots = Slots(tmp_path / "slots", per_user=1)
        with slots.take("alice") as held:
            assert not held
        os.kill(holder.pid, signal.SIGKILL)  # as the OOM killer does
        holder.wait(10)
        with slots.take("alice") as held:
            assert held
    finally:
        holder.kill()
        holder.wait(10)
        holder.stdout.close()  # type: ignore[union-attr]
