"""Helpers every report section uses: number formatting, method axes and order, panels, seed intervals."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

from tbptt_bench.errors import UsageError
from tbptt_bench.methods.base import parse_method
from tbptt_bench.report import stats
from tbptt_bench.report.document import Options


#: Parameters that tell one configuration from another (the panels of a figure are made from those
#: that vary; method and seed are never panel keys).
CONFIG_COLUMNS = ("task", "model", "task_params", "seq_len", "batch_size", "hidden_size", "num_layers", "steps",
                  "optimizer", "lr", "clip", "dtype", "path", "threads", "compile", "device_label")


#: Learning-curve columns that hold a bias snapshot taken during training, when a run recorded one.
TRAINING_BIAS_COLUMNS = ("relative_bias", "relative_error", "cosine")


METHOD_ORDER = ("full", "tbptt", "chunked", "sliding", "hybrid")


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


def _short_method(spec: str) -> str:
    return spec.replace("tbptt:", "").replace("chunked:", "ch:").replace("sliding:", "sl:")
