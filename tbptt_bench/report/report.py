"""The research report: a result store turned into report.md, a self-contained report.html, figures and CSVs.

Sections follow the product brief: provenance (where and with what every number was measured, and
which cells failed or diverged), gradient bias, cost, learning, the bias/quality–cost trade-off, and
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

import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from tbptt_bench.report import figures
from tbptt_bench.report.common import order_methods
from tbptt_bench.report.document import Document, Options
from tbptt_bench.report.render import render_html, render_markdown
from tbptt_bench.report.sections.bias import bias_section
from tbptt_bench.report.sections.cost import cost_section
from tbptt_bench.report.sections.learning import learning_section
from tbptt_bench.report.sections.provenance import provenance_section
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


def build_report(tables: dict[str, pd.DataFrame], out: str | Path, options: Options | None = None) -> ReportFiles:
    """Write the report of a store's tables into ``out`` (created if needed)."""
    options = options or Options()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for sub in ("figures", "tables"):
        for old in (out / sub).glob("*") if (out / sub).is_dir() else []:
            if old.suffix in (".png", ".pdf", ".svg", ".csv"):
                old.unlink()
    main = tables["results"]
    suites = sorted({str(s) for s in main.get("suite", pd.Series(dtype=str)).dropna()})
    title = options.title or f"tbptt-bench report: {', '.join(suites) or 'results'}"
    doc = Document(title, out, options)
    methods = order_methods(main["method"].dropna().astype(str)) if "method" in main.columns else []
    palette = figures.palette(methods)
    cells = main.groupby("measure")["key"].nunique()
    doc.text(f"Generated from {main['key'].nunique()} cells ({', '.join(f'{n} {m}' for m, n in cells.items())}) "
             f"with {len(main)} result rows. Sections: provenance, gradient bias, cost, learning, trade-off, "
             "statistics.")
    provenance_section(doc, tables)
    bias_summary = bias_section(doc, tables, palette)
    perf = cost_section(doc, tables, palette)
    train = learning_section(doc, tables, palette)
    tradeoff_section(doc, train, bias_summary, perf, palette)
    statistics_section(doc, train)
    md = out / "report.md"
    md.write_text(render_markdown(doc), encoding="utf-8")
    page = out / "report.html"
    page.write_text(render_html(doc), encoding="utf-8")
    log.info("report with %d figures and %d tables written to %s", len(doc.figures), len(doc.tables), out)
    return ReportFiles(out, md, page, [f.name for f in doc.figures], list(doc.tables))
