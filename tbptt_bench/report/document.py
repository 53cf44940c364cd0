"""The report as a document: its options, and the blocks (sections, text, tables, figures) sections add."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from tbptt_bench.report import figures
from tbptt_bench.report import AXES  # noqa: F401  (re-exported)


#: The axes learning is compared on (``--axis``): the curve column and the words for captions.
AXIS_WORDS = {"tokens": "tokens (loss positions × batch)",
              "compute": "compute (recurrent steps forwarded + backpropagated × batch)",
              "update": "updates", "wall": "wall time (training seconds, evaluation excluded)"}
AXIS_UNITS = {"tokens": "tokens", "compute": "compute steps", "update": "updates", "wall": "seconds"}


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
    #: Time-to-target thresholds per task (task metric units); tasks not named use their memoryless baseline.
    targets: dict[str, float] = field(default_factory=dict)
    #: The axis learning is compared on (docs/design.md §3.7; equal tokens by default): a key of AXES.
    axis: str = "tokens"


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
    _target: list[tuple[str, Any]] | None = None
    _section_at: int | None = None

    def _add(self, kind: str, payload: Any) -> None:
        (self.blocks if self._target is None else self._target).append((kind, payload))

    def placeholder(self) -> list[tuple[str, Any]]:
        """A slot at this point of the document, filled later with :meth:`into` (e.g. a summary written last)."""
        slot: list[tuple[str, Any]] = []
        self.blocks.append(("slot", (slot, len(self.sections))))
        return slot

    @contextlib.contextmanager
    def into(self, slot: list[tuple[str, Any]]) -> Iterator[None]:
        """Add blocks to ``slot`` (from :meth:`placeholder`) instead of the end of the document."""
        position = next(at for kind, (s, at) in ((k, p) for k, p in self.blocks if k == "slot") if s is slot)
        self._target, self._section_at = slot, position
        try:
            yield
        finally:
            self._target, self._section_at = None, None

    def flat_blocks(self) -> list[tuple[str, Any]]:
        """The blocks in reading order, slots expanded."""
        out: list[tuple[str, Any]] = []
        for kind, payload in self.blocks:
            out.extend(payload[0] if kind == "slot" else [(kind, payload)])
        return out

    def section(self, anchor: str, title: str) -> None:
        if self._section_at is None:
            self.sections.append((anchor, title))
        else:
            self.sections.insert(self._section_at, (anchor, title))
            self._section_at += 1
        self._add("h2", (anchor, title))

    def contents(self) -> None:
        """The table of contents goes here (by default it opens the document)."""
        self._add("nav", None)

    def heading(self, title: str) -> None:
        self._add("h3", title)

    def text(self, paragraph: str) -> None:
        self._add("p", paragraph)

    def warning(self, paragraph: str) -> None:
        self._add("warn", paragraph)

    def table(self, name: str, shown: pd.DataFrame, full: pd.DataFrame | None = None, caption: str = "") -> None:
        """Show ``shown`` (formatted) and write ``full`` (unrounded; default ``shown``) to tables/NAME.csv."""
        folder = self.out / "tables"
        folder.mkdir(parents=True, exist_ok=True)
        (full if full is not None else shown).to_csv(folder / f"{name}.csv", index=False)
        self.tables.append(name)
        self._add("table", (name, shown, caption))

    def figure(self, name: str, fig: Any, caption: str) -> None:
        formats = tuple(dict.fromkeys(("png", *self.options.formats)))
        files = figures.save(fig, self.out / "figures", name, formats, dpi=self.options.dpi)
        png = (self.out / "figures" / f"{name}.png").read_bytes()
        self.figures.append(FigureEntry(name, caption, png, files))
        self._add("figure", self.figures[-1])
