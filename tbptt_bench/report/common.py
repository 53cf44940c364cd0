"""Helpers every report section uses: number formatting, method axes and order, panels, seed intervals."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

from tbptt_bench.suites.measures import MEASURE_NAMES, TASK_DIRECTION, higher_is_better
from tbptt_bench.methods.base import describe, order_specs
from tbptt_bench.report import stats
from tbptt_bench.report.document import Options


#: Parameters that tell one configuration from another (the panels of a figure are made from those
#: that vary; method and seed are never panel keys).
CONFIG_COLUMNS = ("task", "model", "task_params", "seq_len", "batch_size", "hidden_size", "num_layers", "steps",
                  "optimizer", "lr", "clip", "dtype", "path", "threads", "compile", "device_label")


#: Learning-curve columns that hold a bias snapshot taken during training, when a run recorded one.
TRAINING_BIAS_COLUMNS = ("relative_bias", "relative_error", "cosine")


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
    if row.get("interval") == "range":  # two seeds: their values' range, not a confidence interval
        return stats.format_interval(row[mean], row[low], row[high], "range", digits)
    return f"{_fmt(row[mean], digits)} [{_fmt(row[low], digits)}, {_fmt(row[high], digits)}]"


def method_axes(spec: str) -> tuple[str, float]:
    """A method's series and truncation length K for plots against K (NaN without K), as the method
    describes itself (:func:`tbptt_bench.methods.base.describe`)."""
    d = describe(spec)
    return d["series"], math.nan if d["k"] is None else float(d["k"])


def method_sort_key(spec: str) -> tuple[int, str, int, str]:
    """The method's own order in tables and legends (:attr:`tbptt_bench.methods.base.Method.sort_key`)."""
    return describe(spec)["sort_key"]


def order_methods(specs: Sequence[str]) -> list[str]:
    return order_specs(specs)


def method_label(spec: str) -> str:
    """The method's short display label, e.g. ``chunked K=8``."""
    return describe(spec)["label"]


def with_method_axes(frame: pd.DataFrame, column: str = "method") -> pd.DataFrame:
    """``frame`` with ``series`` and ``K`` per row: the ``series`` and ``k`` columns the measurement wrote,
    where present, else the description of the method in ``column``."""
    frame = frame.copy()
    axes = frame[column].map(method_axes)
    series = pd.Series([a[0] for a in axes], index=frame.index, dtype=object)
    k = pd.Series([a[1] for a in axes], index=frame.index, dtype=float)
    if "series" in frame.columns:
        series = frame["series"].where(frame["series"].notna(), series)
    if "k" in frame.columns:
        stored = pd.to_numeric(frame["k"], errors="coerce").astype(float)
        k = stored.where(frame["series"].notna() if "series" in frame.columns else stored.notna(), k)
    frame["series"], frame["K"] = series, k
    return frame


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
                 else frame[c].map(_params_text) if c == "task_params"
                 else (c.replace("_", " ") + "=" + frame[c].astype(str)) for c in keys]
        label = parts[0]
        for p in parts[1:]:
            label = label + p.astype(str).map(lambda v: f" · {v}" if v else "")
        frame["panel"] = label
    else:
        frame["panel"] = "all"
    return frame, keys


def _params_text(value: Any) -> str:
    """Task parameters as ``lag=4 length=4000`` ("" for none), from the JSON text a store holds."""
    import json

    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    try:
        params = json.loads(value) if isinstance(value, str) else dict(value)
    except (ValueError, TypeError):
        return str(value)
    if not isinstance(params, dict):
        return str(params)
    return " ".join(f"{k}={_plain(v)}" for k, v in params.items())


def _plain(value: Any) -> Any:
    """A whole number read back as a float (a store column with gaps is float) shown as an integer."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _metric_labels(frame: pd.DataFrame, table: str = "train") -> pd.DataFrame:
    """Per task: the name of ``table``'s ``eval_metric`` and whether higher is better, as its declaration
    says (:func:`tbptt_bench.suites.measures.higher_is_better`: the rows' own direction column, or the
    registered task's), as a lookup frame."""
    rows = []
    for task, grp in frame.groupby("task"):
        name = str(grp["metric_name"].dropna().iloc[0]) if "metric_name" in grp and grp["metric_name"].notna().any() \
            else "metric"
        stored = grp[TASK_DIRECTION].dropna() if TASK_DIRECTION in grp else pd.Series(dtype=object)
        row = {"task": task, TASK_DIRECTION: bool(stored.iloc[0]) if len(stored) else None}
        rows.append({"task": task, "metric_name": name, "higher": higher_is_better(table, "eval_metric", row)})
    return pd.DataFrame(rows, columns=["task", "metric_name", "higher"])


def _ok(tables: dict[str, pd.DataFrame] | pd.DataFrame, measure: str) -> pd.DataFrame:
    """The ``ok`` rows of a measure's own table (``tables[measure]``), or of the rows of ``measure`` in one
    frame of several measures' rows."""
    frame = tables.get(measure, pd.DataFrame()) if isinstance(tables, dict) else tables
    if frame.empty or "status" not in frame.columns:
        return frame.iloc[0:0]
    keep = frame["status"] == "ok"
    if "measure" in frame.columns:
        keep &= frame["measure"] == measure
    return frame[keep].copy()


def measured_rows(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Every row of every measure's own table (whatever its status), in the declared order of the measures:
    what the sections that speak of all cells (provenance, the report's header) count."""
    frames = [tables[m] for m in MEASURE_NAMES if m in tables and not tables[m].empty]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _unit(frame: pd.DataFrame) -> str:
    return "seed" if "seed" in frame.columns else "replicate"


def seed_interval(frame: pd.DataFrame, value: str, by: Sequence[str], *, low: str | None = None,
                  high: str | None = None, se: str | None = None, options: Options) -> pd.DataFrame:
    """Mean of ``value`` over seeds per group with its interval.

    Over seeds (each seed's estimate already averages its batches, so the spread between seeds holds the
    batch noise too): a t interval from three seeds, the seeds' range with two (``interval``, see
    :func:`tbptt_bench.report.stats.seed_summary`). With one seed: the interval the measurement itself
    recorded over batches (``low``/``high``), or mean ± z·``se``.
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
