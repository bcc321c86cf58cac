"""A self-contained local rehearsal of the agent's main job.

Builds a sandboxed edge node (stand-in edgecore v1.12.1 and unpacked
installation-package images) under ./.rehearsal, then drives it with the real
agent CLI: status, a dry run, a successful upgrade to v1.13.0, and an upgrade
to a v1.14.0 build whose edgecore crashes on start, which the health gate
catches and rolls back. Prints every report the agent queued.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from standins import make_image_dir, make_node, start_edgecore, stop_edgecore  # noqa: E402

BASE = REPO / ".rehearsal"
ROOT = BASE / "root"
CONFIG = BASE / "agent.yaml"
IMAGE = "kubeedge/installation-package"


def agent(*args: str) -> int:
    cmd = [sys.executable, "-m", "agent", "--config", str(CONFIG), *args]
    print(f"\n$ edge-upgrade-agent {' '.join(args)}", flush=True)
    return subprocess.run(cmd, cwd=REPO, check=False).returncode


def main() -> int:
    if ROOT.exists():
        stop_edgecore(ROOT)
        shutil.rmtree(BASE)
    BASE.mkdir()
    make_node(ROOT, "v1.12.1")
    make_image_dir(ROOT / "images", IMAGE, "v1.13.0")
    make_image_dir(ROOT / "images", IMAGE, "v1.14.0", edgecore_behaviour="crash")
    start_edgecore(ROOT)
    CONFIG.write_text(
        "node_name: node-1\n"
        f"paths: {{root: {ROOT}}}\n"
        "service: {manager: process}\n"
        "health: {grace_seconds: 2, start_timeout_seconds: 10, poll_interval_seconds: 0.2}\n"
        "images: {local_dir: /images}\n"
        "precheck: {reserve_bytes: 1048576}\n"
        "logging: {level: warning}\n"
    )
    try:
        agent("status")
        agent("upgrade", "--to-version", "v1.13.0", "--check-items", "disk", "--dry-run")
        ok = agent("upgrade", "--to-version", "v1.13.0", "--yes")
        bad = agent("upgrade", "--to-version", "v1.14.0", "--yes")
        agent("history")
        print("\nReports queued for the cloud (journal outbox):")
        with sqlite3.connect(ROOT / "var/lib/edge-upgrade-agent/journal.db") as db:
            for (payload,) in db.execute("SELECT payload FROM outbox ORDER BY id"):
                r = json.loads(payload)
                if r["final"]:
                    print(json.dumps({k: r[k] for k in ("jobKey", "phase", "result", "reason",
                                                        "fromVersion", "toVersion")}, indent=2))
        agent("status")
    finally:
        stop_edgecore(ROOT)
    print(f"\nupgrade to v1.13.0 exit {ok} (0 = success); "
          f"upgrade to crashing v1.14.0 exit {bad} (1 = failed, rolled back)")
    return 0 if (ok, bad) == (0, 1) else 1


if __name__ == "__main__":
    sys.exit(main())
