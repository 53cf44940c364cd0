"""Learning compared at equal budgets: each run's curve interpolated on a common axis of tokens, compute,
updates or wall time (docs/design.md §3.7: a method that updates more often sees fewer tokens per update, so
comparisons at equal updates favour the method that reads more data).

Interpolation is linear between a run's evaluations and never extrapolates: outside the range a run
measured, its value is NaN.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from tbptt_bench.errors import UsageError
from tbptt_bench.report.document import AXES


def axis_column(axis: str) -> str:
    """The curve column of an axis name (``tokens``, ``compute``, ``update``, ``wall``)."""
    if axis not in AXES:
        raise UsageError(f"unknown axis {axis!r}; accepted: {', '.join(AXES)}")
    return AXES[axis]


def run_value_at(run: pd.DataFrame, x: str, y: str, at: np.ndarray) -> np.ndarray:
    """``y`` of one run linearly interpolated at the budgets ``at`` of column ``x``; NaN outside its range."""
    points = run[[x, y]].apply(pd.to_numeric, errors="coerce").dropna().sort_values(x)
    points = points.groupby(x, as_index=False)[y].last()
    at = np.asarray(at, dtype=float)
    if points.empty:
        return np.full(at.shape, np.nan)
    xs, ys = points[x].to_numpy(float), points[y].to_numpy(float)
    out = np.interp(at, xs, ys)
    out[(at < xs[0]) | (at > xs[-1])] = np.nan
    return out


def common_budget(curves: pd.DataFrame, x: str, by: str = "panel") -> pd.Series:
    """Per group of ``by``: the largest budget every run (``key``) of the group reached (min over runs of max x)."""
    reached = curves.groupby([by, "key"])[x].max()
    return reached.groupby(level=0).min()


def grid(curves: pd.DataFrame, x: str, points: int = 25) -> np.ndarray:
    """Budgets to draw curves at: evenly spaced from the smallest to the largest value of ``x``, plus every
    run's last value (so each run's end, and the common budget, lie on the grid)."""
    values = pd.to_numeric(curves[x], errors="coerce").dropna()
    if values.empty:
        return np.array([])
    ends = curves.groupby("key")[x].max().to_numpy(float)
    return np.unique(np.concatenate([np.linspace(values.min(), values.max(), points), ends]))


def interpolate_runs(curves: pd.DataFrame, x: str, y: str, at: np.ndarray,
                     keep: tuple[str, ...] = ("panel", "method", "seed")) -> pd.DataFrame:
    """Long table of every run's ``y`` at the budgets ``at``: columns ``key``, ``keep``…, ``budget``, ``value``
    (rows where the run did not reach the budget are dropped)."""
    rows = []
    cols = [c for c in keep if c in curves.columns]
    for key, run in curves.groupby("key", sort=False):
        values = run_value_at(run, x, y, at)
        first = run.iloc[0]
        rows.append(pd.DataFrame({"key": key, **{c: first[c] for c in cols}, "budget": at, "value": values}))
    if not rows:
        return pd.DataFrame(columns=["key", *cols, "budget", "value"])
    return pd.concat(rows, ignore_index=True).dropna(subset=["value"])


def at_common_budget(curves: pd.DataFrame, x: str, y: str, by: str = "panel") -> pd.DataFrame:
    """Per run: ``y`` at the common budget of its ``by`` group (:func:`common_budget`); columns ``key``,
    ``budget``, ``value``."""
    budgets = common_budget(curves, x, by)
    rows = []
    for (group, key), run in curves.groupby([by, "key"], sort=False):
        budget = float(budgets[group])
        rows.append({"key": key, "budget": budget, "value": float(run_value_at(run, x, y, np.array([budget]))[0])})
    return pd.DataFrame(rows, columns=["key", "budget", "value"])
