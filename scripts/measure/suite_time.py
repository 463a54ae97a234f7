"""How long the tests take: the fast subset and the whole suite, each run as the README gives it, one after the
other, and the README's block under "Tests" written from what pytest said.

    python scripts/measure/suite_time.py             # ~6 min on 2 cores; run it with nothing else busy
    python scripts/measure/suite_time.py --no-docs   # print the block only

Each is ``python -m pytest [-m "not slow"] -p no:cacheprovider`` in the repository (the cache would reorder
nothing, but it is left out so that each run starts as a clean clone's does). The figures are pytest's own
summary line ("N passed, M skipped ... in S s") and the wall time around the process.
"""

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts" / "figures"))
from generated_block import header, publish  # noqa: E402

SCRIPT = "measure/suite_time.py"
RUNS = {"the fast subset, `-m \"not slow\"`": ["-m", "not slow"], "the whole suite": []}


def run_pytest(args: list[str]) -> tuple[str, float, float]:
    """pytest's summary counts ("301 passed, 5 skipped"), its own seconds, and the wall seconds around it."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - started
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    found = re.search(r"=*\s*(.*?) in ([\d.]+)s", summary)
    if done.returncode != 0 or not found:
        sys.exit(f"error: pytest {' '.join(args)} exited {done.returncode} ({summary or done.stderr[-500:]}); "
                 "fix the failing tests before timing them")
    counts = re.sub(r",? \d+ warnings?", "", found.group(1))
    return counts, float(found.group(2)), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-docs", action="store_true", help="print the block, leave README.md as it is")
    options = parser.parse_args()
    lines = [header(SCRIPT, f"alone on the machine, `python scripts/{SCRIPT}`"),
             "| run | tests | pytest's seconds | wall seconds |", "|---|---|---|---|"]
    for name, args in RUNS.items():
        counts, seconds, wall = run_pytest(args)
        lines.append(f"| {name} | {counts} | **{seconds:.0f} s** | {wall:.0f} s |")
        print(lines[-1], flush=True)
    publish(REPO / "README.md", SCRIPT, lines, options.no_docs)


if __name__ == "__main__":
    main()
