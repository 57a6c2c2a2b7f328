"""The CLI's output as a terminal shows it (issue 19, point 7) and what `gridq up` leaves for a
second shell (env.sh, the kept broker port): at 80 columns and piped, ids and names are
whole; `acl show` has no Markdown escapes; messages have no doubled punctuation. No Redis
here: tests/integration/test_operator_tools.py runs the commands against real ones."""

from __future__ import annotations

import io
import re
import socket
import subprocess
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from ops.acl import SEP, rules, users
from ops.cli import app
from ops.cli_operator import preview
from ops.cli_output import sentence, show, table
from ops.enrol import enrol, gateway_database
from ops.keys import write_identity
from ops.local import BROKER_PORT_FILE, kept_broker_port

LONG_NODE = "a-node-whose-identifier-is-quite-long-indeed-0123456789abcdefghi"  # 64 characters, the most allowed
LONG_ID = "6f1c2e9a7b3d4c5e8f0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f6"  # 64 hex digits
SEP_SHOWN = "\\x06\\x16"  # kombu's separator of priority lists, as `acl show` writes it


def test_a_table_piped_at_80_columns_keeps_every_value_whole_on_its_row(capsys: pytest.CaptureFixture[str],
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    made = table("queue", "when (UTC)", "reason", "task / id", "what")
    made.add_row(f"node.{LONG_NODE}", "2026-12-06 22:00:00", "given up after 5 deliveries",
                  f"gridq.node.run_job {LONG_ID}", "")
    show(made, "no jobs waiting in any queue")
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if LONG_ID in line)
    assert f"node.{LONG_NODE}" in row and "given up after 5 deliveries" in row and "…" not in out
    assert "no jobs waiting in any queue" in out


def test_a_table_in_an_80_column_terminal_folds_values_instead_of_cutting_them() -> None:
    made = table("queue", "when (UTC)", "reason", "task / id", "what")
    made.add_row(f"node.{LONG_NODE}", "2026-12-06 22:00:00", "given up after 5 deliveries",
                  f"gridq.node.run_job {LONG_ID}", "")
    out = io.StringIO()
    Console(file=out, width=80, force_terminal=True, color_system=None).print(made)
    lines = out.getvalue().splitlines()
    assert all(len(line) <= 80 for line in lines) and "…" not in out.getvalue()
    cells = [[cell.strip() for cell in line.split("│")[1:-1]] for line in lines if line.count("│") == 6]  # body
    column = {name: "".join(row[i] for row in cells) for i, name in enumerate(("queue", "when", "reason", "task"))}
    assert column["queue"] == f"node.{LONG_NODE}"
    assert LONG_ID in column["task"]


def test_in_an_80_column_terminal_ids_and_names_stay_on_one_line(capsys: pytest.CaptureFixture[str],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # rich: a terminal (what `gridq status` sees in one)
    monkeypatch.setenv("NO_COLOR", "1")
    made = table("node", "queue", "waiting jobs", "dead letters", "worker", "datasets", whole=("node", "queue"))
    made.add_row("clinic", "node.clinic", "0", "0", "up", "birth-records-feb, birth-records-mar, digits")
    made.add_row("university", "mpc-peer.university", "0", "[red]1[/]", "[dim]MPC worker only[/]", "")
    show(made)
    lines = re.sub(r"\x1b\[[0-9;]*m", "", capsys.readouterr().out).splitlines()  # styles (bold headers) off
    assert all(len(line) <= 80 for line in lines) and "…" not in "".join(lines)
    assert any("│ university │ mpc-peer.university │" in line for line in lines), "\n".join(lines)
    assert any("│ clinic     │ node.clinic         │" in line for line in lines), "\n".join(lines)


def test_acl_show_prints_every_rule_whole_without_html_entities(tmp_path: Path) -> None:
    write_identity(tmp_path / "keys", LONG_NODE)
    enrol(gateway_database(tmp_path), LONG_NODE, tmp_path / "keys" / f"{LONG_NODE}.pub")
    result = CliRunner().invoke(app, ["acl", "show"], env={"COLUMNS": "80", "GRIDQ_HOME": str(tmp_path)})
    assert result.exit_code == 0, result.output
    out = result.output
    assert "&#" not in out and "\x06" not in out and "| `" not in out  # no HTML entities, Markdown or raw separators
    lines = out.splitlines()
    for user in users([LONG_NODE]):
        assert any(line.startswith(f"{user}: ") for line in lines), user
        for rule in rules(user, nodes=[LONG_NODE]):
            assert f"  {rule.rule.replace(SEP, SEP_SHOWN)}" in lines, rule  # whole, on one line
            assert f"      {rule.why}" in lines
    markdown = CliRunner().invoke(app, ["acl", "show", "--markdown"], env={"GRIDQ_HOME": str(tmp_path)})
    assert markdown.exit_code == 0 and "| rule | why |" in markdown.output  # what broker/users.rules.md holds


def test_acl_show_prints_a_pipe_as_a_pipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Markdown needs `|` escaped in a table cell (&#124;); a terminal shows the rule as Redis takes it."""
    import ops.acl

    real = ops.acl.rules
    monkeypatch.setattr(ops.acl, "rules", lambda user, db=0, nodes=(): [
        *real(user, db, nodes), ops.acl.Rule(f"(~a|b{SEP}[0-9] +get)", "either a|b, or the other")])
    result = CliRunner().invoke(app, ["acl", "show"], env={"COLUMNS": "80", "GRIDQ_HOME": str(tmp_path)})
    assert result.exit_code == 0, result.output
    assert "  (~a|b\\x06\\x16[0-9] +get)" in result.output.splitlines() and "      either a|b, or the other" in \
        result.output.splitlines()
    assert "&#" not in result.output
    markdown = CliRunner().invoke(app, ["acl", "show", "--markdown"], env={"GRIDQ_HOME": str(tmp_path)})
    assert "a&#124;b" in markdown.output  # the Markdown table, where the escape belongs


@pytest.mark.parametrize(("joined", "shown"), [
    ("the broker failed: ConnectionError: Error 111 connecting to 127.0.0.1:1. Connection refused.. Is Redis running",
     "the broker failed: ConnectionError: Error 111 connecting to 127.0.0.1:1. Connection refused. Is Redis running"),
    ("cannot pin: Permission denied!. Set GRIDQ_HOME", "cannot pin: Permission denied! Set GRIDQ_HOME"),
    ("is it up?.", "is it up?"),
    ("wait... then\n  go", "wait... then go"),   # an ellipsis stays, lines are joined
    ("see ../logs/redis.log.", "see ../logs/redis.log."),  # a path stays
    ("version 1.2.3 of `x`.. ok", "version 1.2.3 of `x`. ok"),
])
def test_messages_have_no_doubled_punctuation(joined: str, shown: str) -> None:
    assert sentence(joined) == shown


def test_cli_error_messages_end_without_doubled_punctuation() -> None:
    """Our own messages, where a text that may end with a period is followed by one."""
    root = Path(__file__).resolve().parents[2]
    for path in [*(root / "ops").glob("*.py")]:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            assert not re.search(r"""[.!?]\.["']""", line) or "..." in line, f"{path}:{number}: {line}"


def test_a_dead_letter_head_is_one_line_and_says_when_it_is_cut() -> None:
    assert preview("PING\r\nsomething", 15) == "PING\\r\\nsomething"
    assert preview("x" * 200, 5000) == "x" * 80 + "… (5000 bytes)"


def test_env_sh_exports_the_grid_and_puts_gridq_on_path_once(tmp_path: Path) -> None:
    from ops.demo import env_script, exports_line, gridq_bin

    home = tmp_path / "home dir"  # a space: quoted
    (home / "broker").mkdir(parents=True)
    (home / "broker" / "scientist.url").write_text("redis://scientist:pw@127.0.0.1:6390/0\n")
    bin_dir = gridq_bin()
    assert bin_dir is not None and (bin_dir / "gridq").is_file()  # the venv's gridq, as `make` installs it
    script = env_script(home, bin_dir)
    assert script.splitlines()[0] == exports_line(home)
    (home / "env.sh").write_text(script)
    shown = subprocess.run(["bash", "-c", '. "$1"; . "$1"; printf "%s\\n%s\\n%s\\n" "$GRIDQ_BROKER" "$GRIDQ_HOME" '
                            '"$PATH"; command -v gridq', "-", str(home / "env.sh")],
                           capture_output=True, text=True, timeout=10, env={"PATH": "/usr/bin:/bin"})
    assert shown.returncode == 0, shown.stderr
    broker, gridq_home, path, gridq = shown.stdout.splitlines()
    assert broker == "redis://scientist:pw@127.0.0.1:6390/0" and gridq_home == str(home)
    assert path.split(":").count(str(bin_dir)) == 1 and gridq == str(bin_dir / "gridq")  # sourced twice, once on PATH


def test_the_broker_port_is_kept_and_a_taken_one_is_said(tmp_path: Path) -> None:
    port, note = kept_broker_port(tmp_path)
    assert note == "" and (tmp_path / BROKER_PORT_FILE).read_text().strip() == str(port)
    assert kept_broker_port(tmp_path) == (port, "")  # the same at every start
    with socket.socket() as taken:  # another program on it: a new port, said so, and kept from now on
        taken.bind(("127.0.0.1", port))
        taken.listen()
        other, note = kept_broker_port(tmp_path)
    assert other != port and f"port {port}" in note and "taken by another program" in note and str(other) in note
    assert kept_broker_port(tmp_path) == (other, "")



def test_a_table_that_cannot_keep_its_ids_whole_at_80_columns_is_shown_a_row_at_a_time(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    monkeypatch.setenv("NO_COLOR", "1")
    made = table("id", "when", "who", "kind", "datasets", "release", "status", whole=("id",))
    ids = [f"{LONG_NODE[:20]}:{LONG_ID[:32]}", f"ward:{LONG_ID[32:]}"]
    for job in ids:
        made.add_row(job, "2026-12-07 01:02:03", "carol", "compute", "birth-records-feb, birth-records-mar", "raw",
                     "pending")
    show(made, "2 requests waiting")
    lines = [line.rstrip() for line in re.sub(r"\x1b\[[0-9;]*m", "", capsys.readouterr().out).splitlines()]
    assert all(len(line) <= 80 for line in lines) and "…" not in "".join(lines)
    assert [line.split()[1] for line in lines if line.startswith("id ")] == ids  # each id whole, on its line
    assert lines.count("datasets  birth-records-feb, birth-records-mar") == 2
    assert lines[-1] == "2 requests waiting"
