"""The rollout report: one self-contained HTML page for a job.

It shows the job's settings, the count of nodes per phase, a timeline of each
node's steps (drawn by plotly, whose JavaScript is embedded so the page opens
offline), the slowest nodes, and every failed, unknown or skipped node with
its reason and installer log tail. Everything an agent sent is untrusted and
is escaped before it reaches the page or the chart.
"""

from __future__ import annotations

import html
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.adapters.files import atomic_write
from agent.ctl.model import JobView, NodePhase, NodeView, ReportEvent

# The step that a segment starting at each agent state belongs to. Final
# states start nothing: they end the node's last segment.
STEP_OF = {
    "received": "precheck",
    "prechecked": "image",
    "awaiting_confirmation": "confirmation wait",
    "image_ready": "backup",
    "backed_up": "install",
    "installing": "install",
    "verifying": "verify",
    "rolling_back": "rollback",
}

# Legend entry -> colour. A rollback is orange whatever the node's outcome,
# so that it stands out inside a red (or grey) row.
COLOURS = {
    "succeeded": "#2e9e44",
    "failed / rolled back": "#d62728",
    "rollback": "#ff8c00",
    "skipped": "#6f8fb5",
    "unknown / in progress": "#9e9e9e",
}
OUTCOME = {
    NodePhase.SUCCESSFUL: "succeeded",
    NodePhase.FAILURE: "failed / rolled back",
    NodePhase.SKIPPED: "skipped",
}
PROBLEMS = (NodePhase.FAILURE, NodePhase.UNKNOWN, NodePhase.SKIPPED)
SUMMARY_ORDER = (NodePhase.SUCCESSFUL, NodePhase.FAILURE, NodePhase.UNKNOWN,
                 NodePhase.SKIPPED, NodePhase.IN_PROGRESS, NodePhase.PENDING)
CHART_LABEL_MAX = 48   # a hostile 4 KiB node name must not squeeze the chart away
HOVER_REASON_MAX = 200

CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f3f3f3}
pre{background:#f7f7f7;border:1px solid #ddd;padding:.5em;overflow-x:auto;max-height:30em}
.note{color:#666;font-style:italic}
.Successful{color:#2e9e44}.Failure{color:#d62728}.Unknown,.InProgress,.Pending{color:#777}
.Skipped{color:#6f8fb5}
"""

# The page may run nothing from the network, even if plotly.js wanted to.
CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
       "img-src data:; font-src data:")


@dataclass(frozen=True)
class Segment:
    node: str
    step: str
    start: float
    end: float
    reason: str   # the reason of the report that began the step


def segments(node: NodeView, now: float) -> list[Segment]:
    """The node's steps, from the controller's receive times of its reports."""
    out: list[Segment] = []
    current: tuple[str, ReportEvent] | None = None
    ended = False
    for event in sorted(node.events, key=lambda e: (e.received_at, e.sequence)):
        step = None if event.final else STEP_OF.get(event.phase)
        if current is not None and step == current[0]:
            continue   # a progress report, or backed_up -> installing
        if current is not None:
            out.append(Segment(node.name, current[0], current[1].received_at,
                               event.received_at, current[1].reason))
        current = None if step is None else (step, event)
        if event.final:
            ended = True
            break   # anything later is a re-sent duplicate
    if current is not None and not ended:
        if node.phase.final:   # the controller's verdict (e.g. Unknown) closed it
            end = node.finished_at or max(e.received_at for e in node.events)
        else:
            end = now
        out.append(Segment(node.name, current[0], current[1].received_at,
                           max(end, current[1].received_at), current[1].reason))
    return [s for s in out if s.end > s.start]


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _utc(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m {secs:02d}s" if minutes else f"{seconds:.1f}s"


def _chart_labels(nodes: list[NodeView]) -> dict[str, str]:
    """Short, unique y-axis labels; escaped because plotly reads <b>, <a> in labels."""
    labels: dict[str, str] = {}
    used: set[str] = set()
    for node in nodes:
        short = node.name if len(node.name) <= CHART_LABEL_MAX else (
            node.name[:CHART_LABEL_MAX - 1] + "…")
        label, n = short, 1
        while label in used:
            n += 1
            label = f"{short} #{n}"
        used.add(label)
        labels[node.name] = _e(label)
    return labels


def _chart(job: JobView, segs: list[Segment]) -> str:
    # Imported here: the edge daemon imports this package and must not pay for plotly.
    try:
        import plotly.graph_objects as go  # type: ignore[import-untyped]  # noqa: PLC0415
    except ImportError:   # the edge wheel does not ship plotly, on purpose
        raise  # the CLI names the extra to install

    by_name = {n.name: n for n in job.nodes}
    drawn = {s.node for s in segs}
    shown = [n for n in job.nodes if n.name in drawn]
    labels = _chart_labels(shown)
    t0 = min(s.start for s in segs)
    fig = go.Figure()
    for legend, colour in COLOURS.items():
        mine = [s for s in segs if legend == (
            "rollback" if s.step == "rollback"
            else OUTCOME.get(by_name[s.node].phase, "unknown / in progress"))]
        if not mine:
            continue
        fig.add_trace(go.Bar(
            name=legend, orientation="h", marker_color=colour,
            y=[labels[s.node] for s in mine],
            base=[s.start - t0 for s in mine],
            x=[s.end - s.start for s in mine],
            text=[s.step for s in mine], textposition="inside",
            insidetextanchor="middle", textangle=0,
            hovertext=[
                f"{labels[s.node]}<br>{s.step}: {_duration(s.end - s.start)}"
                f"<br>from {_utc(s.start)}<br>{_e(s.reason[:HOVER_REASON_MAX])}"
                for s in mine],
            hoverinfo="text",
        ))
    fig.update_layout(
        barmode="overlay", template="plotly_white", uniformtext={"minsize": 9, "mode": "hide"},
        height=160 + 30 * len(shown), margin={"l": 10, "r": 10, "t": 30, "b": 50},
        legend={"orientation": "h", "y": 1.02, "yanchor": "bottom", "title": {"text": "outcome"}},
        xaxis={"title": {"text": f"seconds since {_utc(t0)}"}, "rangemode": "tozero"},
        yaxis={"categoryorder": "array", "categoryarray": [labels[n.name] for n in shown],
               "autorange": "reversed", "automargin": True},
    )
    # plotly's JSON encoder writes <, > and / as \u003c-style escapes, so no
    # string from an agent can close the <script>; the tests hold it to that.
    return str(fig.to_html(full_html=False, include_plotlyjs=True, div_id="timeline",
                           config={"displaylogo": False, "responsive": True}))


def _summary(job: JobView) -> str:
    head = "".join(f'<th class="{p.value}">{p.value}</th>' for p in SUMMARY_ORDER)
    cells = "".join(f'<td id="count-{p.value}">{job.count(p)}</td>' for p in SUMMARY_ORDER)
    return (f"<table><tr>{head}<th>Total</th></tr>"
            f'<tr>{cells}<td id="count-total">{len(job.nodes)}</td></tr></table>')


def _slowest(job: JobView) -> str:
    done = [(n.finished_at - n.dispatched_at, n) for n in job.nodes
            if n.phase.final and n.finished_at is not None and n.dispatched_at is not None]
    if not done:
        return '<p class="note">No node has finished yet.</p>'
    done.sort(key=lambda item: item[0], reverse=True)
    rows = "".join(
        f'<tr><td>{i}</td><td>{_e(n.name)}</td><td class="{n.phase.value}">{n.phase.value}</td>'
        f"<td>{_duration(d)}</td><td>{_e(n.result or '')}</td></tr>"
        for i, (d, n) in enumerate(done[:10], 1))
    return ('<table id="slowest"><tr><th>#</th><th>node</th><th>phase</th>'
            f"<th>dispatch to final</th><th>result</th></tr>{rows}</table>")


def _problems(job: JobView) -> str:
    bad = [n for n in job.nodes if n.phase in PROBLEMS]
    if not bad:
        return '<p class="note">None.</p>'
    parts = []
    for n in bad:
        tail = n.log_tail
        parts.append(
            f'<div class="problem"><h3>{_e(n.name)} '
            f'<span class="{n.phase.value}">{n.phase.value}</span></h3><table>'
            f"<tr><th>last state</th><td>{_e(n.last_action)}</td></tr>"
            f"<tr><th>result</th><td>{_e(n.result or '')}</td></tr>"
            f"<tr><th>reason</th><td>{_e(n.reason)}</td></tr>"
            f"<tr><th>versions</th><td>{_e(n.from_version or '?')} → "
            f"{_e(n.to_version or '?')}</td></tr></table>"
            + (f"<pre>{_e(tail)}</pre>" if tail else '<p class="note">No log tail.</p>')
            + "</div>")
    return "".join(parts)


def render_html(job: JobView, *, now: float | None = None) -> str:
    """The whole report page for ``job``; ``now`` ends the bars of running nodes."""
    now = time.time() if now is None else now
    segs = [s for n in job.nodes for s in segments(n, now)]
    silent = sum(1 for n in job.nodes if not n.events)
    if segs:
        chart = _chart(job, segs)
        if silent:
            chart += f'<p class="note">{silent} node(s) sent no report and are not shown.</p>'
    else:
        chart = '<p class="note" id="no-reports">No reports yet.</p>'
    settings: list[tuple[str, Any]] = [
        ("operation", job.operation), ("version", job.version), ("image", job.image),
        ("phase", job.phase.value), ("concurrency", job.concurrency),
        ("failure tolerance", f"{job.failure_tolerate:g} ({job.failure_tolerate * 100:g}%)"),
        ("timeout", f"{job.timeout_seconds}s"), ("history", job.history_id),
        ("created", _utc(job.created_at)), ("updated", _utc(job.updated_at)),
    ]
    if job.reason:
        settings.append(("reason", job.reason))
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in settings)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<title>Rollout {_e(job.name)}: {_e(job.phase.value)}</title><style>{CSS}</style></head>
<body>
<h1 id="title">Rollout <code>{_e(job.name)}</code>: {_e(job.operation)} to {_e(job.version)}
<span class="{_e(job.phase.value)}">({_e(job.phase.value)})</span></h1>
<table id="job">{rows}</table>
<h2>Nodes</h2>{_summary(job)}
<h2>Timeline</h2>{chart}
<h2>Slowest nodes</h2>{_slowest(job)}
<h2>Failed, unknown and skipped nodes</h2>{_problems(job)}
<p class="note">Generated {_utc(now)}.</p>
</body></html>
"""


def write_html(job: JobView, path: Path) -> None:
    """Write the report so that a reader never sees half a page."""
    atomic_write(path, render_html(job).encode())
