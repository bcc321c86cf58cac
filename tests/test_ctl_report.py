"""The HTML rollout report (agent/ctl/report_html.py).

The pure tests read the page as text and through the standard HTML parser.
The browser tests open it in a headless Chromium, with scripts running, and
read back the DOM that plotly.js drew, plus a screenshot (copied to
/tmp/ctl-report.png for a human to look at). Without /usr/bin/chromium they
are skipped, except with EDGE_TEST_REQUIRE_CHROMIUM=1 (CI), where that fails.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import pytest

from agent.ctl.model import JobPhase, JobView, NodePhase, NodeView, ReportEvent
from agent.ctl.report_html import COLOURS, render_html, segments, write_html

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
T0 = 1_780_000_000.0
HOSTILE = "</script><script>alert(1)</script>"
# Would add an element to the page if it ever ran; the browser test looks for it.
HOSTILE_DOM = ("</script><script>document.body.insertAdjacentHTML('beforeend',"
               "'<b id=pwned>x</b>')</script><img src=x onerror=\"document.title='pwned'\">")
LOG_TAIL = ("I0101 keadm upgrade --toVersion v1.18.0\n"
            "E0101 health gate: edgecore exited 1 <pid=4242> & was restarted 3 times\n")


def event(node: str, seq: int, phase: str, at: float, *, final: bool = False,
          result: str | None = None, reason: str = "", log_tail: str = "") -> ReportEvent:
    return ReportEvent(
        node=node, sequence=seq, phase=phase, state="InProgress", final=final, result=result,
        reason=reason or phase, from_version="v1.17.0", to_version="v1.18.0",
        timestamp="2026-05-28T20:26:40Z", received_at=T0 + at, log_tail=log_tail)


def node(name: str, phase: NodePhase, steps: list[tuple[str, float]], *, result: str | None = None,
         reason: str = "", finished: float | None = None, log_tail: str = "",
         dispatched: float | None = 0.0) -> NodeView:
    """A node whose reports are ``steps`` (agent state, seconds after T0); a final
    state ends it."""
    finals = {"succeeded", "skipped", "failed", "rolled_back", "rollback_failed", "rejected"}
    events = tuple(
        event(name, i, phase_, at, final=phase_ in finals,
              result=result if phase_ in finals else None,
              reason=reason if phase_ in finals else "",
              log_tail=log_tail if phase_ in ("rolling_back", "rolled_back") else "")
        for i, (phase_, at) in enumerate(steps, 1))
    if finished is None and events and events[-1].final:
        finished = events[-1].received_at - T0
    return NodeView(
        name=name, phase=phase, from_version="v1.17.0", to_version="v1.18.0",
        last_action=steps[-1][0] if steps else "", reason=reason, result=result,
        dispatched_at=None if dispatched is None else T0 + dispatched,
        finished_at=None if finished is None else T0 + finished, events=events)


def upgrade(start: float, install: float, verify: float) -> list[tuple[str, float]]:
    """A plain successful upgrade, with a repeated image-pull progress report."""
    return [("received", start), ("prechecked", start + 2.9), ("prechecked", start + 9.0),
            ("image_ready", start + 24.1), ("backed_up", start + 26.0),
            ("installing", start + 26.2), ("verifying", start + 26.2 + install),
            ("succeeded", start + 26.2 + install + verify)]


def finished_job() -> JobView:
    nodes = (
        node("edge-1", NodePhase.SUCCESSFUL, upgrade(0.3, 41.5, 20.0), result="upgrade_success"),
        node("edge-2", NodePhase.SUCCESSFUL,
             [("received", 0.4), ("prechecked", 3.0), ("awaiting_confirmation", 3.2),
              ("prechecked", 60.0), ("image_ready", 80.5), ("backed_up", 83.0),
              ("installing", 83.1), ("verifying", 140.0), ("succeeded", 171.7)],
             result="upgrade_success"),
        node("edge-3", NodePhase.SUCCESSFUL, upgrade(95.0, 30.0, 12.5), result="upgrade_success",
             dispatched=94.8),
        node("edge-4", NodePhase.FAILURE,
             [("received", 110.0), ("prechecked", 112.0), ("image_ready", 130.0),
              ("backed_up", 131.0), ("installing", 131.2), ("rolling_back", 190.0),
              ("rolled_back", 231.0)],
             result="upgrade_failed_rollback_success", dispatched=109.9, log_tail=LOG_TAIL,
             reason="health gate failed: edgecore v1.18.0 exited 1; restored v1.17.0"),
        node("edge-5", NodePhase.UNKNOWN,
             [("received", 140.0), ("prechecked", 142.5), ("image_ready", 165.0),
              ("backed_up", 167.0), ("installing", 167.5)],
             reason="no report for 300s", dispatched=139.8, finished=467.5),
        node("edge-6", NodePhase.SKIPPED, [], dispatched=None,
             reason="failure tolerance 0.1 reached: not dispatched"),
    )
    return JobView(
        name="upgrade-v1-18", operation="upgrade", version="v1.18.0",
        image="kubeedge/installation-package", phase=JobPhase.FAILURE, concurrency=2,
        failure_tolerate=0.1, timeout_seconds=300, created_at=T0 - 5, updated_at=T0 + 467.5,
        history_id="h-7f3a", reason="failure tolerance exceeded", nodes=nodes)


# Bars each finished node draws, by trace (legend entry), in legend order.
EXPECTED_BARS = {
    "succeeded": 5 + 7 + 5,   # edge-2 waits for confirmation between two image pulls
    "failed / rolled back": 4,
    "rollback": 1,
    "unknown / in progress": 4,   # edge-5's install bar runs until it was declared Unknown
}


def running_job() -> JobView:
    nodes = (
        node("edge-a", NodePhase.SUCCESSFUL, upgrade(0.0, 20.0, 10.0), result="upgrade_success"),
        node("edge-b", NodePhase.IN_PROGRESS,
             [("received", 1.0), ("prechecked", 3.0), ("image_ready", 20.0),
              ("backed_up", 21.0), ("installing", 21.5)]),
        node("edge-c", NodePhase.PENDING, [], dispatched=None),
    )
    return dataclasses.replace(finished_job(), name="upgrade-running", phase=JobPhase.IN_PROGRESS,
                               reason="", nodes=nodes)


def hostile_job() -> JobView:
    job = finished_job()
    bad = dataclasses.replace(
        job.nodes[3], name="edge-<b>4</b>" + HOSTILE_DOM, reason=HOSTILE + HOSTILE_DOM,
        last_action=HOSTILE, result=HOSTILE,
        events=tuple(dataclasses.replace(e, reason=HOSTILE + HOSTILE_DOM,
                                         log_tail=e.log_tail and HOSTILE + HOSTILE_DOM)
                     for e in job.nodes[3].events))
    return dataclasses.replace(job, name=HOSTILE, image=HOSTILE_DOM, reason=HOSTILE,
                               nodes=(*job.nodes[:3], bad, *job.nodes[4:]))


class Page(HTMLParser):
    """The parts of a page the tests look at."""

    VOID = {"meta", "br", "img", "input", "link", "hr", "col", "source", "wbr", "area", "base"}

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.urls: list[str] = []
        self.scripts: list[str] = []
        self.ids: set[str] = set()
        self.stack: list[str] = []             # classes of the open elements
        self.texts: dict[str, list[str]] = {}  # element id -> its text
        self.bar_traces: list[list[str]] = []  # per g.trace.bars: the fill of each bar path
        self._open: list[str] = []             # ids being collected
        self._in_script = False
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        self.urls += [a[k] for k in ("src", "href", "xlink:href", "action") if k in a]
        classes = a.get("class", "").split()
        if tag == "script":
            self._in_script = True
            self.scripts.append("")
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "g" and {"trace", "bars"} <= set(classes):
            self.bar_traces.append([])
        if tag == "path" and self.bar_traces and self.stack and "point" in self.stack[-1].split():
            fill = re.search(r"fill:\s*([^;]+)", a.get("style", ""))
            self.bar_traces[-1].append(fill.group(1).strip() if fill else "")
        if tag not in self.VOID:
            self.stack.append(" ".join(classes))
            self._open.append(a.get("id", ""))
            if a.get("id"):
                self.texts[a["id"]] = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._in_script = False
        if tag not in self.VOID and self.stack:
            self.stack.pop()
            self._open.pop()

    def handle_data(self, data: str) -> None:
        if self._in_script:
            self.scripts[-1] += data
        for id_ in filter(None, self._open):
            self.texts[id_].append(data)

    def text(self, id_: str) -> str:
        return " ".join(" ".join(self.texts[id_]).split())


def test_page_loads_nothing_from_the_network() -> None:
    page = render_html(finished_job(), now=T0 + 500)
    parsed = Page(page)
    remote = [u for u in parsed.urls if re.match(r"\s*(https?:)?//", u, re.IGNORECASE)]
    assert remote == []
    assert "<link" not in page and "@import" not in page
    assert "Plotly.newPlot" in page and len(page) > 1_000_000   # plotly.js is inline
    assert "default-src 'none'" in page   # and the browser would refuse to fetch anyway


def test_summary_slowest_and_failures() -> None:
    parsed = Page(render_html(finished_job(), now=T0 + 500))
    counts = {p: parsed.text(f"count-{p}")
              for p in ("Successful", "Failure", "Unknown", "Skipped", "InProgress", "Pending",
                        "total")}
    assert counts == {"Successful": "3", "Failure": "1", "Unknown": "1", "Skipped": "1",
                      "InProgress": "0", "Pending": "0", "total": "6"}
    assert "upgrade-v1-18" in parsed.text("title")
    job = parsed.text("job")
    for needle in ("operation upgrade", "version v1.18.0", "image kubeedge/installation-package",
                   "phase Failure", "concurrency 2", "failure tolerance 0.1 (10%)"):
        assert needle in job

    # edge-5 (Unknown at +467.5 s) took longest, then edge-2, edge-4, edge-1, edge-3;
    # edge-6 never ran.
    slowest = parsed.text("slowest")
    order = [slowest.index(n) for n in ("edge-5", "edge-2", "edge-4", "edge-1", "edge-3")]
    assert order == sorted(order)
    assert "edge-6" not in slowest
    assert "5m 28s" in slowest   # 467.5 - 139.8


def test_failure_reason_and_escaped_log_tail() -> None:
    page = render_html(finished_job(), now=T0 + 500)
    assert "health gate failed: edgecore v1.18.0 exited 1; restored v1.17.0" in page
    assert "upgrade_failed_rollback_success" in page
    assert ("<pre>I0101 keadm upgrade --toVersion v1.18.0\n"
            "E0101 health gate: edgecore exited 1 &lt;pid=4242&gt; &amp; was restarted 3 times\n"
            "</pre>") in page
    assert "no report for 300s" in page and "failure tolerance 0.1 reached" in page


def test_hostile_strings_cannot_break_out() -> None:
    page = render_html(hostile_job(), now=T0 + 500)
    benign = Page(render_html(finished_job(), now=T0 + 500))
    parsed = Page(page)
    assert "<script>alert(1)" not in page
    assert "<b id=pwned>" not in page and "<img src=x" not in page
    # The same scripts as a benign page, none of them an agent's: nothing closed one early.
    assert len(parsed.scripts) == len(benign.scripts)
    assert not any(s.strip().startswith(("alert(", "document.body")) for s in parsed.scripts)
    assert page.lower().count("</script") == page.lower().count("<script")
    assert "&lt;/script&gt;&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "x" not in parsed.urls   # the <img src=x> stayed text


def test_segments_of_running_and_finished_nodes() -> None:
    job = running_job()
    now = T0 + 100
    done = segments(job.nodes[0], now)
    assert [s.step for s in done] == ["precheck", "image", "backup", "install", "verify"]
    assert done[-1].end == job.nodes[0].finished_at
    running = segments(job.nodes[1], now)
    assert [s.step for s in running] == ["precheck", "image", "backup", "install"]
    assert running[-1].end == now   # still installing
    assert segments(job.nodes[2], now) == []
    # A segment ends where the next different state begins; repeats do not split it.
    assert [(s.start - T0, s.end - T0) for s in running] == [
        (1.0, 3.0), (3.0, 20.0), (20.0, 21.0), (21.0, 100.0)]
    page = render_html(job, now=now)
    assert "1 node(s) sent no report" in page


def test_no_reports_yet() -> None:
    job = dataclasses.replace(running_job(), nodes=(
        node("edge-a", NodePhase.PENDING, [], dispatched=None),
        node("edge-b", NodePhase.IN_PROGRESS, []),
    ))
    page = render_html(job, now=T0)
    assert "No reports yet." in page
    assert "Plotly" not in page


def test_plotly_is_not_imported_with_the_module() -> None:
    code = "import sys, agent.ctl.report_html; print('plotly' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"


def test_write_html_is_atomic(tmp_path: Path) -> None:
    target = tmp_path / "report.html"
    target.write_text("old")
    write_html(running_job(), target)
    assert target.read_text().startswith("<!DOCTYPE html>")
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]


def chromium(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    if not CHROMIUM.exists():
        if os.environ.get("EDGE_TEST_REQUIRE_CHROMIUM") == "1":
            pytest.fail(f"{CHROMIUM} is missing (apt-get install chromium), "
                        "and EDGE_TEST_REQUIRE_CHROMIUM=1")
        pytest.skip(f"{CHROMIUM} is missing: apt-get install chromium")
    profile = tempfile.mkdtemp(prefix="chromium-", dir=tmp)
    argv = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", f"--user-data-dir={profile}", "--virtual-time-budget=10000",
            *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=True)


def test_chart_renders_in_a_browser(tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    write_html(finished_job(), page)
    dom = Page(chromium(tmp_path, "--dump-dom", page.as_uri()).stdout)
    assert "timeline" in dom.ids
    bars = {name: dom.bar_traces[i] for i, name in enumerate(EXPECTED_BARS)}
    assert {name: len(fills) for name, fills in bars.items()} == EXPECTED_BARS
    for name, fills in bars.items():   # each trace in its legend colour
        rgb = tuple(int(COLOURS[name][i:i + 2], 16) for i in (1, 3, 5))
        assert set(fills) == {"rgb({}, {}, {})".format(*rgb)}, name
    assert remote_urls(dom) == []

    shot = tmp_path / "report.png"
    chromium(tmp_path, f"--screenshot={shot}", "--window-size=1400,1000", page.as_uri())
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert shot.stat().st_size > 20_000
    shutil.copyfile(shot, "/tmp/ctl-report.png")


def remote_urls(dom: Page) -> list[str]:
    return [u for u in dom.urls if re.match(r"\s*(https?:)?//", u, re.IGNORECASE)]


def test_hostile_strings_stay_text_in_a_browser(tmp_path: Path) -> None:
    page = tmp_path / "hostile.html"
    page.write_text(render_html(hostile_job(), now=T0 + 500))
    dom_text = chromium(tmp_path, "--dump-dom", page.as_uri()).stdout
    dom = Page(dom_text)
    assert "pwned" not in dom.ids
    assert "<title>pwned</title>" not in dom_text
    assert sum(len(t) for t in dom.bar_traces) == sum(EXPECTED_BARS.values())
    # plotly shows the escaped node name as literal text, not as bold markup.
    assert "edge-&lt;b&gt;4&lt;/b&gt;" in dom_text
    assert remote_urls(dom) == []
