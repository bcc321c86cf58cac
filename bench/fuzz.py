"""Long fuzz run: the properties of tests/test_fuzz.py with many more examples.

Run from the repository root::

    python bench/fuzz.py [--scale 20] [--random] [--only NAME ...] [--json]

Sets ``EDGE_FUZZ_EXAMPLES`` to ``--scale`` (default 20: about 200,000
examples, every property's count in the test suite times 20) before it
imports ``tests/test_fuzz.py``, then runs each property in turn: the same
strategies (``testkit/strategies.py``) and the same checks. ``--random`` draws
new examples on every run (``EDGE_FUZZ_RANDOM=1``) instead of the suite's
fixed sequence, which a larger scale only extends.

Prints, per property, the examples run, the wall time and examples per second
(the parsers and Hypothesis' generation together: generation usually costs
more). A failing property prints its falsifying example and the run goes on
to the others; the exit status is then 1. Never run by the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
for path in (REPO, REPO / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scale", type=float, default=20,
                    help="multiplier of every property's example count (EDGE_FUZZ_EXAMPLES)")
    ap.add_argument("--random", action="store_true", help="new examples, not the suite's")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="properties to run (test_...)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    # Read by tests/test_fuzz.py at import: its settings are fixed then.
    os.environ["EDGE_FUZZ_EXAMPLES"] = str(args.scale)
    if args.random:
        os.environ["EDGE_FUZZ_RANDOM"] = "1"
    import test_fuzz  # noqa: PLC0415

    unknown = set(args.only or ()) - set(test_fuzz.PROPERTIES)
    if unknown:
        ap.error(f"no such property: {', '.join(sorted(unknown))}")
    rows: list[dict[str, Any]] = []
    for name, (base, test) in test_fuzz.PROPERTIES.items():
        if args.only and name not in args.only:
            continue
        print(f"{name} ...", file=sys.stderr, flush=True)
        before = test_fuzz.RUNS[name]
        start = time.perf_counter()
        try:
            test()
            ok = True
        except Exception:  # a falsified property: report it, run the rest
            traceback.print_exc()
            ok = False
        wall = time.perf_counter() - start
        runs = test_fuzz.RUNS[name] - before
        rows.append({"property": name, "suite_examples": base, "examples": runs,
                     "wall_s": round(wall, 3), "per_s": round(runs / wall, 1) if wall else 0.0,
                     "ok": ok})
    failed = [r["property"] for r in rows if not r["ok"]]
    if args.json:
        json.dump({"scale": args.scale, "random": args.random, "properties": rows,
                   "failed": failed}, sys.stdout, indent=2)
        print()
    else:
        print(f"{'property':<58}{'examples':>10}{'seconds':>10}{'per s':>10}  result")
        for r in rows:
            print(f"{r['property']:<58}{r['examples']:>10}{r['wall_s']:>10.1f}"
                  f"{r['per_s']:>10.0f}  {'ok' if r['ok'] else 'FAILED'}")
        total = sum(r["examples"] for r in rows)
        wall = sum(r["wall_s"] for r in rows)
        print(f"{'total':<58}{total:>10}{wall:>10.1f}{total / wall if wall else 0:>10.0f}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
