"""What the operator sees: the live table, plain progress lines, and the job's
final status in NodeUpgradeJob status shape.

On a TTY the table is redrawn in place (ANSI: cursor up, clear to the end)
and trimmed to the terminal's height, in-flight nodes first, so a fleet of
thousands still fits. Anywhere else (a pipe, CI, a log file) a node whose
state changed since the last look gets one line, so nothing is overwritten
and the output is greppable; the controller looks at most every 0.25 s, so a
node that moves faster shows its latest state, not every step.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Sequence
from typing import Any, TextIO

from agent.ctl import yaml_out
from agent.ctl.model import JobView, NodePhase, NodeView

ORDER = {NodePhase.IN_PROGRESS: 0, NodePhase.FAILURE: 1, NodePhase.UNKNOWN: 2,
         NodePhase.PENDING: 3, NodePhase.SKIPPED: 4, NodePhase.SUCCESSFUL: 5}
COLUMNS = ("NODE", "PHASE", "FROM", "TO", "LAST ACTION", "ELAPSED", "REASON")


def elapsed(node: NodeView, at: float) -> str:
    if node.dispatched_at is None:
        return "-"
    span = (node.finished_at or at) - node.dispatched_at
    seconds = int(span)
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{span:.1f}s" if span < 10 else f"{seconds}s"


def row(node: NodeView, at: float) -> tuple[str, ...]:
    return (node.name, node.phase.value, node.from_version or "-", node.to_version or "-",
            node.last_action or "-", elapsed(node, at), node.reason.replace("\n", " "))


def summary(view: JobView) -> str:
    counts = ", ".join(f"{view.count(p)} {p.value}" for p in NodePhase if view.count(p))
    return (f"job {view.name}: {view.phase.value}; {len(view.nodes)} node(s): "
            f"{counts or 'none'}")


def table(view: JobView, *, at: float, width: int, max_rows: int) -> list[str]:
    nodes = sorted(view.nodes, key=lambda n: (ORDER[n.phase], n.name))
    shown = nodes[:max_rows]
    rows = [COLUMNS, *(row(n, at) for n in shown)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS) - 1)]
    lines = []
    for r in rows:
        text = "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1]
        lines.append(text[:width])
    if len(nodes) > len(shown):
        lines.append(f"... and {len(nodes) - len(shown)} more")
    return [summary(view), *lines]


class Live:
    """Prints a job's progress to ``out``: a redrawn table on a TTY, lines otherwise."""

    def __init__(self, out: TextIO, *, tty: bool | None = None, quiet: bool = False) -> None:
        self.out = out
        self.tty = out.isatty() if tty is None else tty
        self.quiet = quiet
        self.drawn = 0
        self.seen: dict[str, tuple[str, str]] = {}
        self.last_draw = 0.0

    def __call__(self, view: JobView) -> None:
        if self.quiet:
            return
        if self.tty:
            self._draw(view)
        else:
            self._lines(view)

    def _draw(self, view: JobView) -> None:
        now = time.monotonic()
        if now - self.last_draw < 0.2 and not view.phase.final:
            return
        self.last_draw = now
        size = shutil.get_terminal_size((120, 40))
        lines = table(view, at=time.time(), width=size.columns,
                      max_rows=max(3, size.lines - 4))
        if self.drawn:
            self.out.write(f"\x1b[{self.drawn}F\x1b[J")
        self.out.write("\n".join(lines) + "\n")
        self.out.flush()
        self.drawn = len(lines)

    def _lines(self, view: JobView) -> None:
        at = time.time()
        for node in view.nodes:
            key = (node.phase.value, node.last_action)
            if self.seen.get(node.name) == key:
                continue
            self.seen[node.name] = key
            stamp = time.strftime("%H:%M:%S", time.localtime(at))
            self.out.write(stamp + "  " + "  ".join(row(node, at)) + "\n")
        self.out.flush()


def status_document(view: JobView, api_version: str) -> dict[str, Any]:
    """The job in NodeUpgradeJob shape (v1alpha2 status: phase, nodeStatus[],
    actionFlow), with our ``result`` beside KubeEdge's fields."""
    return {
        "apiVersion": api_version,
        "kind": "NodeUpgradeJob",
        "metadata": {"name": view.name},
        "status": {
            "phase": view.phase.value,
            "reason": view.reason,
            "nodeStatus": [_node_status(n) for n in view.nodes],
        },
    }


def _node_status(node: NodeView) -> dict[str, Any]:
    flow: Sequence[Any] = ()
    for event in reversed(node.events):
        if event.action_flow:
            flow = event.action_flow
            break
    # currentVersion is what the node runs now: the target only if it was upgraded
    # (a prepull that succeeded changed nothing).
    current = node.to_version if node.result == "upgrade_success" else node.from_version
    out: dict[str, Any] = {
        "nodeName": node.name,
        # Skipped is ours; in KubeEdge's words a node never dispatched is still Pending.
        "phase": NodePhase.PENDING.value if node.phase is NodePhase.SKIPPED else node.phase.value,
        "currentVersion": current or "",
        "historicVersion": node.from_version or "",
        "reason": node.reason,
        "actionFlow": [{"action": a.action, "status": "True" if a.succ else "False",
                        "reason": a.reason, "time": a.finish_time} for a in flow],
    }
    if node.result:
        out["result"] = node.result
    return out


def dump_status(view: JobView, api_version: str) -> str:
    # Not yaml.dump: PyYAML's representer took 3.5 s of the drain for 10,000 nodes
    # even with libyaml's emitter (agent/ctl/yaml_out.py).
    return yaml_out.dump(status_document(view, api_version))
