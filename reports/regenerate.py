"""Regenerate the committed example reports from a clean commit: ``python reports/regenerate.py [NAME ...]``.

Each report is made by running its suite into a fresh store and reporting it, with this checkout's code. The
working tree must be clean (committed), so that the commit each report names in its provenance is the code
that made it; commit the new reports afterwards. ``tests/test_committed_reports.py`` fails when a committed
report no longer has the sections, figures and tables a fresh one has, or names a commit outside this history.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tbptt_bench.suites.suite import tomllib

ROOT = Path(__file__).resolve().parent.parent
#: Committed report folder -> the suite that makes it (a built-in name or a file in tasks/).
REPORTS = {"quick": "quick", "standard-cpu": "tasks/standard_cpu.toml", "long": "tasks/long.toml"}

log = logging.getLogger("regenerate")


def suite_name(suite: str) -> str:
    """The store folder a suite writes: its ``[suite] name``."""
    path = ROOT / suite if suite.endswith(".toml") else ROOT / "tasks" / f"{suite}.toml"
    return tomllib.loads(path.read_text())["suite"]["name"]


def head_commit() -> str:
    """HEAD's commit; exits with status 1 when tracked files have uncommitted changes (checked before the suites
    run and again after them, so that no cell can have recorded a "+dirty" tree)."""
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.strip()
    if dirty:
        sys.exit("regenerate: the working tree has uncommitted changes; commit them first, so that each report "
                 "names the commit that made it")
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()


def cli(*args: str) -> None:
    """Run ``tbptt-bench ARGS`` with this Python; stop on failure."""
    subprocess.run([sys.executable, "-m", "tbptt_bench.cli", *args], cwd=ROOT, check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"reports to regenerate (default: all of {', '.join(REPORTS)})")
    parser.add_argument("--jobs", type=int, default=1, help="parallel cells per suite (default 1)")
    args = parser.parse_args(argv)
    names = args.names or list(REPORTS)
    unknown = sorted(set(names) - set(REPORTS))
    if unknown:
        parser.error(f"no committed report {', '.join(unknown)}; choose from {', '.join(REPORTS)}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    commit = head_commit()
    results = ROOT / "results" / "regenerate" / commit[:12]
    shutil.rmtree(results, ignore_errors=True)
    # Every suite runs before any report is written: a report written into reports/ would make the tree
    # dirty, and the next suite's cells would then record "+dirty".
    for name in names:
        started = time.perf_counter()
        cli("run", REPORTS[name], "--results", str(results), "--jobs", str(args.jobs), "--quiet")
        log.info("%s: suite ran in %.0f s", name, time.perf_counter() - started)
    if head_commit() != commit:
        sys.exit(f"regenerate: HEAD moved from {commit[:10]} while the suites ran; run it again on a quiet tree")
    for name in names:
        cli("report", str(results / suite_name(REPORTS[name])), "--out", str(ROOT / "reports" / name))
    log.info("regenerated %s at %s; commit reports/ now", ", ".join(names), commit[:10])
    return 0


if __name__ == "__main__":
    sys.exit(main())
