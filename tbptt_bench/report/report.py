"""The research report: a result store turned into report.md, a self-contained report.html, figures and CSVs.

Sections follow the product brief: provenance (where and with what every number was measured, and
which cells failed or diverged), gradient bias, the effective context over training (only when measured), cost, learning, the bias/quality–cost trade-off, and
the statistics of the declared comparisons. Every interval is computed by :mod:`tbptt_bench.report.stats`
(bootstrap over seeds, scipy) and drawn by :mod:`tbptt_bench.report.figures`, so a figure and its table show
the same numbers. A section whose measurement kind is absent says so and the report goes on.

Layout of the output directory::

    report.md           Markdown, figures linked from figures/
    report.html         one file: figures embedded as base64 PNG data, no external URL
    figures/NAME.png    and NAME.pdf / NAME.svg (for papers)
    tables/NAME.csv     every table of the report, unrounded
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from tbptt_bench.errors import UsageError, touching
from tbptt_bench.report import figures
from tbptt_bench.report.common import measured_rows, order_methods
from tbptt_bench.report.document import AXIS_WORDS, Document, Options
from tbptt_bench.report.load import as_tables
from tbptt_bench.report.render import render_html, render_markdown
from tbptt_bench.report.sections.alignment import alignment_section
from tbptt_bench.report.sections.bias import bias_section
from tbptt_bench.report.sections.context import context_section
from tbptt_bench.report.sections.cost import cost_section
from tbptt_bench.report.sections.decision import decision_section
from tbptt_bench.report.sections.learning import learning_section
from tbptt_bench.report.sections.provenance import provenance_section
from tbptt_bench.report.sections.reproductions import reproductions_section
from tbptt_bench.report.sections.statistics import statistics_section
from tbptt_bench.report.sections.tradeoff import tradeoff_section

log = logging.getLogger(__name__)


@dataclass
class ReportFiles:
    """What a report wrote."""

    out: Path
    markdown: Path
    html: Path
    figures: list[str]
    tables: list[str]


#: The files that mark a folder as a report (so that replacing it never deletes anything else).
REPORT_MARKERS = ("report.md", "report.html")


def build_report(tables: dict[str, pd.DataFrame], out: str | Path, options: Options | None = None) -> ReportFiles:
    """Write the report of a store's tables into ``out``, atomically.

    The report is built in a hidden sibling folder and swapped in only when complete (the old report is
    renamed aside, the new one renamed in, the old one removed), so a report killed midway leaves the
    previous one whole; an interrupted (SIGINT, SIGTERM) or failed report removes its half-built folder,
    and folders left by a killed one (SIGKILL) are removed by the next report. No space left, out of memory
    or permission refused is a ResourceError naming ``out``.
    """
    options = options or Options()
    tables = as_tables(tables)
    out = Path(out).absolute()
    _check_replaceable(out)
    with touching(out, note="any earlier report there is unchanged and no half-built one is left"):
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(out)
        building = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.building-"))
        try:
            doc = _write(tables, building, options)
            os.chmod(building, 0o777 & ~_umask())
            _swap_in(building, out)
        except BaseException:  # SIGINT, SIGTERM (raised as Terminated), a full disk: no folder is left behind
            shutil.rmtree(building, ignore_errors=True)
            raise
    log.info("report with %d figures and %d tables written to %s", len(doc.figures), len(doc.tables), out)
    return ReportFiles(out, out / "report.md", out / "report.html", [f.name for f in doc.figures], list(doc.tables))


@contextlib.contextmanager
def progress(total: int) -> Iterator[Callable[[str], None]]:
    """A ``step(name)`` function that shows which of ``total`` report sections is being drawn: a progress bar on
    a terminal (rich, on stderr), one log line per section otherwise (figures take seconds each)."""
    if not sys.stderr.isatty():
        def log_step(name: str) -> None:
            log.info("report: %s", name)

        yield log_step
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("report: {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("", total=total)

        def bar_step(name: str) -> None:
            done = bar.tasks[0].description != ""
            bar.update(task, description=name, advance=1 if done else 0)

        yield bar_step
        bar.update(task, completed=total)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _check_replaceable(out: Path) -> None:
    """UsageError unless ``out`` is absent, empty, or an earlier report (it is replaced as a whole)."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; pass a folder for the report, e.g. reports/quick")
    if out.is_dir() and any(out.iterdir()) and not any((out / m).is_file() for m in REPORT_MARKERS):
        raise UsageError(f"--out {out} is a non-empty folder that holds no report (no report.md or report.html) "
                         "and would be replaced as a whole; pass a new folder or an earlier report's folder")


def _remove_leftovers(out: Path) -> None:
    """Remove the half-built and set-aside folders an earlier, killed report left next to ``out``; restore a
    set-aside report when the kill came between its two renames."""
    aside = sorted(out.parent.glob(f".{out.name}.old-*"))
    if aside and not out.exists() and (aside[-1] / "report.md").is_file():
        os.rename(aside.pop(), out)
        log.warning("restored the previous report %s that a killed report had set aside", out)
    for stale in [*aside, *out.parent.glob(f".{out.name}.building-*")]:
        shutil.rmtree(stale, ignore_errors=True)


def _swap_in(building: Path, out: Path) -> None:
    """Rename the old report aside, the new one in, then remove the old one."""
    if not out.exists():
        os.rename(building, out)
        return
    aside = out.parent / f".{out.name}.old-{os.getpid()}"
    shutil.rmtree(aside, ignore_errors=True)
    os.rename(out, aside)
    try:
        os.rename(building, out)
    except BaseException:  # interrupted between the two renames: the old report goes back
        if not out.exists():
            os.rename(aside, out)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _write(tables: dict[str, pd.DataFrame], out: Path, options: Options) -> Document:
    """Every section of the report, written into the folder ``out``."""
    main = measured_rows(tables)
    suites = sorted({str(s) for s in main.get("suite", pd.Series(dtype=str)).dropna()})
    title = options.title or f"tbptt-bench report: {', '.join(suites) or 'results'}"
    doc = Document(title, out, options)
    specs = [main[c].dropna().astype(str) for c in ("method", "spec") if c in main.columns]
    methods = order_methods(pd.concat(specs).unique()) if specs else []
    palette = figures.method_palette(methods)
    cells = main.groupby("measure")["key"].nunique()
    summary = doc.placeholder()
    doc.contents()
    doc.text(f"Generated from {main['key'].nunique()} cells ({', '.join(f'{n} {m}' for m, n in cells.items())}) "
             f"with {len(main)} result rows. Learning is compared at equal {AXIS_WORDS[options.axis]} "
             "throughout (learning curves, final metric, time to target, paired tests; --axis changes it).")
    results: dict[str, pd.DataFrame] = {}
    steps = [
        ("provenance", lambda: provenance_section(doc, tables)),
        ("gradient bias", lambda: results.update(bias=bias_section(doc, tables, palette))),
        ("alignment", lambda: alignment_section(doc, tables, palette)),
        ("effective context", lambda: context_section(doc, tables)),
        ("cost", lambda: results.update(perf=cost_section(doc, tables, palette))),
        ("learning", lambda: results.update(train=learning_section(doc, tables, palette))),
        ("trade-off", lambda: tradeoff_section(doc, results["train"], results["bias"], results["perf"], palette)),
        ("statistics", lambda: statistics_section(doc, results["train"])),
        ("decision summary", lambda: decision_section(doc, summary, tables, results["train"])),
        ("reproductions", lambda: reproductions_section(doc, tables)),
    ]
    with progress(len(steps)) as step:
        for name, run in steps:
            step(name)
            run()
    (out / "report.md").write_text(render_markdown(doc), encoding="utf-8")
    (out / "report.html").write_text(render_html(doc), encoding="utf-8")
    return doc
