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

import base64
import html
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

import tbptt_bench
from tbptt_bench.report import figures
from tbptt_bench.report import stats
from tbptt_bench.errors import UsageError
from tbptt_bench.methods.base import parse_method

log = logging.getLogger(__name__)

MEASURES = ("train", "bias", "perf")
#: Columns every row of a tbptt-bench result table has.
BOOKKEEPING = ("key", "measure", "status")
#: Columns a measurement kind must have for its section to be drawn (beyond the bookkeeping).
REQUIRED = {
    "train": ("task", "model", "method", "seed", "eval_metric"),
    "perf": ("task", "model", "method", "seq_len", "tokens_per_s", "ms_per_update"),
    "bias": ("task", "model", "spec", "relative_bias"),
}
#: Parameters that tell one configuration from another (the panels of a figure are made from those
#: that vary; method and seed are never panel keys).
CONFIG_COLUMNS = ("task", "model", "task_params", "seq_len", "batch_size", "hidden_size", "num_layers", "steps",
                  "optimizer", "lr", "clip", "dtype", "path", "threads", "compile", "device_label")
PROVENANCE = (("suite", "suite"), ("git commit", "git_commit"), ("host", "hostname"), ("CPU", "cpu_model"),
              ("GPU", "gpu_model"), ("platform", "platform"), ("Python", "python"), ("torch", "torch_version"),
              ("CUDA", "cuda_version"), ("cuDNN", "cudnn_version"), ("NumPy", "numpy_version"),
              ("tbptt-bench", "tbptt_bench_version"), ("threads", "threads"), ("executor", "executor"),
              ("concurrency", "concurrency"))
#: Learning-curve columns that hold a bias snapshot taken during training, when a run recorded one.
TRAINING_BIAS_COLUMNS = ("relative_bias", "relative_error", "cosine")
METHOD_ORDER = ("full", "tbptt", "chunked", "sliding", "hybrid")


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


# --------------------------------------------------------------------------- loading

def find_store(path: str | Path) -> Path:
    """The store directory of ``path``: a store itself, or a results root holding exactly one store."""
    root = Path(path)
    if not root.exists():
        raise UsageError(f"results path {root} does not exist; pass a store directory such as results/quick")
    if root.is_file():
        return root
    if any(root.glob("*.parquet")) or (root / "parts").is_dir():
        return root
    stores = sorted(p for p in root.iterdir() if p.is_dir() and (any(p.glob("*.parquet")) or (p / "parts").is_dir()))
    if len(stores) == 1:
        return stores[0]
    if stores:
        names = ", ".join(str(p) for p in stores)
        raise UsageError(f"{root} holds several result stores ({names}); pass one of them")
    raise UsageError(f"{root} holds no results (no .parquet table); run a suite first, e.g. tbptt-bench run quick")


def load_tables(path: str | Path) -> dict[str, pd.DataFrame]:
    """Every table of a store (``results``, ``curves``, ``lags``, …), or one Parquet/CSV file as ``results``.

    Raises UsageError for a path that does not exist, an empty table, or a table that is not a
    tbptt-bench result table (no key/measure/status columns).
    """
    from tbptt_bench.suites.store import read_results, table_names

    root = find_store(path)
    if root.is_file():
        tables = {"results": _read_file(root)}
    else:
        tables = {name: read_results(root, name) for name in table_names(root)}
    main = tables.get("results", pd.DataFrame())
    if main.empty:
        raise UsageError(f"results table in {root} is empty; run a suite into it first")
    missing = [c for c in BOOKKEEPING if c not in main.columns]
    if missing:
        raise UsageError(f"{root} is not a tbptt-bench results table: missing column(s) {', '.join(missing)}")
    for measure in sorted(set(main["measure"].dropna()) & set(REQUIRED)):
        rows = main[(main["measure"] == measure) & (main["status"] == "ok")]
        lacking = [c for c in REQUIRED[measure] if c not in rows.columns or (len(rows) and rows[c].isna().all())]
        if len(rows) and lacking:
            raise UsageError(f"{root}: {measure} rows lack column(s) {', '.join(lacking)}; "
                             "the table was not written by this version of tbptt-bench")
    return tables


def _read_file(path: Path) -> pd.DataFrame:
    try:
        if path.suffix == ".parquet":
            return pd.read_parquet(path)
        if path.suffix == ".csv":
            return pd.read_csv(path)
    except Exception as exc:  # pyarrow and pandas raise many types for a damaged file
        raise UsageError(f"cannot read results file {path}: {type(exc).__name__}: {exc}") from None
    raise UsageError(f"results file {path} is neither .parquet nor .csv; pass a store directory")


# --------------------------------------------------------------------------- the document

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


# --------------------------------------------------------------------------- helpers

def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if v == 0 or math.isinf(v):
            return str(v)
        return f"{v:.{digits}g}"
    return str(value)


def _ci(row: pd.Series, mean: str = "mean", low: str = "ci_low", high: str = "ci_high", digits: int = 3) -> str:
    return f"{_fmt(row[mean], digits)} [{_fmt(row[low], digits)}, {_fmt(row[high], digits)}]"


def method_axes(spec: str) -> tuple[str, float]:
    """A method's series name and truncation length K for plots against K (K is NaN for full BPTT).

    K follows the bias module's grid: ``k`` for ``chunked`` and ``sliding``, ``k1`` (the steps between
    updates) for ``tbptt``, whose series says how far back each update reaches (k2 = K, 2K-1, r·K);
    other families use their ``k``, ``k1`` or ``k2`` parameter, in that order, if they have one.
    """
    try:
        method = parse_method(spec)
    except UsageError:
        return str(spec), math.nan
    params = {k: v for k, v in method.params.items() if v is not None}
    family = method.family
    if family == "full":
        return "full", math.nan
    if family == "tbptt":
        k1, k2 = params["k1"], params["k2"]
        reach = "K" if k2 == k1 else ("2K-1" if k2 == 2 * k1 - 1 else f"{k2 / k1:g}K")
        return f"tbptt (k2={reach})", float(k1)
    for name in ("k", "k1", "k2"):
        if isinstance(params.get(name), (int, float)):
            rest = [f"{k}={v}" for k, v in params.items() if k != name]
            return family + (f" ({', '.join(rest)})" if rest else ""), float(params[name])
    return method.spec, math.nan


def method_sort_key(spec: str) -> tuple[int, str, float, str]:
    series, k = method_axes(spec)
    family = spec.split(":", 1)[0]
    rank = METHOD_ORDER.index(family) if family in METHOD_ORDER else len(METHOD_ORDER)
    return rank, series, (k if not math.isnan(k) else -1.0), spec


def order_methods(specs: Sequence[str]) -> list[str]:
    return sorted(dict.fromkeys(str(s) for s in specs), key=method_sort_key)


def _device_label(frame: pd.DataFrame) -> pd.Series:
    dev = frame.get("device", pd.Series("cpu", index=frame.index)).fillna("cpu").astype(str)
    gpu = frame.get("gpu_model", pd.Series("", index=frame.index)).fillna("").astype(str)
    cpu = frame.get("cpu_model", pd.Series("", index=frame.index)).fillna("").astype(str)
    is_gpu = dev.str.startswith("cuda")
    return pd.Series(np.where(is_gpu, "GPU " + gpu, "CPU " + cpu), index=frame.index).str.strip()


def _with_panel(frame: pd.DataFrame, exclude: Sequence[str] = ()) -> tuple[pd.DataFrame, list[str]]:
    """Add a ``panel`` label from the configuration columns that vary (task and model always)."""
    frame = frame.copy()
    if "device" in frame.columns or "gpu_model" in frame.columns:
        frame["device_label"] = _device_label(frame)
    keys = []
    for col in CONFIG_COLUMNS:
        if col not in frame.columns or col in exclude:
            continue
        if col in ("task", "model") or frame[col].astype(str).nunique(dropna=False) > 1:
            keys.append(col)
    if keys:
        parts = [frame[c].astype(str) if c in ("task", "model", "device_label")
                 else (c.replace("_", " ") + "=" + frame[c].astype(str)) for c in keys]
        label = parts[0]
        for p in parts[1:]:
            label = label + " · " + p
        frame["panel"] = label
    else:
        frame["panel"] = "all"
    return frame, keys


def _higher_is_better(task: str, metric_name: str) -> bool:
    import tbptt_bench.tasks  # noqa: F401  (registers the built-in tasks)
    from tbptt_bench.tasks import TASKS

    try:
        return bool(getattr(TASKS.get(task), "metric_higher_is_better"))
    except (UsageError, AttributeError):
        return metric_name.lower().startswith("acc")


def _metric_labels(frame: pd.DataFrame) -> pd.DataFrame:
    """Per task: metric name and direction, as a lookup frame."""
    rows = []
    for task, grp in frame.groupby("task"):
        name = str(grp["metric_name"].dropna().iloc[0]) if "metric_name" in grp and grp["metric_name"].notna().any() \
            else "metric"
        rows.append({"task": task, "metric_name": name, "higher": _higher_is_better(str(task), name)})
    return pd.DataFrame(rows, columns=["task", "metric_name", "higher"])


def _ok(frame: pd.DataFrame, measure: str) -> pd.DataFrame:
    if frame.empty or "measure" not in frame.columns:
        return frame.iloc[0:0]
    return frame[(frame["measure"] == measure) & (frame["status"] == "ok")].copy()


def _unit(frame: pd.DataFrame) -> str:
    return "seed" if "seed" in frame.columns else "replicate"


# --------------------------------------------------------------------------- sections

def provenance_section(doc: Document, tables: dict[str, pd.DataFrame]) -> None:
    main = tables["results"]
    doc.section("provenance", "Provenance")
    rows = []
    for label, col in PROVENANCE:
        if col in main.columns:
            values = sorted({str(v) for v in main[col].dropna() if str(v) != ""})
            if values:
                rows.append({"what": label, "value": ", ".join(values)})
    if "device" in main.columns:
        rows.append({"what": "devices", "value": ", ".join(sorted(set(_device_label(main))))})
    if "started" in main.columns and main["started"].notna().any():
        start = pd.to_datetime(main["started"], utc=True).min()
        end = pd.to_datetime(main.get("finished", main["started"]), utc=True).max()
        rows.append({"what": "measured", "value": f"{start:%Y-%m-%d %H:%M} – {end:%Y-%m-%d %H:%M} UTC"})
    if "duration_s" in main.columns:
        rows.append({"what": "cell time (sum)", "value": f"{main['duration_s'].sum():.0f} s"})
    prov = pd.DataFrame(rows, columns=["what", "value"])
    doc.table("provenance", prov, caption="Where and with what the results were measured.")

    counts = main.groupby(["measure", "status"])["key"].nunique().unstack(fill_value=0)
    counts = counts.reindex(columns=[c for c in ("ok", "diverged", "oom", "failed") if c in counts.columns]
                            + [c for c in counts.columns if c not in ("ok", "diverged", "oom", "failed")])
    counts = counts.reset_index()
    doc.table("cells", counts, caption="Cells per measurement kind and status.")

    bad = main[main["status"] != "ok"]
    if bad.empty:
        doc.text("Every cell finished (status ok).")
        return
    cols = [c for c in ("key", "measure", "task", "model", "method", "methods", "seed", "replicate", "status",
                        "diverged_at", "error") if c in bad.columns]
    shown = bad[cols].copy()
    if "error" in shown.columns:
        shown["error"] = shown["error"].fillna("").astype(str).map(lambda e: e.splitlines()[0][:160] if e else "")
    shown = shown.map(_fmt)
    doc.warning(f"{len(bad)} cell(s) did not finish; their rows are left out of every figure and statistic below.")
    doc.table("failed_cells", shown, bad[cols], caption="Cells that failed, diverged or ran out of memory.")


def learning_section(doc: Document, tables: dict[str, pd.DataFrame], palette: dict[str, Any]) -> pd.DataFrame:
    """Learning curves, final metrics and time to target; returns per-seed final rows (for statistics)."""
    o = doc.options
    doc.section("learning", "Learning")
    train = _ok(tables["results"], "train")
    if train.empty:
        doc.text("No train measurements in these results.")
        return train
    unit = _unit(train)
    train, _ = _with_panel(train)
    metrics = _metric_labels(train)
    train = train.merge(metrics, on="task", how="left", suffixes=("_row", ""))
    train["panel"] = train["panel"] + " (" + train["metric_name"] + np.where(train["higher"], " ↑", " ↓") + ")"
    panel_of = train[["key", "panel"]].drop_duplicates("key")
    seeds = int(train.groupby(["panel", "method"])[unit].nunique().min())
    doc.text(f"{train['method'].nunique()} method configuration(s) on {train['panel'].nunique()} "
             f"task/model configuration(s); at least {seeds} seed(s) each. Intervals are {o.confidence:.0%} "
             "bootstrap intervals (BCa, scipy.stats.bootstrap) over seeds; ↑ marks a metric where higher is "
             "better, ↓ where lower is better. Dashed lines: the task's trivial memoryless baseline.")
    if seeds < stats.FEW_SEEDS:
        doc.warning(f"Only {seeds} seed(s) per configuration: bootstrap intervals over so few seeds are too narrow "
                    "and are shown for orientation only.")

    curves = tables.get("curves", pd.DataFrame())
    if not curves.empty and "key" in curves.columns:
        curves = curves[curves["key"].isin(train["key"])].merge(panel_of, on="key", how="left")
    if not curves.empty and {"update", "eval_metric"} <= set(curves.columns):
        summary = stats.summarise(curves, "eval_metric", ["panel", "method", "update"], confidence=o.confidence,
                                  n_resamples=o.n_resamples, seed=o.seed)
        refs = train.groupby("panel", as_index=False)["baseline"].first().rename(columns={"baseline": "y"}) \
            if "baseline" in train.columns else None
        if refs is not None:
            refs["label"] = "trivial baseline"
        fig = figures.ci_lines(summary, x="update", y="mean", low="ci_low", high="ci_high", hue="method",
                               panel="panel", colours=palette, refs=refs, xlabel="update",
                               ylabel="held-out metric", title="Learning curves (mean over seeds, band: "
                               f"{o.confidence:.0%} CI)")
        doc.figure("learning_curves", fig, "Held-out task metric against updates, per method; band: bootstrap "
                   "interval over seeds; dashed: trivial baseline.")
        _bias_over_training(doc, curves, palette)
    else:
        doc.text("No learning curves (curves table) in these results.")

    final = stats.summarise(train, "eval_metric", ["panel", "task", "method"], confidence=o.confidence,
                            n_resamples=o.n_resamples, seed=o.seed)
    final["order"] = final["method"].map(lambda m: method_sort_key(m))
    final = final.sort_values(["panel", "order"]).drop(columns="order")
    if "baseline" in train.columns:
        final = final.merge(train.groupby("panel", as_index=False)["baseline"].first(), on="panel", how="left")
    refs = final.groupby("panel", as_index=False)["baseline"].first().rename(columns={"baseline": "y"}) \
        if "baseline" in final.columns else None
    if refs is not None:
        refs["label"] = "trivial baseline"
    fig = figures.ci_points(final, label="method", y="mean", low="ci_low", high="ci_high", panel="panel",
                            colours=palette, refs=refs, ylabel="final held-out metric",
                            title=f"Final metric per method (mean, {o.confidence:.0%} CI over seeds)")
    doc.figure("final_metric", fig, "Final held-out task metric per method: mean over seeds with its bootstrap "
               "interval; dashed: trivial baseline.")
    shown = final[["panel", "method", "n"]].copy()
    shown["final metric [CI]"] = final.apply(_ci, axis=1)
    if "baseline" in final.columns:
        shown["trivial baseline"] = final["baseline"].map(_fmt)
    doc.table("final_metric", shown, final, caption="Final held-out metric per method.")
    _time_to_target(doc, train, curves, palette)
    return train


def training_bias(curves: pd.DataFrame, column: str) -> pd.DataFrame:
    """Bias snapshots of the learning curves in long form: one row per (run, update, measured method).

    The snapshot of the first measured method is in ``column`` (its spec in ``bias_method``, else the
    trained method); further methods are in ``SPEC/column``. ``series`` names the measured method, and
    the trained one where they differ.
    """
    base = ["key", "panel", "method", "update"]
    first = curves[base].assign(measured=curves["bias_method"] if "bias_method" in curves else curves["method"],
                                value=curves[column])
    pieces = [first]
    for col in curves.columns:
        spec, sep, name = col.rpartition("/")
        if sep and name == column and spec:
            pieces.append(curves[base].assign(measured=spec, value=curves[col]))
    long = pd.concat(pieces, ignore_index=True).dropna(subset=["value"])
    long["measured"] = long["measured"].fillna(long["method"]).astype(str)
    long["series"] = np.where(long["measured"] == long["method"], long["measured"],
                              long["measured"] + " (training " + long["method"] + ")")
    return long


def _bias_over_training(doc: Document, curves: pd.DataFrame, palette: dict[str, Any]) -> None:
    o = doc.options
    cols = [c for c in TRAINING_BIAS_COLUMNS if c in curves.columns and curves[c].notna().any()]
    doc.heading("Bias over training")
    if not cols:
        doc.text("These results hold no bias snapshots taken during training (learning-curve columns "
                 f"{', '.join(TRAINING_BIAS_COLUMNS)}; `train --bias-at` records them).")
        return
    col = cols[0]
    long = training_bias(curves, col)
    summary = stats.summarise(long, "value", ["panel", "series", "update"], confidence=o.confidence,
                              n_resamples=o.n_resamples, seed=o.seed)
    label = col.replace("_", " ")
    fig = figures.ci_lines(summary, x="update", y="mean", low="ci_low", high="ci_high", hue="series",
                           panel="panel", colours=figures.palette(order_methods(summary["series"]), palette),
                           logy=col != "cosine", xlabel="update", ylabel=label, title=f"{label} over training")
    doc.figure("bias_over_training", fig, f"{label} of the measured method's gradient against the true gradient at "
               "the evaluation points of training (at the trained parameters); band: bootstrap interval over seeds.")


def time_to_target(curves: pd.DataFrame, *, target: float, higher: bool, unit: str) -> pd.DataFrame:
    """Per run (key): the first evaluation from which on the held-out metric stays beyond ``target``.

    "Stays" guards against a lucky evaluation of a small model; a run whose last evaluation is not
    beyond the target has NaN (censored at ``last_update``).
    """
    rows = []
    for key, run in curves.sort_values("update").groupby("key"):
        beyond = (run["eval_metric"] > target) if higher else (run["eval_metric"] < target)
        after = beyond[::-1].cummin()[::-1].to_numpy()
        first = run[after].iloc[0] if after.any() else None
        rows.append({"key": key, unit: run[unit].iloc[0], "method": run["method"].iloc[0],
                     "updates": float(first["update"]) if first is not None else math.nan,
                     "seconds": float(first["wall_time"]) if first is not None and "wall_time" in run else math.nan,
                     "last_update": float(run["update"].max())})
    return pd.DataFrame(rows)


def _time_to_target(doc: Document, train: pd.DataFrame, curves: pd.DataFrame, palette: dict[str, Any]) -> None:
    doc.heading("Time to target")
    if curves.empty or "update" not in curves.columns:
        doc.text("No learning curves, so no time to target.")
        return
    unit = _unit(train)
    rows, per_run = [], []
    for (panel, task), grp in train.groupby(["panel", "task"]):
        higher = bool(grp["higher"].iloc[0])
        target, source = doc.options.targets.get(str(task)), "given with --target"
        if target is None and "baseline" in grp.columns and grp["baseline"].notna().any():
            target, source = float(grp["baseline"].iloc[0]), "trivial baseline"
        if target is None:
            continue
        runs = time_to_target(curves[curves["key"].isin(grp["key"])], target=target, higher=higher, unit=unit)
        runs["panel"] = panel
        per_run.append(runs)
        for method, m in runs.groupby("method"):
            reached = m["updates"].notna()
            med = float(np.median(m["updates"].fillna(np.inf)))
            rows.append({"panel": panel, "method": method, "target": target, "target source": source,
                         "reached": f"{int(reached.sum())}/{len(m)}",
                         "median updates": med if math.isfinite(med) else math.nan,
                         "median seconds": float(np.median(m["seconds"].fillna(np.inf)))
                         if math.isfinite(med) else math.nan})
    if not rows:
        doc.text("No task in these results defines a target.")
        return
    doc.text("Time to target: the first evaluation from which on the held-out metric stays better than the "
             "target (the task's trivial baseline unless given with --target TASK=VALUE). Medians count runs that "
             "never reach it as infinitely slow, so a median is shown only when at least half the seeds reach it.")
    table = pd.DataFrame(rows)
    table["order"] = table["method"].map(method_sort_key)
    table = table.sort_values(["panel", "order"]).drop(columns="order")
    runs = pd.concat(per_run, ignore_index=True)
    fig = figures.seed_strip(runs, label="method", y="updates", censored="last_update", panel="panel",
                             colours=palette, order=order_methods(runs["method"]), ylabel="updates to target",
                             title="Updates to the target, one point per seed (×: not reached)")
    doc.figure("time_to_target", fig, "Updates each seed needed to get and stay better than the target; × marks a "
               "seed that did not (drawn at its last update).")
    shown = table.copy()
    for col in ("target", "median updates", "median seconds"):
        shown[col] = shown[col].map(_fmt)
    doc.table("time_to_target", shown, table, caption="Time to target per method.")


def cost_section(doc: Document, tables: dict[str, pd.DataFrame], palette: dict[str, Any]) -> pd.DataFrame:
    """Throughput, time per update and peak memory; returns the perf rows used."""
    doc.section("cost", "Cost")
    perf = _ok(tables["results"], "perf")
    perf = perf[perf["tokens_per_s"].notna()] if "tokens_per_s" in perf.columns else perf.iloc[0:0]
    if perf.empty:
        doc.text("No perf measurements in these results.")
        return perf
    axes = perf["method"].map(method_axes)
    perf["series"], perf["K"] = [a[0] for a in axes], [a[1] for a in axes]
    if "mem_delta_bytes" in perf.columns:
        perf["peak_mib"] = perf["mem_delta_bytes"] / 2**20
    threads = ", ".join(sorted({_fmt(v) for v in perf.get("threads", pd.Series(dtype=float)).dropna()}))
    doc.text("Medians over timed repeats after warm-up (bands and error bars: 10th–90th percentile over the "
             f"repeats, not a confidence interval); torch threads: {threads or 'not recorded'}. Peak memory is "
             "what training adds to the baseline of model, optimiser and batch (CPU: resident-set high-water "
             "mark in a fresh process; GPU: max_memory_allocated). CPU and GPU are separate panels. Full BPTT "
             "has no K: it is the dashed line in plots against K.")
    for x in ("K", "seq_len"):
        data, _ = _with_panel(perf, exclude=("seq_len",) if x == "seq_len" else ())
        full = data[data["series"] == "full"]
        data = data[data[x].notna()]
        if x == "K" and data.empty:
            continue
        if x == "seq_len" and data.groupby(["panel", "method"])[x].nunique().max() < 2:
            continue
        for metric, label, name in (("tokens_per_s", "tokens / s", "tokens"), ("ms_per_update", "ms / update", "ms")):
            agg = _median_band(data, ["panel", "series" if x == "K" else "method", x], metric)
            refs = None
            if x == "K" and not full.empty:
                refs = full.groupby("panel", as_index=False)[metric].median().rename(columns={metric: "y"})
                refs["label"] = "full BPTT"
            hue = "series" if x == "K" else "method"
            xl = "truncation length K" if x == "K" else "sequence length T"
            fig = figures.ci_lines(agg, x=x, y="value", low="p10", high="p90", hue=hue, panel="panel",
                                   colours=palette if hue == "method" else None, refs=refs, logx=True, logy=True,
                                   xlabel=xl, ylabel=label, title=f"{label} against {xl}")
            doc.figure(f"cost_{name}_vs_{'k' if x == 'K' else 't'}", fig,
                       f"{label} against {xl} per method (median; band: 10th–90th percentile over repeats).")
    if "peak_mib" in perf.columns and perf["peak_mib"].notna().any():
        data, _ = _with_panel(perf, exclude=("seq_len",))
        agg = data.groupby(["panel", "method", "seq_len"], as_index=False)["peak_mib"].median()
        if agg["seq_len"].nunique() > 1:
            fig = figures.ci_lines(agg, x="seq_len", y="peak_mib", hue="method", panel="panel", colours=palette,
                                   logx=True, logy=True, xlabel="sequence length T", ylabel="peak memory added (MiB)",
                                   title="Peak memory against T")
        else:
            agg["order"] = agg["method"].map(method_sort_key)
            agg = agg.sort_values(["panel", "order"])
            fig = figures.ci_points(agg.assign(lo=agg["peak_mib"], hi=agg["peak_mib"]), label="method",
                                    y="peak_mib", low="lo", high="hi", panel="panel", colours=palette,
                                    ylabel="peak memory added (MiB)",
                                    title=f"Peak memory per method (T = {int(agg['seq_len'].iloc[0])})")
        doc.figure("memory_vs_t", fig, "Peak memory that training adds, per method (median over cells).")
    shown_cols = [c for c in ("device_label", "task", "model", "method", "seq_len", "batch_size", "hidden_size",
                              "tokens_per_s", "tokens_per_s_p10", "tokens_per_s_p90", "ms_per_update",
                              "ms_per_update_p10", "ms_per_update_p90", "peak_mib", "threads")
                  if c in perf.columns or c == "device_label"]
    full_table = perf.assign(device_label=_device_label(perf))[shown_cols]
    full_table = full_table.assign(order=full_table["method"].map(method_sort_key)) \
        .sort_values(["device_label", "task", "model", "seq_len", "order"]).drop(columns="order")
    shown = full_table.copy()
    shown["tokens/s [p10, p90]"] = full_table.apply(lambda r: _ci(r, "tokens_per_s", "tokens_per_s_p10",
                                                                     "tokens_per_s_p90"), axis=1)
    shown["ms/update [p10, p90]"] = full_table.apply(lambda r: _ci(r, "ms_per_update", "ms_per_update_p10",
                                                                      "ms_per_update_p90"), axis=1)
    keep = [c for c in ("device_label", "task", "model", "method", "seq_len") if c in shown.columns]
    keep += ["tokens/s [p10, p90]", "ms/update [p10, p90]"] + (["peak_mib"] if "peak_mib" in shown.columns else [])
    shown = shown[keep].rename(columns={"device_label": "device", "seq_len": "T", "peak_mib": "peak MiB"})
    shown = shown.map(_fmt)
    doc.table("cost", shown, full_table, caption="Cost per configuration.")
    return perf


def _median_band(frame: pd.DataFrame, by: list[str], metric: str) -> pd.DataFrame:
    lo, hi = f"{metric}_p10", f"{metric}_p90"
    agg = frame.groupby(by, as_index=False).agg(value=(metric, "median"),
                                                p10=(lo if lo in frame else metric, "min"),
                                                p90=(hi if hi in frame else metric, "max"))
    return agg


def tradeoff_section(doc: Document, train: pd.DataFrame, bias_summary: pd.DataFrame, perf: pd.DataFrame,
                     palette: dict[str, Any]) -> None:
    o = doc.options
    doc.section("tradeoff", "Trade-off")
    drawn = False
    if not train.empty and {"wall_time", "update"} <= set(train.columns):
        runs = train[train["update"] > 0].copy()
        runs["ms_per_update_train"] = 1000.0 * runs["wall_time"] / runs["update"]
        cost = stats.summarise(runs, "ms_per_update_train", ["panel", "method"], confidence=o.confidence,
                               n_resamples=o.n_resamples, seed=o.seed)
        quality = stats.summarise(runs, "eval_metric", ["panel", "method"], confidence=o.confidence,
                                  n_resamples=o.n_resamples, seed=o.seed)
        both = cost.merge(quality, on=["panel", "method"], suffixes=("_cost", "_q"))
        both["short"] = both["method"].map(_short_method)
        fig = figures.tradeoff(both, x="mean_cost", y="mean_q", label="short", hue="method",
                               xerr=("ci_low_cost", "ci_high_cost"), yerr=("ci_low_q", "ci_high_q"),
                               panel="panel", colours=palette, xlabel="ms per update (training)",
                               ylabel="final held-out metric",
                               title="Final metric against training time per update (one point per method)")
        doc.figure("tradeoff_metric_cost", fig, "Final held-out metric against the time per update measured in the "
                   "same training runs (wall time of training without evaluation / updates); error bars: "
                   "bootstrap intervals over seeds.")
        concurrency = train["concurrency"].max() if "concurrency" in train.columns else 1
        if concurrency and concurrency > 1:
            doc.warning(f"Train cells ran up to {int(concurrency)} at a time, so their time per update is "
                        "inflated by contention; use the cost section's perf cells for timing claims.")
        drawn = True
    if not bias_summary.empty and not perf.empty:
        cost = perf.groupby(["task", "model", "method"], as_index=False)["ms_per_update"].median()
        both = bias_summary.merge(cost, on=["task", "model", "method"], how="inner")
        if not both.empty:
            both["short"] = both["method"].map(_short_method)
            both, _ = _with_panel(both)
            fig = figures.tradeoff(both, x="ms_per_update", y="mean", label="short", hue="method",
                                   yerr=("ci_low", "ci_high"), panel="panel", colours=palette, logx=True, logy=True,
                                   xlabel="ms per update (perf cells)", ylabel="relative bias",
                                   title="Relative gradient bias against cost (one point per method)")
            doc.figure("tradeoff_bias_cost", fig, "Relative bias of each method's gradient against the median time "
                       "per update of its perf cells (same task and model).")
            drawn = True
    if drawn:
        doc.text("The figures a reader uses to pick K: a point that is both cheaper (left) and better (lower bias; "
                 "a higher ↑ or lower ↓ metric) than another dominates it; compare each truncated method with full "
                 "BPTT in the same panel.")
    else:
        doc.text("Neither train nor bias-and-perf measurements are present, so there is no trade-off to draw.")


def _short_method(spec: str) -> str:
    return spec.replace("tbptt:", "").replace("chunked:", "ch:").replace("sliding:", "sl:")


def default_comparisons(methods: Sequence[str], best_fixed: str | None) -> list[tuple[str, str]]:
    """Each method against full BPTT, and each against the best fixed-K method (each pair once)."""
    pairs: list[tuple[str, str]] = []
    names = order_methods(methods)
    for m in names:
        if "full" in names and m != "full":
            pairs.append((m, "full"))
    if best_fixed is not None:
        for m in names:
            if m not in (best_fixed, "full"):
                pairs.append((m, best_fixed))
    return pairs


def fixed_k(spec: str) -> bool:
    """Whether a method truncates at a fixed K throughout (tbptt, chunked, sliding)."""
    return spec.split(":", 1)[0] in ("tbptt", "chunked", "sliding")


def statistics_section(doc: Document, train: pd.DataFrame) -> None:
    o = doc.options
    doc.section("statistics", "Statistics")
    if train.empty:
        doc.text("No train measurements, so no paired comparisons of final metrics.")
        return
    unit = _unit(train)
    results = []
    for panel, grp in train.groupby("panel"):
        higher = bool(grp["higher"].iloc[0])
        means = grp.groupby("method")["eval_metric"].mean()
        fixed = means[[m for m in means.index if fixed_k(m)]]
        best = (fixed.idxmax() if higher else fixed.idxmin()) if len(fixed) else None
        pairs = list(o.comparisons) or default_comparisons(list(means.index), best)
        table = grp.drop_duplicates(["method", unit], keep="first")
        res = stats.paired_comparisons(table, value="eval_metric", condition="method", unit=unit, pairs=pairs,
                                       test=o.test, confidence=o.confidence, seed=o.seed, alpha=o.alpha)
        res.insert(0, "panel", panel)
        res["best fixed K"] = best or ""
        ahead = np.sign(res["mean_diff"].astype(float)) * (1 if higher else -1)
        res["better on average"] = np.where(ahead > 0, res["treatment"], np.where(ahead < 0, res["reference"], "tie"))
        results.append(res)
    res = pd.concat(results, ignore_index=True) if results else pd.DataFrame()
    if res.empty:
        doc.text("No declared comparison has both methods in the results.")
        return
    res["p_holm"] = stats.holm(res["p"].to_numpy())
    res["significant"] = res["p_holm"] <= o.alpha
    family = int(res["p"].notna().sum())
    res["warning"] = [stats.seed_warning(int(n), alpha=o.alpha, family_size=family) for n in res["n"]]
    test_name = "Wilcoxon signed-rank (scipy.stats.wilcoxon, exact for small n)" if o.test == "wilcoxon" else \
        "paired permutation test of the mean difference (scipy.stats.permutation_test, exact for small n)"
    declared = "the comparisons given with --compare" if o.comparisons else \
        "each method against full BPTT, and each against the best fixed-K method of its panel"
    doc.text(f"Final held-out metric, paired by seed (the same seed gives the same initial parameters and data "
             f"to every method). Comparisons: {declared}. Test: {test_name}, two-sided. Holm's step-down "
             f"correction over the whole family of {family} comparisons; significant means Holm-adjusted p ≤ "
             f"α = {o.alpha:g}. Effect size: the mean paired difference (treatment − reference, in metric units) "
             f"with its {o.confidence:.0%} bootstrap interval, and Cohen's d_z (mean / sd of the differences).")
    if not o.comparisons:
        doc.text("The best fixed K is chosen on the same seeds it is then compared on, which favours it; treat "
                 "those comparisons as exploratory.")
    need = stats.seeds_needed(o.alpha, family)
    fewest = int(res["n"].min())
    doc.text(f"With {family} comparisons, an exact two-sided test needs at least {need} paired seeds before any "
             f"comparison can be significant after Holm's correction (smallest attainable p × {family} ≤ α); "
             f"these results have {fewest}" + (f" to {int(res['n'].max())}" if res["n"].max() != fewest else "")
             + " per comparison.")
    warnings = sorted(set(w for w in res["warning"] if w))
    for w in warnings:
        doc.warning(w)
    shown = pd.DataFrame({
        "panel": res["panel"], "treatment": res["treatment"], "reference": res["reference"], "seeds": res["n"],
        "statistic": res["statistic"].map(_fmt), "p": res["p"].map(_fmt), "p (Holm)": res["p_holm"].map(_fmt),
        "mean diff [CI]": res.apply(lambda r: _ci(r, "mean_diff", "diff_low", "diff_high"), axis=1),
        "d_z": res["effect_dz"].map(_fmt), "better on average": res["better on average"],
        "significant": res["significant"].map(_fmt),
        "warning": res["warning"].map(lambda w: "⚠" if w else ""),
    })
    doc.table("statistics", shown, res, caption="Paired tests of the final metric.")


def _bias_rows(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Bias rows of the whole gradient (group ``all``), with a ``method`` column."""
    bias = _ok(tables["results"], "bias")
    if bias.empty:
        return bias
    if "spec" in bias.columns:
        bias["method"] = bias["spec"].where(bias["spec"].notna(), bias.get("method"))
    if "group" in bias.columns:
        bias = bias[bias["group"] == "all"]
    return bias[bias["method"].notna()].copy()


def seed_interval(frame: pd.DataFrame, value: str, by: Sequence[str], *, low: str | None = None,
                  high: str | None = None, se: str | None = None, options: Options) -> pd.DataFrame:
    """Mean of ``value`` over seeds per group with its interval.

    With two or more seeds: the bootstrap over seeds (each seed's estimate already averages its
    batches, so the spread between seeds holds the batch noise too). With one seed: the interval the
    measurement itself recorded over batches (``low``/``high``), or mean ± z·``se``.
    """
    summary = stats.summarise(frame, value, list(by), confidence=options.confidence,
                              n_resamples=options.n_resamples, seed=options.seed)
    single = summary["n"] == 1
    if single.any() and (low and high and {low, high} <= set(frame.columns) or se and se in frame.columns):
        first = frame.dropna(subset=[value]).groupby(list(by), as_index=False, dropna=False).first()
        merged = summary.merge(first, on=list(by), how="left", suffixes=("", "_row"))
        if low and high and {low, high} <= set(frame.columns):
            lo, hi = merged[low], merged[high]
        else:
            z = float(scipy_stats.norm.ppf(0.5 + options.confidence / 2))
            lo, hi = merged[value] - z * merged[se], merged[value] + z * merged[se]
        summary.loc[single, "ci_low"] = lo[single].to_numpy()
        summary.loc[single, "ci_high"] = hi[single].to_numpy()
    return summary


def bias_section(doc: Document, tables: dict[str, pd.DataFrame], palette: dict[str, Any]) -> pd.DataFrame:
    """Relative bias and cosine against K, the lag profile and the bias bound; returns the bias summary."""
    o = doc.options
    doc.section("bias", "Gradient bias")
    columns = ["task", "model", "method", "mean", "ci_low", "ci_high"]
    bias = _bias_rows(tables)
    if bias.empty or "relative_bias" not in bias.columns:
        doc.text("No bias measurements in these results.")
        return pd.DataFrame(columns=columns)
    bias, _ = _with_panel(bias)
    axes = bias["method"].map(method_axes)
    bias["series"], bias["K"] = [a[0] for a in axes], [a[1] for a in axes]
    seeds = int(bias.groupby(["panel", "method"])[_unit(bias)].nunique().min()) if _unit(bias) in bias else 1
    doc.text("Relative bias ‖mean(ĝ − g)‖ / ‖mean(g)‖ over the measured batches, and the mean cosine of ĝ with "
             "the true gradient g, for the whole parameter vector. "
             + (f"Means over {seeds}+ seeds with {o.confidence:.0%} bootstrap intervals over seeds (each seed's "
                "estimate averages its batches, so the spread between seeds holds the batch noise as well)."
                if seeds > 1 else "One seed: intervals are the measurement's own bootstrap over batches (relative "
                "bias) and ±z·standard error over batches (cosine)."))
    if 1 < seeds < stats.FEW_SEEDS:
        doc.warning(f"Only {seeds} seeds per configuration: bootstrap intervals over so few seeds are too narrow and "
                    "are shown for orientation only.")
    if bias["K"].nunique() == 1:
        doc.text(f"These results hold one truncation length (K = {bias['K'].dropna().iloc[0]:g}), so the figures "
                 "against K show one point per method; a suite with a grid of K draws curves.")
    by = ["panel", "task", "model", "method", "series", "K"]
    rel = seed_interval(bias, "relative_bias", by, low="relative_bias_lo", high="relative_bias_hi", options=o)
    cos = seed_interval(bias, "cosine_mean", by, se="cosine_se", options=o) if "cosine_mean" in bias else None
    truncated = rel[rel["K"].notna()]
    refs = None
    if not truncated.empty:
        fig = figures.ci_lines(truncated, x="K", y="mean", low="ci_low", high="ci_high", hue="series",
                               panel="panel", logx=True, logy=True, xlabel="truncation length K",
                               ylabel="relative bias", title="Relative bias of the gradient against K")
        doc.figure("bias_vs_k", fig, "Relative bias ‖mean(ĝ − g)‖/‖mean(g)‖ against K per method family; band: "
                   f"{o.confidence:.0%} interval. Full BPTT has zero bias by definition.")
    if cos is not None and not cos[cos["K"].notna()].empty:
        refs = pd.DataFrame({"panel": cos["panel"].unique(), "y": 1.0, "label": "full BPTT (cosine 1)"})
        fig = figures.ci_lines(cos[cos["K"].notna()], x="K", y="mean", low="ci_low", high="ci_high", hue="series",
                               panel="panel", refs=refs, logx=True, xlabel="truncation length K",
                               ylabel="cosine(ĝ, g)", title="Alignment with the true gradient against K")
        doc.figure("cosine_vs_k", fig, f"Mean cosine between ĝ and g over batches against K; band: {o.confidence:.0%} "
                   "interval.")
    _lag_profile(doc, tables, bias)
    if "bound" in bias.columns and np.isfinite(bias["bound"].astype(float)).any():
        bound = bias.groupby(by, as_index=False, dropna=False)["bound"].median()
        both = rel.merge(bound, on=by, how="left")
        both = both[both["K"].notna()]
        if not both.empty:
            fig = figures.measured_vs_bound(both, x="K", y="mean", low="ci_low", high="ci_high", bound="bound",
                                            hue="series", panel="panel", xlabel="truncation length K",
                                            ylabel="relative bias", title="Measured relative bias and its bound")
            doc.figure("bias_bound", fig, "Measured relative bias (solid, with its interval) next to the bound "
                       "estimated from the lag profile (dashed, after Aicher, Foti & Fox 2019); the bound is "
                       "conservative and may be infinite where the profile does not decay.")
        rel = rel.merge(bound, on=by, how="left")
    rel["order"] = rel["method"].map(method_sort_key)
    rel = rel.sort_values(["panel", "order"]).drop(columns="order")
    shown = rel[["panel", "method", "n"]].copy()
    shown["relative bias [CI]"] = rel.apply(_ci, axis=1)
    if cos is not None:
        merged = rel[by].merge(cos, on=by, how="left")
        shown["cosine [CI]"] = merged.apply(_ci, axis=1, digits=5).to_numpy()
        rel = rel.merge(cos.rename(columns={"mean": "cosine", "ci_low": "cosine_low", "ci_high": "cosine_high"})
                        .drop(columns="n"), on=by, how="left")
    if "bound" in rel.columns:
        shown["bound"] = rel["bound"].map(_fmt).to_numpy()
    doc.table("bias", shown, rel, caption="Gradient bias per method (whole parameter vector).")
    return rel[[c for c in columns if c in rel.columns] + ["panel"]]


def _lag_profile(doc: Document, tables: dict[str, pd.DataFrame], bias: pd.DataFrame) -> None:
    lags = tables.get("lags", pd.DataFrame())
    doc.heading("Lag profile")
    need = {"key", "lag", "mean"}
    if lags.empty or not need <= set(lags.columns):
        doc.text("No lag profiles (lags table) in these results.")
        return
    lags = lags[lags["key"].isin(bias["key"])].drop(columns=["panel"], errors="ignore")
    lags = lags.merge(bias[["key", "panel"]].drop_duplicates("key"), on="key", how="left")
    lags = lags[lags["mean"] > 0]
    if lags.empty:
        doc.text("The lag profiles in these results are empty.")
        return
    agg = {"phi": ("mean", "mean")}
    agg.update({n: (n, "mean") for n in ("q10", "q90", "fitted", "rate") if n in lags.columns})
    prof = lags.groupby(["panel", "lag"], as_index=False).agg(**agg)
    prof["what"] = "mean φ_d"
    frames = [prof]
    if "fitted" in prof.columns:
        frames.append(prof.assign(phi=prof["fitted"], q10=np.nan, q90=np.nan, what="geometric fit"))
    long = pd.concat(frames, ignore_index=True)
    fig = figures.ci_lines(long, x="lag", y="phi", low="q10" if "q10" in long else None,
                           high="q90" if "q90" in long else None, hue="what", panel="panel", logy=True,
                           markers=False, xlabel="lag d", ylabel="‖∂ℓ_t/∂h_{t−d}‖",
                           title="Lag profile φ_d (band: 10th–90th percentile over losses)")
    doc.figure("lag_profile", fig, "Lag profile φ_d = ‖∂ℓ_t/∂h_{t−d}‖: mean over losses and batches (averaged over "
               "seeds), band from the 10th to the 90th percentile, and the fitted geometric decay.")
    if "rate" in prof.columns:
        rates = prof.groupby("panel", as_index=False)["rate"].first()
        doc.table("lag_rates", rates.assign(rate=rates["rate"].map(_fmt)), rates,
                  caption="Fitted geometric decay rate β of the lag profile (φ_d ≈ c·β^d).")


# --------------------------------------------------------------------------- rendering

def _md_cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _md_table(frame: pd.DataFrame) -> str:
    head = "| " + " | ".join(_md_cell(c) for c in frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(_md_cell(v) for v in row) + " |" for row in frame.astype(str).itertuples(index=False)]
    return "\n".join([head, rule, *body])


def render_markdown(doc: Document) -> str:
    lines = [f"# {doc.title}", ""]
    lines += ["Contents: " + " · ".join(f"[{t}](#{a})" for a, t in doc.sections), ""]
    n = 0
    for kind, payload in doc.blocks:
        if kind == "h2":
            lines += [f'<a id="{payload[0]}"></a>', "", f"## {payload[1]}", ""]
        elif kind == "h3":
            lines += [f"### {payload}", ""]
        elif kind == "p":
            lines += [payload, ""]
        elif kind == "warn":
            lines += [f"> **Warning:** {payload}", ""]
        elif kind == "table":
            name, shown, caption = payload
            lines += [f"*{caption}* ([tables/{name}.csv](tables/{name}.csv))", "", _md_table(shown), ""]
        elif kind == "figure":
            n += 1
            others = " · ".join(f"[{p.suffix[1:].upper()}](figures/{p.name})" for p in payload.files
                                if p.suffix != ".png")
            lines += [f"![{payload.name}](figures/{payload.name}.png)", "",
                      f"**Figure {n} ({payload.name}).** {payload.caption}" + (f" {others}" if others else ""), ""]
    return "\n".join(lines).rstrip() + "\n"


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:.85em}
th,td{border:1px solid #ccc;padding:.25em .5em;text-align:left;vertical-align:top}
th{background:#f3f3f3}caption{caption-side:top;text-align:left;font-style:italic;padding:.3em 0}
figure{margin:1em 0 2em}figure img{max-width:100%;height:auto}
figcaption{font-size:.9em;color:#444}.warning{background:#fff4e0;border-left:4px solid #e69f00;padding:.5em .8em}
nav ul{columns:2}
"""


def _html_table(name: str, frame: pd.DataFrame, caption: str) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(str(c))}</th>" for c in frame.columns)
    body = "".join("<tr>" + "".join(f"<td>{esc(str(v))}</td>" for v in row) + "</tr>"
                   for row in frame.astype(str).itertuples(index=False))
    cap = f"{esc(caption)} (tables/{esc(name)}.csv)"
    return (f'<table id="table-{esc(name)}"><caption>{cap}</caption><thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table>")


def render_html(doc: Document) -> str:
    esc = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>{esc(doc.title)}</title>", f"<style>{_CSS}</style>", "</head>", "<body>",
             f"<h1>{esc(doc.title)}</h1>", "<nav><ul>"]
    parts += [f'<li><a href="#{esc(a)}">{esc(t)}</a></li>' for a, t in doc.sections]
    parts += ["</ul></nav>"]
    n = 0
    open_section = False
    for kind, payload in doc.blocks:
        if kind == "h2":
            if open_section:
                parts.append("</section>")
            parts.append(f'<section id="{esc(payload[0])}"><h2>{esc(payload[1])}</h2>')
            open_section = True
        elif kind == "h3":
            parts.append(f"<h3>{esc(payload)}</h3>")
        elif kind == "p":
            parts.append(f"<p>{esc(payload)}</p>")
        elif kind == "warn":
            parts.append(f'<p class="warning"><strong>Warning:</strong> {esc(payload)}</p>')
        elif kind == "table":
            parts.append(_html_table(*payload))
        elif kind == "figure":
            n += 1
            data = base64.b64encode(payload.png).decode("ascii")
            parts.append(f'<figure id="fig-{esc(payload.name)}"><img src="data:image/png;base64,{data}" '
                         f'alt="{esc(payload.name)}"><figcaption><strong>Figure {n} ({esc(payload.name)}).'
                         f"</strong> {esc(payload.caption)}</figcaption></figure>")
    if open_section:
        parts.append("</section>")
    parts += [f"<footer><p>Generated by tbptt-bench {esc(tbptt_bench.__version__)}.</p></footer>", "</body>", "</html>"]
    return "\n".join(parts) + "\n"


# --------------------------------------------------------------------------- entry point

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


def parse_target(text: str) -> tuple[str, float]:
    """``TASK=VALUE`` for --target."""
    task, sep, value = text.partition("=")
    try:
        return task.strip(), float(value)
    except ValueError:
        pass
    raise UsageError(f"malformed --target {text!r}; expected TASK=VALUE, e.g. copy=0.9")


def parse_comparison(text: str) -> tuple[str, str]:
    """``TREATMENT vs REFERENCE`` (method specs) for --compare, canonicalised."""
    parts = re.split(r"\s+vs\s+", text.strip())
    if len(parts) != 2 or not all(parts):
        raise UsageError(f"malformed --compare {text!r}; expected 'TREATMENT vs REFERENCE', e.g. 'chunked:k=8 vs full'")
    return parse_method(parts[0]).spec, parse_method(parts[1]).spec
