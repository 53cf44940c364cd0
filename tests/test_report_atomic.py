"""A report killed (SIGKILL) at any point leaves the previous report whole, and the next report removes what
the killed one left behind."""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tbptt_bench.errors import UsageError
from tbptt_bench.report.report import build_report
from test_report import FAST, quick_tables

ROOT = Path(__file__).resolve().parents[1]

#: Build a report in a fresh process and SIGKILL it at the point named on the command line.
KILLER = r"""
import os, pickle, signal, sys
from tbptt_bench.report import document, figures, report
from tbptt_bench.report.document import Options

tables_file, out, point = sys.argv[1:4]
tables = pickle.load(open(tables_file, "rb"))
die = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
saved = []
real_save, real_rename = figures.save, os.rename
if point == "first-figure":
    figures.save = die
elif point == "third-figure":
    def save(*a, **k):
        saved.append(1)
        return die() if len(saved) == 3 else real_save(*a, **k)
    figures.save = save
elif point == "html":
    report.render_html = die
elif point == "between-renames":
    def rename(src, dst):
        real_rename(src, dst)
        if ".old-" in str(dst):
            die()
    report.os.rename = rename
report.build_report(tables, out, Options(n_resamples=300, formats=("png",), dpi=40))
"""


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _small_tables() -> dict[str, object]:
    """Bias, lag and perf rows of one task and model: eleven figures, built in a few seconds."""
    tables = quick_tables(tasks=("copy",), models=("lstm",))
    results = tables["results"]
    return {"results": results[results["measure"] != "train"], "curves": tables["curves"].iloc[0:0],
            "lags": tables["lags"]}


@pytest.fixture(scope="module")
def tables_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tables") / "tables.pkl"
    path.write_bytes(pickle.dumps(_small_tables()))
    return path


@pytest.fixture(scope="module")
def previous(tmp_path_factory: pytest.TempPathFactory, tables_file: Path) -> Path:
    """A finished report, copied into each test as the one a killed report must leave whole."""
    out = tmp_path_factory.mktemp("previous") / "quick"
    build_report(pickle.loads(tables_file.read_bytes()), out, FAST)
    (out / "figures" / "marker.png").write_bytes(b"from the previous report")
    return out


@pytest.mark.parametrize("point", [pytest.param("first-figure", marks=pytest.mark.slow), "third-figure",
                                   pytest.param("html", marks=pytest.mark.slow), "between-renames"])
def test_killed_report_leaves_the_previous_one_whole(tmp_path: Path, tables_file: Path, previous: Path,
                                                     point: str) -> None:
    out = tmp_path / "reports" / "quick"
    tables = pickle.loads(tables_file.read_bytes())
    shutil.copytree(previous, out)
    before = _digest(out)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-c", KILLER, str(tables_file), str(out), point], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    siblings = sorted(p.name for p in out.parent.iterdir())
    if point == "between-renames":
        # killed after the old report was set aside: it is whole there, and the next report puts it back first
        assert not out.exists() and any(".old-" in name for name in siblings)
        aside = next(p for p in out.parent.iterdir() if ".old-" in p.name)
        assert _digest(aside) == before
    else:
        assert _digest(out) == before
    build_report(tables, out, FAST)
    assert sorted(p.name for p in out.parent.iterdir()) == ["quick"]
    assert not (out / "figures" / "marker.png").exists()
    assert (out / "report.html").stat().st_size > 10_000


def test_out_that_is_not_a_report_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(UsageError, match="holds no report"):
        build_report(quick_tables(tasks=("copy",), models=("lstm",)), folder, FAST)
    assert (folder / "notes.txt").read_text() == "keep me"
