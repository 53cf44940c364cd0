"""Effective context at a fixed θ: the smallest chunk length K whose chunked(K) gradient is within a level of g.

For a streaming task, the chunked(K) curve (K = 1, 2, 4, …, ``kmax``) and the true gradient g come from
:func:`tbptt_bench.analysis.kcurve.streamed_chunked_curve` (memory O(√T) in the segment length T) on
``n_batches`` held-out segments of T steps: the last ``n_batches · T`` steps of each of the split's B
streams, cut into consecutive segments, each started from the state reached after ``warmup`` steps run
without gradient before it (:func:`tbptt_bench.analysis.bias.bias_batches`). Per K the bias columns are
those of the bias measurement (docs/design.md §3.2–§3.3, :func:`tbptt_bench.analysis.bias.group_metrics`):
the noise-corrected ``relative_bias`` with its interval, the plug-in, and the per-batch relative error.

The **effective context** at a level L is read off that curve three ways (docs/bias.md, "Long horizons"):

* ``k_effective``: the smallest K whose interval upper end ``relative_bias_hi`` is ≤ L — conservative (a
  K is accepted only when the data rule out a bias above L); None when no K of the grid qualifies or the
  interval is undefined (fewer than 4 batches);
* ``k_effective_point``: the smallest K whose noise-corrected estimate ``relative_bias`` is ≤ L;
* ``k_effective_error``: the smallest K whose mean per-batch relative error ‖ĝ_K − g‖/‖g‖ is ≤ L (the
  plug-in per batch: it includes the noise of ĝ − g as well as the bias).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from tbptt_bench.analysis.bias import bias_batches, group_metrics
from tbptt_bench.analysis.gradients import flatten
from tbptt_bench.analysis.kcurve import effective_context, streamed_chunked_curve
from tbptt_bench.analysis.long_lags import LongLagProfile, long_lag_profile
from tbptt_bench.models.protocol import map_state
from tbptt_bench.errors import UsageError
from tbptt_bench.seeding import derive_seed
from tbptt_bench.tasks.base import Task
from tbptt_bench.validation import finite_float, integer, power_of_two

log = logging.getLogger(__name__)

#: The default levels of relative bias (1% and 5%).
LEVELS = (0.01, 0.05)
#: Columns of one curve row (one K) that come from :func:`tbptt_bench.analysis.bias.group_metrics`.
CURVE_COLUMNS = ("relative_bias", "relative_bias_lo", "relative_bias_hi", "relative_bias_plugin",
                 "relative_error_mean", "relative_error_se", "cosine_mean", "cosine_se", "norm_ratio_mean")
#: The readings of the effective context: column → the curve column it thresholds.
RULES = {"k_effective": "relative_bias_hi", "k_effective_point": "relative_bias",
         "k_effective_error": "relative_error_mean"}


def dyadic_grid(kmax: int) -> list[int]:
    """K = 1, 2, 4, …, ``kmax`` (a power of two)."""
    return [2**j for j in range(int(math.log2(kmax)) + 1)]


def held_out_positions(length: int, seq_len: int, n_batches: int, warmup: int, split: str,
                       batch_size: int) -> list[int]:
    """Starts of the last ``n_batches`` consecutive segments of ``seq_len`` steps of a stream of ``length``
    steps per row; UsageError (one line, what fits instead) when they and the first warm-up do not fit."""
    need = warmup + n_batches * seq_len
    if need > length:
        fits = (length - warmup) // seq_len
        raise UsageError(f"the {split} split has {length} steps per stream at batch {batch_size}; {n_batches} "
                         f"segments of {seq_len} steps after a warm-up of {warmup} need {need}: use at most "
                         f"{fits} batches, a shorter curve_seq_len, a smaller batch or another split")
    return [length - (n_batches - n) * seq_len for n in range(n_batches)]


@dataclass(frozen=True)
class CurveOptions:
    """What one effective-context measurement uses (see the module doc)."""

    seq_len: int
    kmax: int
    n_batches: int
    split: str = "valid"
    warmup: int = 512
    levels: tuple[float, ...] = LEVELS
    ci_level: float = 0.95
    max_lag: int = 0
    lag_positions: int = 8

    def check(self) -> None:
        """One-line UsageError for a value no measurement can use."""
        integer("curve_seq_len", self.seq_len, lo=1)
        power_of_two("kmax", self.kmax, hi=self.seq_len)
        integer("n_batches", self.n_batches, lo=1)
        integer("curve_warmup", self.warmup, lo=0)
        if not self.levels:
            raise UsageError("levels = [] reads no effective context; give levels such as [0.01, 0.05]")
        for level in self.levels:
            finite_float("levels", level, 0.0, 1.0, lo_open=True, hi_open=True)
        finite_float("ci_level", self.ci_level, 0.0, 1.0, lo_open=True, hi_open=True)
        integer("max_lag", self.max_lag, lo=0, hi=self.seq_len - 1)
        integer("lag_positions", self.lag_positions, lo=1)


@dataclass
class ContextCurve:
    """One measurement: a row per K (:data:`CURVE_COLUMNS` and ``k``), a row per level, its cost, and (with
    ``max_lag``) a row per lag of the lag profile (:func:`lag_rows`)."""

    curve: list[dict[str, Any]]
    levels: list[dict[str, Any]]
    seconds: float
    span: int
    checkpoint: int
    lags: list[dict[str, Any]] = field(default_factory=list)


def lag_rows(profiles: Sequence[LongLagProfile]) -> list[dict[str, Any]]:
    """One row per lag of profiles on several segments, pooled (positions of every segment together):
    ``lag``, ``phi_mean``, ``phi_se``, ``underflow`` and ``n_positions``."""
    first = profiles[0]
    pooled = LongLagProfile(first.lags, np.concatenate([p.positions for p in profiles]),
                            np.concatenate([p.phi for p in profiles]), first.horizon)
    return [{k: (int(v) if k in ("lag", "n_positions") else float(v)) for k, v in row.items()}
            for row in pooled.frame().to_dict("records")]


def context_curve(task: Task, model: nn.Module, options: CurveOptions, *, batch_size: int, seed: int = 0
                  ) -> ContextCurve:
    """The chunked(K) curve against g on held-out stream segments at the model's θ, and the effective context.

    The model's parameter gradients (``.grad``) are left as they were. ``seed`` seeds the interval's
    bookkeeping only (the segments are fixed by the split, T and the number of batches).
    """
    options.check()
    if not task.streaming:
        raise UsageError(f"the effective context is measured on long streams; task {task.name!r} is episodic")
    stream = task.stream(batch_size, options.split)
    positions = held_out_positions(stream.length, options.seq_len, options.n_batches, options.warmup,
                                   options.split, batch_size)
    batches = bias_batches(task, model, seq_len=options.seq_len, batch_size=batch_size, n_batches=options.n_batches,
                           seed=seed, split=options.split, warmup=options.warmup, positions=positions)
    ks = dyadic_grid(options.kmax)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    true_rows: list[np.ndarray] = []
    est_rows: dict[int, list[np.ndarray]] = {k: [] for k in ks}
    wide = copy.deepcopy(model).to(torch.float64) if options.max_lag else None
    profiles: list[LongLagProfile] = []
    t0 = time.perf_counter()
    span = checkpoint = 0
    for n, (segment, state) in enumerate(batches):
        if wide is not None:
            start = None if state is None else map_state(lambda t: t.to(torch.float64), state)
            profiles.append(long_lag_profile(wide, segment, task.loss_kind, options.max_lag,
                                             n_positions=options.lag_positions, state=start))
        out = streamed_chunked_curve(model, segment, task.loss_kind, ks, state=state)
        assert out.truth is not None
        true_rows.append(flatten(out.truth, names).cpu().numpy())
        for k in ks:
            est_rows[k].append(flatten(out.gradients[k], names).cpu().numpy())
        span, checkpoint = out.span, out.checkpoint
        log.debug("context curve: segment %d/%d done (%.1f s)", n + 1, options.n_batches, time.perf_counter() - t0)
    seconds = time.perf_counter() - t0
    true_mat = np.stack(true_rows)
    curve = []
    for k in ks:
        metrics = group_metrics(np.stack(est_rows[k]), true_mat, n_flips=0, level=options.ci_level,
                                seed=derive_seed("context", seed, k))
        curve.append({"k": k, **{c: metrics[c] for c in CURVE_COLUMNS}})
    return ContextCurve(curve, effective_contexts(curve, options.levels), seconds, span, checkpoint,
                        lag_rows(profiles) if profiles else [])


def effective_contexts(curve: Sequence[dict[str, Any]], levels: Sequence[float]) -> list[dict[str, Any]]:
    """One row per level: the smallest K of ``curve`` (rows with ``k`` and :data:`RULES`' columns) under each
    reading of the module doc; None where no K qualifies (a NaN value never qualifies)."""
    out = []
    for level in levels:
        row: dict[str, Any] = {"level": float(level)}
        for name, column in RULES.items():
            values = {int(r["k"]): float(r[column]) for r in curve if not math.isnan(float(r[column]))}
            row[name] = effective_context(values, level)
        out.append(row)
    return out


def describe_contexts(levels: Sequence[dict[str, Any]]) -> str:
    """``K(1%) = 64 [interval: –, point: 32]`` for a log line."""
    def text(value: Any) -> str:
        return "–" if value is None else str(value)

    return ", ".join(f"K({r['level']:.0%}) = {text(r['k_effective'])} [point {text(r['k_effective_point'])}, "
                     f"per-batch error {text(r['k_effective_error'])}]" for r in levels)


__all__ = ["CURVE_COLUMNS", "LEVELS", "RULES", "ContextCurve", "CurveOptions", "context_curve", "dyadic_grid",
           "describe_contexts", "effective_contexts", "held_out_positions", "lag_rows"]
