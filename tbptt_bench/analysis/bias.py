"""Measuring gradient bias: how wrong a truncated gradient is, on one batch and in expectation.

For a fixed θ and N independent batches (episodic tasks) or stream positions (streaming tasks), each
method's estimate ĝ_n is compared with the true gradient g_n of the same loss from the same initial
state (docs/design.md §3):

* per batch: relative error ‖ĝ - g‖/‖g‖, cosine, norm ratio ‖ĝ‖/‖g‖ — means and standard errors;
* bias proper: ``relative_bias``, an estimate of ``‖E(ĝ - g)‖ / ‖E(g)‖`` from unbiased U-statistics
  (the plug-in ``‖mean D‖²`` is inflated by ``tr Cov(D)/N``, so an unbiased method would look biased),
  with an interval that can contain 0 and ``bias_p_value``, a test of ``E(ĝ - g) = 0``
  (:mod:`tbptt_bench.analysis.expectation`, docs/statistics.md); the plug-in stays as
  ``relative_bias_plugin``;
* noise: ``variance_trace = tr Cov(ĝ)`` over batches, ``variance_trace_error = tr Cov(ĝ - g)`` and
  ``snr = ‖mean ĝ‖ / √tr Cov(ĝ)``;
* all of it overall (group ``all``) and per parameter group (input, recurrent, bias, readout);
* draw-free, at the measured batches: ``exact_relative_bias`` = ‖Σ_n (E ĝ_n − g_n)‖ / ‖Σ_n g_n‖ and
  ``exact_relative_error_max`` = max_n ‖E ĝ_n − g_n‖ / ‖g_n‖, E over the method's own random draws — a
  deterministic method's ĝ is its expectation; a random one's comes from its family's exact expected mask
  with ``expectation="exact"`` (NaN otherwise, and for random forward-mode estimators — UORO, KF-RTRL —
  which have none; RTRL, SnAp and RFLO are deterministic);
* the lag profile and, for each method, the bias extrapolated from it after Aicher et al. — an estimate
  under a geometric-decay assumption, not a bound (:mod:`tbptt_bench.core.lags`) — and its ratio to the
  exact figure, ``extrapolation_ratio``.

Estimates come from the fastest exact route (``fast=True``): sliding methods from one lag
decomposition, chunk-shaped grids from a K-curve ladder (:mod:`tbptt_bench.analysis.kcurve`), everything else
from the engine; ``fast=False`` runs every method through the engine. Where the true gradient does
not fit, ``probes=N`` compares through forward-mode probes instead (:mod:`tbptt_bench.analysis.truegrad`).
Column names: docs/bias.md.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch
from scipy import stats
from torch import nn

from tbptt_bench.errors import UsageError
from tbptt_bench.validation import integer_list
from tbptt_bench.analysis.bias_options import BiasOptions, SnapshotOptions
from tbptt_bench.analysis.expectation import expectation_bias
from tbptt_bench.analysis.gradients import Gradient, flatten, method_gradient, true_gradient
from tbptt_bench.analysis.kcurve import kcurve_gradients, plan
from tbptt_bench.core.lags import LagDecomposition, LagProfile, decomposition_profile, lag_decomposition
from tbptt_bench.methods.base import Method, parse_method
from tbptt_bench.methods.truncation import Full
from tbptt_bench.models.protocol import State, check_protocol, check_state, parameter_group
from tbptt_bench.provenance import provenance
from tbptt_bench.seeding import derive_seed, generator
from tbptt_bench.core.build import resolve_device, resolve_dtype
from tbptt_bench.tasks.base import Batch, Task
from tbptt_bench.core.trajectory import core_fn
from tbptt_bench.analysis.truegrad import (directional_derivatives, estimate_from_probes, in_dtype, mean_sem,
                                          probe_directions)

log = logging.getLogger(__name__)

GROUPS = ("all", "input", "recurrent", "bias", "readout", "other")


# -- batches -------------------------------------------------------------------------------------


def bias_batches(
    task: Task,
    model: nn.Module,
    *,
    seq_len: int,
    batch_size: int,
    n_batches: int,
    seed: int,
    split: str = "valid",
    warmup: int | None = None,
    positions: Sequence[int] | None = None,
) -> list[tuple[Batch, State | None]]:
    """The batches a bias measurement averages over, each with its initial state (None: zero state).

    Episodic tasks: ``n_batches`` independent samples, batch ``n`` drawn with seed
    ``derive_seed("bias", seed, n)``. Streaming tasks: ``n_batches`` segments of the split's B parallel
    streams at evenly spaced positions (or at the given start ``positions``, one per batch), each
    starting from the state reached by running the model (without gradient) over the ``warmup`` steps
    before it from the zero state (default ``warmup = seq_len``; 0 starts from the zero state). The
    gradient never crosses the segment start, as in training.
    """
    if n_batches < 1:
        raise UsageError(f"the number of batches must be ≥ 1, got {n_batches}")
    if seq_len < 1 or batch_size < 1:
        raise UsageError(f"seq_len and batch_size must be ≥ 1, got {seq_len} and {batch_size}")
    if not task.streaming:
        return [(task.sample(batch_size, seq_len, generator(derive_seed("bias", seed, n)), split), None)
                for n in range(n_batches)]
    warm = seq_len if warmup is None else warmup
    if warm < 0:
        raise UsageError(f"warm-up must be ≥ 0 steps, got {warm}")
    stream = task.stream(batch_size, split)
    room = stream.length - warm - seq_len
    if room < 0:
        raise UsageError(f"the {split} stream has {stream.length} steps per row; a segment needs "
                         f"warm-up {warm} + seq_len {seq_len}")
    if positions is None:
        positions = [warm + (room * n) // max(n_batches - 1, 1) for n in range(n_batches)]
    elif len(positions) != n_batches or any(not warm <= p <= stream.length - seq_len for p in positions):
        raise UsageError(f"give {n_batches} segment starts in {warm}..{stream.length - seq_len} (warm-up {warm}, "
                         f"seq_len {seq_len}, {stream.length} steps per row), got {list(positions)}")
    first = next(model.parameters())
    out: list[tuple[Batch, State | None]] = []
    core = core_fn(model)
    for p in positions:
        state: State = model.initial_state(batch_size)
        with torch.no_grad():
            for a in range(p - warm, p, 512):
                data = stream.slice(a, min(p, a + 512)).to(first.device, first.dtype)
                _, state = core(data.inputs, state)
        out.append((stream.slice(p, p + seq_len), state if warm > 0 else None))
    return out


# -- estimates -----------------------------------------------------------------------------------


def method_estimates(
    model: nn.Module,
    data: Batch,
    loss_kind: str,
    methods: Sequence[Method],
    state: State | None,
    *,
    fast: bool = True,
    ladders: bool = True,
    truth: Gradient | None = None,
    decomposition: LagDecomposition | None = None,
    seed: int = 0,
) -> dict[Method, Gradient]:
    """ĝ of each method on one batch, by the fastest exact route (``fast``) or through the engine.

    ``ladders=False`` leaves out the K-curve route (it keeps a graph of the whole sequence). Methods that
    draw random choices draw them from ``method_rng(seed, spec)``: give each batch its own ``seed``.
    """
    out: dict[Method, Gradient] = {}
    todo = list(methods)
    if fast:
        for m in todo:
            lags = m.fixed_lags
            if lags is not None and decomposition is not None and lags <= decomposition.max_lag:
                out[m] = decomposition.sliding(lags)
        if truth is not None:
            for m in todo:
                if isinstance(m, Full) and m.checkpoint is None:
                    out[m] = truth
        todo = [m for m in todo if m not in out]
        mask_methods = [m for m in todo if not isinstance(m, Full) and not m.forward_mode]  # forward mode: no mask
        planned = plan(mask_methods, data.length)[0] if ladders else []
        shared = [m for lad in planned if len(lad.methods) > 1 for m, _ in lad.methods]
        if shared:
            out.update(kcurve_gradients(model, data, loss_kind, shared, state))
        todo = [m for m in todo if m not in out]
    for m in todo:
        out[m] = method_gradient(model, data, m, loss_kind, state, seed=derive_seed(seed, m.spec))
    return out


# -- statistics ----------------------------------------------------------------------------------


def group_metrics(est: np.ndarray, true: np.ndarray, *, n_flips: int, level: float, seed: int) -> dict[str, float]:
    """All bias columns for one method and parameter group (rows: batches).

    The headline ``relative_bias`` is the noise-corrected estimate of ‖E[ĝ − g]‖ / ‖E[g]‖ with an
    interval that reaches 0 when the data allow no bias, and ``bias_p_value`` tests E[ĝ − g] = 0
    (:mod:`tbptt_bench.analysis.expectation`, docs/statistics.md); the plug-in ‖mean(ĝ − g)‖ /
    ‖mean(g)‖, which noise pushes up, is kept as ``relative_bias_plugin``.
    """
    n = est.shape[0]
    nt = np.linalg.norm(true, axis=1)
    ne = np.linalg.norm(est, axis=1)
    nd = np.linalg.norm(est - true, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(nt > 0, nd / nt, np.nan)
        cos = np.where((nt > 0) & (ne > 0), (est * true).sum(1) / (ne * nt), np.nan)
        ratio = np.where(nt > 0, ne / nt, np.nan)
    out: dict[str, float] = {}
    for name, arr in (("relative_error", rel), ("cosine", cos), ("norm_ratio", ratio)):
        out[f"{name}_mean"], out[f"{name}_se"] = mean_sem(arr)
    diff = est - true
    nan = math.nan
    e = expectation_bias(diff, true, level=level, n_flips=n_flips, seed=seed) if n >= 2 else None
    var_est = float(est.var(0, ddof=1).sum()) if n > 1 else nan
    out.update({
        "relative_bias": e.relative_bias if e else nan,
        "relative_bias_lo": e.relative_bias_lo if e else nan,
        "relative_bias_hi": e.relative_bias_hi if e else nan,
        "bias_p_value": e.p_value if e and n_flips > 0 else nan,
        "bias_p_value_min": e.p_value_min if e and n_flips > 0 else nan,
        "relative_bias_contains_zero": float(e.zero_in_interval) if e and n >= 4 else nan,
        "relative_bias_plugin": (float(np.linalg.norm(diff.mean(0)) / np.linalg.norm(true.mean(0)))
                                 if np.linalg.norm(true.mean(0)) > 0 else nan),
        "bias_norm": e.bias_norm if e else nan, "bias_norm_lo": e.bias_norm_lo if e else nan,
        "bias_norm_hi": e.bias_norm_hi if e else nan, "true_mean_norm": e.signal_norm if e else nan,
        "variance_trace": var_est, "variance_trace_true": float(true.var(0, ddof=1).sum()) if n > 1 else nan,
        "variance_trace_error": e.variance_trace if e else nan,
        "snr": float(np.linalg.norm(est.mean(0)) / math.sqrt(var_est)) if var_est and var_est > 0 else nan,
        "n_params": int(est.shape[1]),
    })
    return out


def exact_metrics(mean: np.ndarray | None, true: np.ndarray | None) -> dict[str, float]:
    """Draw-free bias at the measured batches from E ĝ_n (rows ``mean``) and g_n (rows ``true``):
    ``exact_relative_bias`` = ‖Σ_n (E ĝ_n − g_n)‖ / ‖Σ_n g_n‖ and ``exact_relative_error_max`` =
    max_n ‖E ĝ_n − g_n‖ / ‖g_n‖; NaN without an exact expectation."""
    if mean is None or true is None:
        return {"exact_relative_bias": math.nan, "exact_relative_error_max": math.nan}
    diff = mean - true
    total = float(np.linalg.norm(true.sum(0)))
    norms = np.linalg.norm(true, axis=1)
    per = np.linalg.norm(diff, axis=1)[norms > 0] / norms[norms > 0]
    return {"exact_relative_bias": float(np.linalg.norm(diff.sum(0))) / total if total > 0 else math.nan,
            "exact_relative_error_max": float(per.max()) if per.size else math.nan}


def probe_metrics(est: np.ndarray, directions: np.ndarray, probed: np.ndarray, *, level: float) -> dict[str, float]:
    """Bias columns from forward-mode probes: ``est`` [N, P] estimates, ``directions`` [n, P] probes,
    ``probed`` [N, n] directional derivatives ``vᵀg_b`` (the same probes for every batch).

    Per batch, :func:`~tbptt_bench.analysis.truegrad.estimate_from_probes` gives the relative error, cosine and
    ‖g‖²; their mean and standard error over batches include the probe noise. For the bias of the
    mean, ``vᵀ mean(ĝ - g) = mean_b (vᵀĝ_b - vᵀg_b)`` is probed the same way, with ``mean ĝ`` known;
    its interval is ``value ± z·SE`` with the jackknife SE over probes.
    """
    n_batches = est.shape[0]
    a = est @ directions.T  # [N, n]: vᵀĝ_b
    per = [estimate_from_probes(a[b], probed[b], float(np.linalg.norm(est[b]))) for b in range(n_batches)]
    mean_est = est.mean(0)
    pooled = estimate_from_probes(mean_est @ directions.T, probed.mean(0), float(np.linalg.norm(mean_est)))
    z = float(stats.norm.ppf(0.5 + level / 2))

    out: dict[str, float] = {}
    out["relative_error_mean"], out["relative_error_se"] = mean_sem([p.relative_error for p in per])
    out["cosine_mean"], out["cosine_se"] = mean_sem([p.cosine for p in per])
    out["norm_ratio_mean"], out["norm_ratio_se"] = mean_sem(
        [p.estimate_norm / math.sqrt(p.sq_true_norm) if p.sq_true_norm > 0 else math.nan for p in per])
    rb, se = pooled.relative_error, pooled.relative_error_se
    var_est = float(est.var(0, ddof=1).sum()) if n_batches > 1 else math.nan
    out.update({
        "relative_bias": rb, "relative_bias_lo": max(0.0, rb - z * se), "relative_bias_hi": rb + z * se,
        "bias_p_value": math.nan, "bias_p_value_min": math.nan, "relative_bias_plugin": math.nan, "bias_norm": math.sqrt(max(pooled.sq_error, 0.0)),
        "bias_norm_lo": math.nan, "bias_norm_hi": math.nan, "variance_trace_error": math.nan,
        "true_mean_norm": math.sqrt(max(pooled.sq_true_norm, 0.0)), "variance_trace": var_est,
        "variance_trace_true": math.nan,
        "snr": float(np.linalg.norm(mean_est) / math.sqrt(var_est)) if var_est and var_est > 0 else math.nan,
        "n_params": int(est.shape[1]), "n_probes": int(directions.shape[0]),
    })
    return out


# -- the measurement -----------------------------------------------------------------------------


@dataclass
class BiasReport:
    """The tidy bias table, the lag-profile table, the profile itself, and what was measured."""

    table: pd.DataFrame
    lags: pd.DataFrame
    profile: LagProfile | None
    meta: dict[str, Any] = field(default_factory=dict)
    #: One row per ordered pair of estimators: mean cosine over batches (:func:`alignment_table`).
    alignment: pd.DataFrame = field(default_factory=pd.DataFrame)


#: An exact relative bias at or below this is zero up to rounding (no extrapolation ratio to it).
EXACT_ZERO = 1e-12


@dataclass
class _Samples:
    """Per-batch gradients of one measurement: true rows (or probe rows), estimate rows per method."""

    true_rows: list[np.ndarray] = field(default_factory=list)
    est_rows: dict[Method, list[np.ndarray]] = field(default_factory=dict)
    #: E ĝ over the method's draws, per batch, for random methods measured with ``expectation="exact"``.
    exact_rows: dict[Method, list[np.ndarray]] = field(default_factory=dict)
    decompositions: list[LagDecomposition] = field(default_factory=list)
    directions: np.ndarray | None = None
    seconds: float = 0.0


def analyse_bias(task: Task, model: nn.Module, methods: Sequence[Method | str], options: BiasOptions | None = None,
                 *, progress: Callable[[int, int], None] | None = None, **fields: Any) -> BiasReport:
    """Measure every method against the true gradient at the model's current θ (see module doc).

    Options come as a :class:`BiasOptions` or as its fields by keyword (``seq_len=64, ...``), keywords
    overriding ``options``. ``progress(done, total)`` is called after each batch. With ``probes > 0`` only group ``all`` is measured; the interval is ±z·SE over
    probes (see :func:`probe_metrics`).
    """
    check_protocol(model)
    methods = [parse_method(m) for m in methods]
    opts = BiasOptions.of(options, fields)
    lag_max = opts.check(methods)
    first = next(model.parameters())
    dev = resolve_device(opts.device) if opts.device is not None else first.device
    dt = resolve_dtype(opts.dtype) if opts.dtype is not None else first.dtype
    mdl = in_dtype(model, dt).to(dev)
    check_state(mdl.initial_state(opts.batch_size))
    names = [n for n, p in mdl.named_parameters() if p.requires_grad]
    samples = _collect(task, mdl, methods, opts, lag_max, names, dev, dt, progress)
    profile = decomposition_profile(samples.decompositions, opts.fit_from) if samples.decompositions else None
    meta = _meta(task, model, opts, dt, lag_max, samples.seconds)
    prov = provenance(dev) if opts.with_provenance else {}
    rows = _rows(methods, samples, _group_index(mdl, names), profile, opts, {"n_batches": opts.n_batches, **meta, **prov})
    lags = profile.to_frame() if profile is not None else pd.DataFrame(columns=LAG_COLUMNS)
    if len(lags):
        lags.insert(0, "task", task.name)
    return BiasReport(rows, lags, profile, meta, _alignment(methods, samples, opts, {"n_batches": opts.n_batches, **meta}))


def _collect(task: Task, mdl: nn.Module, methods: list[Method], opts: BiasOptions, lag_max: int, names: list[str],
             dev: torch.device, dt: torch.dtype, progress: Callable[[int, int], None] | None = None) -> _Samples:
    """Every batch's true gradient (or probes), each method's estimate, and the lag decompositions."""
    out = _Samples(est_rows={m: [] for m in methods})
    fixed_max = max([m.fixed_lags for m in methods if m.fixed_lags is not None], default=0)
    batches = bias_batches(task, mdl, seq_len=opts.seq_len, batch_size=opts.batch_size, n_batches=opts.n_batches,
                           seed=opts.seed, split=opts.split, warmup=opts.warmup)
    t0 = time.perf_counter()
    for n, (batch, state) in enumerate(batches):
        data = batch.to(dev, dt)
        profile_here = n < opts.profile_batches and lag_max > 0
        D = max(fixed_max if opts.fast else 0, lag_max if profile_here else 0)
        dec = lag_decomposition(mdl, data, task.loss_kind, min(D, opts.seq_len), state,
                                profile=profile_here) if D else None
        if dec is not None and profile_here:
            out.decompositions.append(dec)
        truth = None
        if opts.probes:
            directions = probe_directions(mdl, opts.probes, derive_seed("probes", opts.seed), "rademacher")
            out.directions = np.stack([flatten(v, names).cpu().numpy() for v in directions])
            out.true_rows.append(directional_derivatives(mdl, data, task.loss_kind, directions, state).numpy())
        else:
            truth = true_gradient(mdl, data, task.loss_kind, state, checkpoint=opts.true_checkpoint)
            out.true_rows.append(flatten(truth, names).cpu().numpy())
        # The K-curve route keeps one full-length graph: not when the caller asked for checkpointing.
        ests = method_estimates(mdl, data, task.loss_kind, methods, state, fast=opts.fast,
                                ladders=opts.true_checkpoint is None, truth=truth, decomposition=dec,
                                seed=derive_seed("method-draws", opts.seed, n))
        for m in methods:
            out.est_rows[m].append(flatten(ests[m], names).cpu().numpy())
            if opts.expectation == "exact" and not m.deterministic:
                if m.expected_mask(opts.seq_len) is not None:
                    mean = method_gradient(mdl, data, m, task.loss_kind, state, expectation=True)
                    out.exact_rows.setdefault(m, []).append(flatten(mean, names).cpu().numpy())
        log.info("bias batch %d/%d done (%.1f s)", n + 1, opts.n_batches, time.perf_counter() - t0)
        if progress is not None:
            progress(n + 1, opts.n_batches)
    out.seconds = time.perf_counter() - t0
    return out


def _meta(task: Task, model: nn.Module, opts: BiasOptions, dt: torch.dtype, lag_max: int,
          seconds: float) -> dict[str, Any]:
    """What was measured: the constant columns of every row, and the report's ``meta``."""
    return {
        "task": task.name, "model": type(model).__name__, **(opts.labels or {}), "seq_len": opts.seq_len,
        "batch_size": opts.batch_size, "n_batches": opts.n_batches, "seed": opts.seed,
        "dtype": str(dt).replace("torch.", ""), "split": opts.split, "streaming": bool(task.streaming),
        "warmup": (opts.seq_len if opts.warmup is None else opts.warmup) if task.streaming else 0,
        "true_method": f"probes:{opts.probes}" if opts.probes else Full(checkpoint=opts.true_checkpoint).spec,
        "n_flips": opts.n_flips, "ci_level": opts.ci_level, "fast": opts.fast, "max_lag": lag_max, "seconds": seconds,
        "expectation": opts.expectation,
    }


def _rows(methods: list[Method], samples: _Samples, groups: dict[str, np.ndarray], profile: LagProfile | None,
          opts: BiasOptions, constant: dict[str, Any]) -> pd.DataFrame:
    """The tidy table: one row per (method, parameter group), identified by the method's own columns."""
    true_mat = np.stack(samples.true_rows)
    rows = []
    for i, m in enumerate(methods):
        est_mat = np.stack(samples.est_rows[m])
        mean_mat = (est_mat if m.deterministic
                    else np.stack(samples.exact_rows[m]) if m in samples.exact_rows else None)
        extrapolation = math.nan
        if profile is not None and not m.forward_mode:  # the extrapolation reads a mask
            extrapolation = 0.0 if isinstance(m, Full) else profile.method_extrapolation(m.updates(opts.seq_len), opts.seq_len)
        for group in (("all",) if opts.probes else GROUPS):
            idx = groups.get(group)
            if idx is None:
                continue
            row = {**m.describe(), "group": group}  # the method's own columns: family, spec, series, k, label
            if opts.probes:
                row.update(probe_metrics(est_mat, samples.directions, true_mat, level=opts.ci_level))
            else:
                row.update(group_metrics(est_mat[:, idx], true_mat[:, idx], n_flips=opts.n_flips, level=opts.ci_level,
                                         seed=derive_seed("bootstrap", opts.seed, i, group)))
            row.update(exact_metrics(None if mean_mat is None or opts.probes else mean_mat[:, idx],
                                     None if opts.probes else true_mat[:, idx]))
            row["extrapolation"] = extrapolation
            row["extrapolation_ratio"] = (extrapolation / row["exact_relative_bias"]  # none for a zero exact bias
                                          if row["exact_relative_bias"] > EXACT_ZERO else math.nan)
            row.update(constant)
            rows.append(row)
    table = pd.DataFrame(rows)
    if "k" in table.columns:
        table["k"] = table["k"].astype("Int64")
    return table


#: The spec and label of the true gradient in the alignment table (when no listed method is ``full``).
TRUE_SPEC, TRUE_LABEL = "true", "true gradient"
ALIGNMENT_COLUMNS = ["spec", "label", "other", "other_label", "group", "cosine_mean", "cosine_se", "n_finite"]


def alignment_table(vectors: dict[str, np.ndarray], labels: dict[str, str] | None = None) -> pd.DataFrame:
    """Mean over batches of ``cos(ĝ_i, ĝ_j)`` and its standard error, one row per ordered pair (i, j).

    ``vectors`` maps a spec to its per-batch estimates [N, P] (the same N batches for every spec): the
    alignment matrix of :mod:`tbptt_bench.analysis.online` averaged over batches (docs/design.md §7.3).
    A batch where either estimate is zero has no cosine and is left out (``n_finite`` counts the rest).
    """
    specs = list(vectors)
    if not specs:
        return pd.DataFrame(columns=ALIGNMENT_COLUMNS)
    stack = np.stack([np.asarray(vectors[s], dtype=float) for s in specs])  # [M, N, P]
    norms = np.linalg.norm(stack, axis=2)  # [M, N]
    dots = np.einsum("inp,jnp->ijn", stack, stack)
    denom = norms[:, None, :] * norms[None, :, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = np.where(denom > 0, dots / denom, np.nan)
    labels = labels or {}
    rows = []
    for i, a in enumerate(specs):
        for j, b in enumerate(specs):
            mean, se = mean_sem(cos[i, j])
            rows.append({"spec": a, "label": labels.get(a, a), "other": b, "other_label": labels.get(b, b),
                         "group": "all", "cosine_mean": mean, "cosine_se": se,
                         "n_finite": int(np.isfinite(cos[i, j]).sum())})
    return pd.DataFrame(rows, columns=ALIGNMENT_COLUMNS)


def _alignment(methods: list[Method], samples: _Samples, opts: BiasOptions, constant: dict[str, Any]) -> pd.DataFrame:
    """The alignment table of one measurement: every method, and the true gradient unless ``full`` is listed
    (with probes there is no true gradient vector, so only the methods)."""
    vectors = {m.spec: np.stack(samples.est_rows[m]) for m in methods}
    labels = {m.spec: m.label for m in methods}
    if not opts.probes and not any(isinstance(m, Full) for m in methods):
        vectors[TRUE_SPEC], labels[TRUE_SPEC] = np.stack(samples.true_rows), TRUE_LABEL
    table = alignment_table(vectors, labels)
    for name, value in constant.items():
        if name not in table.columns:
            table[name] = value
    return table


LAG_COLUMNS = ["lag", "mean", "q10", "q50", "q90", "mass", "n_pairs", "fitted", "fitted_robust", "rate",
               "rate_robust", "rate_robust_lo", "rate_robust_hi", "fit_from", "fit_to", "r_squared", "tail",
               "lower_norm", "extrapolation", "decay_geometric", "horizon"]


def measure_bias(task: Task, model: nn.Module, methods: Sequence[Method | str], options: BiasOptions | None = None,
                 **fields: Any) -> pd.DataFrame:
    """The tidy bias table: one row per (method spec, parameter group). See :func:`analyse_bias`."""
    return analyse_bias(task, model, methods, options, **fields).table


def _group_index(model: nn.Module, names: list[str]) -> dict[str, np.ndarray]:
    """Positions of each parameter group in the flattened gradient (``all`` = everything)."""
    sizes = {n: p.numel() for n, p in model.named_parameters() if n in names}
    out: dict[str, list[int]] = {"all": []}
    offset = 0
    for n in names:
        idx = list(range(offset, offset + sizes[n]))
        offset += sizes[n]
        out["all"].extend(idx)
        out.setdefault(parameter_group(n), []).extend(idx)
    return {g: np.asarray(v, dtype=int) for g, v in out.items() if v}


# -- bias over training --------------------------------------------------------------------------

#: Learning-curve columns of a bias snapshot (group ``all``), and the bias-table column each comes from.
SNAPSHOT_COLUMNS = {
    "relative_bias": "relative_bias", "relative_bias_lo": "relative_bias_lo", "relative_bias_hi": "relative_bias_hi",
    "bias_p_value": "bias_p_value", "relative_error": "relative_error_mean", "cosine": "cosine_mean",
    "norm_ratio": "norm_ratio_mean", "snr": "snr",
}


def parse_update_list(text: str) -> list[int]:
    """``"0,100,200"`` → ``[0, 100, 200]`` (integers ≥ 0)."""
    return integer_list("update counts", text, lo=0, example="0,100,200")


def bias_snapshots(
    task: Task,
    methods: Sequence[Method | str],
    at: Sequence[int],
    *,
    seq_len: int,
    batch_size: int,
    n_batches: int = SnapshotOptions.n_batches,
    seed: int = 0,
    n_flips: int = BiasOptions.n_flips,
) -> Callable[[int, nn.Module], dict[str, Any]]:
    """An ``on_eval(update, model)`` hook for :func:`tbptt_bench.training.loop.train` that measures bias.

    At the update counts in ``at`` it measures the methods at the current θ on ``n_batches`` held-out
    (``valid``) batches — the same batches at every snapshot — and returns learning-curve columns: for
    the first method unprefixed (:data:`SNAPSHOT_COLUMNS`, plus ``bias_method``), for the others
    prefixed ``"SPEC/"``. At other evaluation points the same columns are None.
    """
    methods = [parse_method(m) for m in methods]
    if not methods:
        raise UsageError("no methods to measure bias for; give at least one spec")
    wanted = set(at)
    keys = [*SNAPSHOT_COLUMNS, "bias_method"] + [f"{m.spec}/{c}" for m in methods[1:] for c in SNAPSHOT_COLUMNS]

    def on_eval(update: int, model: nn.Module) -> dict[str, Any]:
        out: dict[str, Any] = dict.fromkeys(keys)
        if update not in wanted:
            return out
        table = measure_bias(task, model, methods, seq_len=seq_len, batch_size=batch_size, n_batches=n_batches,
                             seed=derive_seed("bias-snapshot", seed), n_flips=n_flips, max_lag=0,
                             with_provenance=False)
        rows = table[table["group"] == "all"].set_index("spec")
        for i, m in enumerate(methods):
            prefix = "" if i == 0 else f"{m.spec}/"
            for col, source in SNAPSHOT_COLUMNS.items():
                value = float(rows.loc[m.spec, source])
                out[prefix + col] = value if math.isfinite(value) else None
        out["bias_method"] = methods[0].spec
        return out

    return on_eval
