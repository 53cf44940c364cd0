"""The report as a document: its options, and the blocks (sections, text, tables, figures) sections add."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from tbptt_bench.report import figures


@dataclass
class Options:
    """What the report computes and how it draws it."""

    title: str = ""
    confidence: float = 0.95
    alpha: float = 0.05
    test: str = "wilcoxon"
    n_resamples: int = 2000
    seed: int = 0
    formats: tuple[str, ...] = ("png", "pdf")
    dpi: int = 80
    #: Declared comparisons as (treatment, reference) method specs; empty: the default family.
    comparisons: tuple[tuple[str, str], ...] = ()
    #: Time-to-target thresholds per task (task metric units); tasks not named use their trivial baseline.
    targets: dict[str, float] = field(default_factory=dict)


@dataclass
class FigureEntry:
    name: str
    caption: str
    png: bytes
    files: list[Path]


@dataclass
class Document:
    """The report as blocks; rendered to Markdown and HTML, with figures and CSV tables written as it grows."""

    title: str
    out: Path
    options: Options
    blocks: list[tuple[str, Any]] = field(default_factory=list)
    figures: list[FigureEntry] = field(default_factory=list)
    tables: list[str] = field(default_factory=list)
    sections: list[tuple[str, str]] = field(default_factory=list)

    def section(self, anchor: str, title: str) -> None:
        self.sections.append((anchor, title))
        self.blocks.append(("h2", (anchor, title)))

    def heading(self, title: str) -> None:
        self.blocks.append(("h3", title))

    def text(self, paragraph: str) -> None:
        self.blocks.append(("p", paragraph))

    def warning(self, paragraph: str) -> None:
        self.blocks.append(("warn", paragraph))

    def table(self, name: str, shown: pd.DataFrame, full: pd.DataFrame | None = None, caption: str = "") -> None:
        """Show ``shown`` (formatted) and write ``full`` (unrounded; default ``shown``) to tables/NAME.csv."""
        folder = self.out / "tables"
        folder.mkdir(parents=True, exist_ok=True)
        (full if full is not None else shown).to_csv(folder / f"{name}.csv", index=False)
        self.tables.append(name)
        self.blocks.append(("table", (name, shown, caption)))

    def figure(self, name: str, fig: Any, caption: str) -> None:
        formats = tuple(dict.fromkeys(("png", *self.options.formats)))
        files = figures.save(fig, self.out / "figures", name, formats, dpi=self.options.dpi)
        png = (self.out / "figures" / f"{name}.png").read_bytes()
        self.figures.append(FigureEntry(name, caption, png, files))
        self.blocks.append(("figure", self.figures[-1]))
