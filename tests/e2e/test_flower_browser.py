"""Flower in a real browser (issue 19, point 1): `gridq flower --auth-file` on the local grid,
as an operator of a compose grid runs it (Flower's own broker user, the password `init`
writes), looked at with Debian's headless Chromium driven by playwright (no browser download).

A scientist's job that is served and one that is refused are both Celery ``SUCCESS`` (a
refusal is a signed reply carrying the typed error); Flower's task list and task pages tell
them apart by their result (``answered``, ``refused: permission_denied``: the worker's
``task-outcome`` event) and show no value — neither the released mean nor a row of the
dataset. ``/metrics`` and ``/healthcheck`` ask for the password as the pages do.

A machine without Chromium or playwright fails this test (``make browser`` provides them); it
does not skip it. The screenshots are left in the test's ``tmp_path``."""

from __future__ import annotations

import base64
import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from ops.compose_init import flower_auth
from ops.flower_app import TASKS_COLUMNS
from ops.local import LocalGrid, free_port
from protocol.contract import Tasks
from protocol.errors import PermissionDenied
from protocol.messages import RawRelease, RunJob

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
# a decimal number standing alone (not the seconds of a time of day, not part of a word or an id)
NUMBER = re.compile(r"(?<![\w.:])\d+\.\d+(?![\w.])")
ONLINE = re.compile(r'^flower_worker_online\{worker="hospital@[^"]*"\} 1\.0$', re.MULTILINE)


@dataclass(frozen=True)
class Flower:
    base: str
    user: str
    password: str
    log: Path

    @property
    def credential(self) -> str:
        return f"{self.user}:{self.password}"


def get(url: str, credential: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url)
    if credential is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(credential.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def until(what: str, check, timeout: float, log: Path) -> Any:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except OSError:  # not listening yet
            pass
        time.sleep(0.5)
    raise AssertionError(f"{what} within {timeout:.0f} s; Flower's log:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def flower(local_grid: LocalGrid, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Flower]:
    """`gridq flower --auth-file F` in the grid's home (its broker user is broker/flower.url's),
    F written as compose's `init` writes it; once its event receiver hears the workers."""
    folder = tmp_path_factory.mktemp("flower")
    user, password = flower_auth(folder).read_text().strip().split(":", 1)
    port = free_port()
    env = {k: v for k, v in local_grid.env("flower").items() if not k.startswith("FLOWER_")}
    log = folder / "flower.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "ops.cli", "flower", "--port", str(port),
                                    "--auth-file", str(folder / "flower.auth")],
                                   env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True, cwd=REPO)
    shown = Flower(f"http://127.0.0.1:{port}", user, password, log)
    try:
        # the hospital's worker online in /metrics (set by its heartbeats): Flower hears the grid's events
        until("Flower never heard the hospital's worker",
              lambda: ONLINE.search(get(f"{shown.base}/metrics", shown.credential)[1].decode()), 60, log)
        yield shown
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=15)


@dataclass(frozen=True)
class Jobs:
    served: str
    refused: str
    mean: float  # what alice was released
    rows: list[tuple[str, str]]  # the dataset, as its CSV file holds it


@pytest.fixture(scope="module")
def jobs(local_grid: LocalGrid, flower: Flower) -> Jobs:
    """Use case 1 as two scientists do it: alice (an allowed user) gets the mean weight, carol
    (not allowed) is refused it. Both once Flower shows them finished."""
    with local_grid.connect("alice") as grid:
        births = grid.search("#birth-records", "#february")["hospital"][0]
        served = grid.submit("hospital", RunJob(plan=births["weight"].mean().plan, release=RawRelease()))
        mean = float(served.value(timeout=60))
    with local_grid.connect("carol") as grid:
        births = grid.search("#birth-records", "#february")["hospital"][0]
        refused = grid.submit("hospital", RunJob(plan=births["weight"].mean().plan, release=RawRelease()))
        with pytest.raises(PermissionDenied):
            refused.wait(timeout=60)
    with open(local_grid.home / "data" / "hospital_births_feb.csv") as f:
        rows = [(w, h) for w, h in list(csv.reader(f))[1:]]

    def finished() -> bool:
        status, body = get(f"{flower.base}/api/tasks", flower.credential)
        tasks = json.loads(body) if status == 200 else {}
        return all(tasks.get(i, {}).get("state") == "SUCCESS" and tasks[i].get("outcome")
                   for i in (served.id, refused.id))

    until("Flower never showed both jobs finished", finished, 30, flower.log)
    return Jobs(served.id, refused.id, mean, rows)


def test_metrics_and_healthcheck_ask_for_the_password_as_the_pages_do(flower: Flower) -> None:
    for path in ("/metrics", "/healthcheck", "/", "/tasks", "/api/tasks"):
        assert get(flower.base + path)[0] == 401, path
        assert get(flower.base + path, f"{flower.user}:not-the-password")[0] == 401, path
        assert get(flower.base + path, f"intruder:{flower.password}")[0] == 401, path
        assert get(flower.base + path, flower.credential)[0] == 200, path
    status, metrics = get(f"{flower.base}/metrics", flower.credential)
    assert b"flower_events_total" in metrics and b"flower_worker_online" in metrics
    assert get(f"{flower.base}/healthcheck", flower.credential) == (200, b"OK")


def leaks(text: str, jobs: Jobs) -> list[str]:
    """What of the private values ``text`` shows: the released mean (to three decimals or more,
    as a number of its own) or a row of the dataset (a page also shows times and runtimes, which
    a single value of two decimals may equal by chance)."""
    found = [n for n in NUMBER.findall(text) if len(n.split(".")[1]) >= 3 and abs(float(n) - jobs.mean) < 5e-4]
    found += [f"{w}, {h}" for w, h in jobs.rows if re.search(rf"(?<![\d.]){re.escape(w)}\s*,\s*{re.escape(h)}"
                                                               rf"(?![\d.])", text)]
    return found


def field_leaks(text: str, jobs: Jobs) -> list[str]:
    """:func:`leaks`, and any single value of the dataset: for what shows a job's arguments or result."""
    values = {v for row in jobs.rows for v in row}
    return leaks(text, jobs) + [n for n in NUMBER.findall(text) if n in values]


def test_flower_in_chromium_tells_a_refused_job_from_a_served_one_and_shows_no_value(
        flower: Flower, jobs: Jobs, tmp_path: Path, chromium: dict[str, Any]) -> None:
    from flower.views.tasks import visible_task_columns
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    problems: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(**chromium)
        try:
            # no password, or a wrong one: no page (Chromium gives up on the 401 it cannot answer)
            for credentials in (None, {"username": flower.user, "password": "not-the-password"}):
                stranger = browser.new_context(http_credentials=credentials)  # type: ignore[arg-type]
                try:
                    answer = stranger.new_page().goto(f"{flower.base}/tasks")
                    assert answer is not None and answer.status == 401, credentials
                except PlaywrightError as exc:
                    assert "ERR_INVALID_AUTH_CREDENTIALS" in str(exc), exc
                finally:
                    stranger.close()

            operator = browser.new_context(http_credentials={"username": flower.user, "password": flower.password},
                                           viewport={"width": 1600, "height": 700})
            page = operator.new_page()
            page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
            page.on("console", lambda m: problems.append(f"console: {m.text}") if m.type == "error" else None)

            # the task list: both jobs, by name, state and result
            page.goto(f"{flower.base}/tasks", wait_until="load")
            rows = {}
            for job in (jobs.served, jobs.refused):
                link = page.locator(f'a[href$="/task/{quote(job, safe="")}"]')  # its uuid ("hospital:…"), a link
                rows[job] = page.locator("#tasks-table tbody tr", has=link)
                rows[job].wait_for(timeout=30_000)
            page.screenshot(path=str(tmp_path / "flower-tasks.png"), full_page=True)
            header = [label for _, label in visible_task_columns(TASKS_COLUMNS)]  # the columns, in order
            cells = {job: dict(zip(header, row.locator("td").all_inner_texts(), strict=True))
                     for job, row in rows.items()}
            listed = page.inner_text("#tasks-table_wrapper")
            # what the page draws from: the list's JSON, with the same credentials
            table = operator.request.get(f"{flower.base}/tasks/datatable", params={
                "draw": "1", "start": "0", "length": "100", "search[value]": "",
                "order[0][column]": "0", "order[0][dir]": "desc", "columns[0][data]": "received"}).json()["data"]

            # each job's page
            pages = {}
            for job in (jobs.served, jobs.refused):
                page.goto(f"{flower.base}/task/{job}", wait_until="load")
                shown = page.locator("#task-page")
                pages[job] = {"text": shown.inner_text(), **{key: shown.locator(".detail-row", has=page.locator(
                    "dt", has_text=re.compile(f"^{label}$"))).locator("dd").inner_text().strip()
                    for key, label in (("status", "Status"), ("args", "Arguments"), ("result", "Result"))}}
                name = "served" if job == jobs.served else "refused"
                page.screenshot(path=str(tmp_path / f"flower-task-{name}.png"), full_page=True)
        finally:
            browser.close()

    assert problems == []
    served, refused = cells[jobs.served], cells[jobs.refused]
    # gridq's task names and Celery's states, as the operator sees them
    assert all(label in listed.upper() for label in ("NAME", "STATE", "RESULT", "WORKER")), listed[:500]  # CSS caps
    for row in (served, refused):
        assert row["Name"] == Tasks.RUN_JOB and row["State"] == "SUCCESS" and row["Worker"].startswith("hospital@")
    assert Tasks.SEARCH in listed  # the scientists' searches, answered by the gateway
    # told apart at a glance: by the result the worker announced
    assert (served["Result"], refused["Result"]) == ("answered", "refused: permission_denied")
    assert {(t["uuid"], t["state"], t["result"]) for t in table if t["uuid"] in (jobs.served, jobs.refused)} == {
        (jobs.served, "SUCCESS", "answered"), (jobs.refused, "SUCCESS", "refused: permission_denied")}
    for job, said in ((jobs.served, "answered"), (jobs.refused, "refused: permission_denied")):
        assert Tasks.RUN_JOB in pages[job]["text"] and job in pages[job]["text"]
        assert (pages[job]["status"], pages[job]["result"]) == ("SUCCESS", said)
        assert f"'job_id': '{job}'" in pages[job]["args"]  # the request envelope (a plan and ids) ...
    # ... and nothing private on any of it: not the mean alice was released, not a row of the data
    for where, text in [("the task list", listed), *((f"task page {j}", p["text"]) for j, p in pages.items())]:
        assert leaks(text, jobs) == [], where
    for where, text in [*((f"result of {j} in the list", c["Result"]) for j, c in cells.items()),
                        *((f"arguments of {j}", p["args"]) for j, p in pages.items()),
                        *((f"list JSON {t['uuid']}", json.dumps([t.get("args"), t.get("kwargs"), t.get("result")]))
                          for t in table)]:
        assert field_leaks(text, jobs) == [], where
    assert all("sealed" not in str(t.get("result")) and "signature" not in str(t.get("result")) for t in table)
    for name in ("flower-tasks.png", "flower-task-served.png", "flower-task-refused.png"):
        assert (tmp_path / name).stat().st_size > 10_000, name  # a page was drawn, not a blank
