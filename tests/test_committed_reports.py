"""The committed example reports are current: a fresh quick report has the committed one's sections, figures
and tables, and every committed report names a clean commit of this history (``reports/regenerate.py``)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = sorted(p.parent for p in (ROOT / "reports").glob("*/report.md"))


def outline(report: Path) -> dict[str, list[str]]:
    """What a report is made of: its headings, figure names and table names (not its numbers)."""
    headings = [line.strip() for line in (report / "report.md").read_text().splitlines() if line.startswith("#")]
    return {"headings": headings[1:],  # the first names the suite and its folder
            "figures": sorted(p.stem for p in (report / "figures").glob("*.png")),
            "tables": sorted(p.name for p in (report / "tables").glob("*.csv"))}


def claimed_commit(report: Path) -> str:
    match = re.search(r"^\| git commit \| (.+?) \|$", (report / "report.md").read_text(), re.M)
    assert match, f"{report.name}: no git commit in its provenance"
    return match.group(1)


def test_a_fresh_quick_report_has_the_committed_ones_outline(quick_run: Path) -> None:
    fresh, committed = outline(quick_run / "reports" / "quick"), outline(ROOT / "reports" / "quick")
    for part in ("headings", "figures", "tables"):
        assert fresh[part] == committed[part], (
            f"reports/quick is stale ({part} differ); regenerate it with `python reports/regenerate.py quick`")


@pytest.mark.parametrize("report", COMMITTED, ids=[p.name for p in COMMITTED])
def test_committed_report_names_a_clean_commit_of_this_history(report: Path) -> None:
    commit = claimed_commit(report)
    assert re.fullmatch(r"[0-9a-f]{40}", commit), f"{report.name} was made from {commit!r}, not a clean commit"
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    shallow = subprocess.run(["git", "rev-parse", "--is-shallow-repository"], cwd=ROOT, capture_output=True,
                             text=True).stdout.strip() == "true"
    ancestor = subprocess.run(["git", "merge-base", "--is-ancestor", commit, "HEAD"], cwd=ROOT, capture_output=True)
    if ancestor.returncode != 0 and shallow:
        pytest.skip("a shallow clone cannot tell")
    assert ancestor.returncode == 0, f"{report.name} claims commit {commit[:10]}, which is not in this history"
