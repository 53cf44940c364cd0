"""Every shell command of the README's quick start runs, exactly as written but at tiny sizes.

The commands are read from README.md itself, so an edit there is tested as it stands. Sizes are shrunk flag by
flag (``readme.TINY``), every other word is kept. The last line (``run quick && report``) runs at its real
size once per session (the ``quick_run`` fixture); ``test_committed_reports.py`` checks what it makes.
"""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest

from readme import readme_section_commands, shrink, tbptt_bench_argv

QUICK_START = readme_section_commands()
SMALL = [c for c in QUICK_START if not c.startswith(("tbptt-bench run", "tbptt-bench report"))]


def test_the_quick_start_is_read_and_covers_every_command() -> None:
    subcommands = [shlex.split(c)[1] for c in QUICK_START]
    assert subcommands == ["tasks", "explain", "grad", "bias", "train", "perf", "run", "report"]


def test_shrink_replaces_sizes_only() -> None:
    argv = shrink("tbptt-bench perf --method chunked:k=64,full --seq-len 256,1024,4096 --hidden 64 --threads 1")
    assert argv == ["tbptt-bench", "perf", "--method", "chunked:k=64,full", "--seq-len", "24,32,32",
                    "--hidden", "8", "--threads", "1"]


@pytest.mark.parametrize("command", SMALL, ids=[shlex.split(c)[1] for c in SMALL])
def test_quick_start_command_runs(command: str, tmp_path: Path) -> None:
    argv = shrink(command)
    proc = subprocess.run(tbptt_bench_argv() + argv[1:], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    assert proc.stdout.strip(), f"{' '.join(argv)} printed nothing"
    for flag in ("--save", "--figure"):
        if flag in argv:
            written = tmp_path / argv[argv.index(flag) + 1]
            assert written.stat().st_size > 0, f"{written.name} was not written"


def test_run_quick_and_report_as_the_readme_says(quick_run: Path) -> None:
    """The README's last quick-start line, at its real size: a store with every table and a whole report."""
    assert {"cells", "train", "bias", "perf"} <= {p.stem for p in (quick_run / "results" / "quick").glob("*.parquet")}
    report = quick_run / "reports" / "quick"
    assert (report / "report.md").stat().st_size > 0 and (report / "report.html").stat().st_size > 0
    figures = list((report / "figures").glob("*.png"))
    assert figures and all(f.stat().st_size > 1000 for f in figures)
