"""Print the mutation score per module from mutmut's results in mutants/ (after scripts/mutation.sh).

A mutant counts as killed when a test failed or timed out on it; one that no fast test reaches counts against the
score like a survivor. Exit status 1 when the total is below the target, so the script can gate a release.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

TARGET = 0.85
KILLED = {1, 3}  # pytest's "tests failed" and "internal error"
# A mutant that drops the trainer's signal handlers lets the tests' own SIGINT interrupt pytest (exit 2) or their
# SIGTERM end the worker (-15): the tests caught it, though mutmut files these under other names.
SIGNALLED = {2, -15}
TIMEOUT = {36, -24, 24, 152, 255}  # mutmut's timeout codes (SIGXCPU and its own limit)
NOT_RUN = {None, 34}  # not checked yet, or skipped


def module_of(meta: Path, root: Path) -> str:
    return ".".join(meta.relative_to(root).with_suffix("").with_suffix("").parts)


def main() -> int:
    root = Path("mutants")
    rows = []
    for meta in sorted(root.glob("cnnrun/**/*.py.meta")):
        codes = json.loads(meta.read_text())["exit_code_by_key"].values()
        count = Counter("killed" if c in KILLED | TIMEOUT | SIGNALLED else "not run" if c in NOT_RUN else "alive"
                        for c in codes)
        rows.append((module_of(meta, root), count))
    if not rows:
        print("no results under mutants/: run scripts/mutation.sh first", file=sys.stderr)
        return 2
    total = Counter()
    print(f"{'module':<24} {'mutants':>7} {'killed':>6} {'alive':>5} {'not run':>7} {'score':>6}")
    for module, count in rows:
        total += count
        print(_row(module, count))
    print(_row("total", total))
    tested = total["killed"] + total["alive"]
    return 0 if tested and total["killed"] / tested >= TARGET else 1


def _row(name: str, count: Counter) -> str:
    tested = count["killed"] + count["alive"]
    score = f"{100 * count['killed'] / tested:5.1f}%" if tested else "    -"
    return (f"{name:<24} {tested + count['not run']:>7} {count['killed']:>6} {count['alive']:>5} "
            f"{count['not run']:>7} {score:>6}")


if __name__ == "__main__":
    sys.exit(main())
