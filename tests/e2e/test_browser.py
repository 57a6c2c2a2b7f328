"""Use case 1 in a real browser (issue 17, part 4): Debian's headless Chromium, driven by
playwright (no browser download), opens the page the HTTP edge serves (clients/ts/web/index.html
with its bundle of @gridq/client, gridq.js). Given alice's key file and the gateway's key in the
URL fragment, the page connects to the edge it came from, pins the gateway key, searches
``#birth-records #february`` and gets ``births.col("weight").mean()`` raw, as README use case 1
does; it writes the value into ``#result``, and that is the Python client's value. No request
the browser makes carries alice's secret keys. A machine without Chromium, playwright or the
bundle fails this test (``make browser``, ``make ts`` provide them); it does not skip it."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import pytest

from ops.local import LocalGrid

pytestmark = pytest.mark.integration
WEB = Path(__file__).resolve().parents[2] / "clients" / "ts" / "web"
SCREENSHOT = Path(tempfile.gettempdir()) / "gridq-browser-use-case-1.png"
ANSWER_MS = 90_000  # search, one job, its long-polled answer: seconds on a loaded 2-core machine


@pytest.fixture(scope="module")
def edge(local_grid: LocalGrid) -> Iterator[str]:
    url = local_grid.start_edge(None, "--static", str(WEB), name="edge-browser")
    yield url
    local_grid.kill("edge-browser")


def test_the_edge_s_page_does_use_case_1_in_headless_chromium(local_grid: LocalGrid, edge: str,
                                                              chromium: dict[str, Any]) -> None:
    from playwright.sync_api import Request, sync_playwright
    if not (WEB / "gridq.js").is_file():
        pytest.fail(f"no browser bundle {WEB / 'gridq.js'}: `make ts` (cd clients/ts && npm run build) makes it")

    with local_grid.connect("alice") as grid:  # what the Python client gets, as the same scientist
        births = grid.search("#birth-records", "#february")["hospital"][0]
        expected = births["weight"].mean().get()
    key_file = (local_grid.keys / "alice.key").read_text()
    secrets = [json.loads(key_file)[field] for field in ("signing_key", "box_secret")]
    fragment = urlencode({"key": key_file, "gateway": local_grid.gateway_key()}, quote_via=quote)

    sent: list[str] = []  # every request the page makes, as it goes on the wire (no fragment)

    def record(request: Request) -> None:
        body = request.post_data_buffer or b""
        sent.append(request.url.split("#")[0] + "\n" + body.decode("utf-8", "replace"))

    problems: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(**chromium)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 900})
            page.on("request", record)
            page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
            page.on("console", lambda m: problems.append(f"console: {m.text}") if m.type == "error" else None)
            page.goto(f"{edge}/#{fragment}", wait_until="load")
            page.wait_for_function("['ready', 'error'].includes(document.body.dataset.state)", timeout=30_000)
            assert page.text_content("#error") == "", page.text_content("#error")
            assert "#" not in page.url  # the page took the key out of the address bar
            page.click("#run")
            page.wait_for_function("['done', 'error'].includes(document.body.dataset.state)", timeout=ANSWER_MS)
            page.screenshot(path=str(SCREENSHOT), full_page=True)
            error = page.text_content("#error")
            result = page.text_content("#result")
            dtype = page.get_attribute("#result", "data-dtype")
            steps = page.locator("#log li").all_text_contents()
        finally:
            browser.close()

    assert error == "", f"{error}\n{steps}\n{problems}"
    assert result is not None and float(result) == expected.item(), (result, expected)
    assert dtype == str(expected.dtype).removeprefix("torch.")
    assert problems == []
    assert any("hospital/birth-records-feb" in step for step in steps), steps
    assert any("/v1/jobs" in request for request in sent), sent  # it did go through this edge
    assert not [r for r in sent if any(secret in r for secret in secrets)]  # the keys stayed in the browser
