"""Measuring gradient bias: how wrong a truncated gradient is, on one batch and in expectation.

For a fixed θ and N independent batches (episodic tasks) or stream positions (streaming tasks), each
method's estimate ĝ_n is compared with the true gradient g_n of the same loss from the same initial
state (docs/design.md §3):

* per batch: relative error ‖ĝ - g‖/‖g‖, cosine, norm ratio ‖ĝ‖/‖g‖ — means and standard errors;
* bias proper: ``relative_bias = ‖mean(ĝ - g)‖ / ‖mean(g)‖`` with a bootstrap confidence interval over
  batches (``scipy.stats.bootstrap``, BCa), and ``relative_bias_unbiased`` from the unbiased estimate
  of ``‖E(ĝ - g)‖²`` (``Σ_{n≠m} D_nᵀD_m / N(N-1)``; the plug-in ``‖mean D‖²`` is inflated by
  ``tr Cov(D)/N``);
* noise: ``variance_trace = tr Cov(ĝ)`` over batches and ``snr = ‖mean ĝ‖ / √tr Cov(ĝ)``;
* all of it overall (group ``all``) and per parameter group (input, recurrent, bias, readout);
* the lag profile and, for each method, the Aicher et al. bound built from it (:mod:`tbptt_bench.core.lags`).

Estimates come from the fastest exact route (``fast=True``): sliding methods from one lag
decomposition, chunk-shaped grids from a K-curve ladder (:mod:`tbptt_bench.analysis.kcurve`), everything else
from the engine; ``fast=False`` runs every method through the engine. Where the true gradient does
not fit, ``probes=N`` compares through forward-mode probes instead (:mod:`tbptt_bench.analysis.truegrad`).
Column names: docs/bias.md.
"""

from __future__ import annotations

import logging
import math
import re
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch
from scipy import stats
from torch import nn

from tbptt_bench.errors import UsageError
from tbptt_bench.methods.length import warn_long_windows
from tbptt_bench.analysis.gradients import Gradient, flatten, method_gradient, true_gradient
from tbptt_bench.analysis.kcurve import kcurve_gradients, plan
from tbptt_bench.core.lags import LagDecomposition, LagProfile, decomposition_profile, lag_decomposition
from tbptt_bench.methods.base import METHODS, Method, parse_method
from tbptt_bench.methods.truncation import Full
from tbptt_bench.models.protocol import State, check_protocol, check_state, parameter_group
from tbptt_bench.provenance import provenance
from tbptt_bench.seeding import derive_seed, generator
from tbptt_bench.core.build import resolve_device, resolve_dtype
from tbptt_bench.tasks.base import Batch, Task
from tbptt_bench.core.trajectory import core_fn
from tbptt_bench.analysis.truegrad import directional_derivatives, estimate_from_probes, in_dtype, probe_directions

log = logging.getLogger(__name__)

GROUPS = ("all", "input", "recurrent", "bias", "readout", "other")

#: The K-grid conventions of ``grid``: how a family name and a K become a spec.
GRID_RULES = {
    "chunked": "chunked:k={K}",
    "sliding": "sliding:k={K}",
    "tbptt": "tbptt:k1={K},k2={K2}",  # K2 = 2K - 1: chunks of K losses backpropagated over 2K - 1 steps
}


def grid(families: Sequence[str], ks: Sequence[int]) -> list[Method]:
    """Methods for every family and K: ``chunked:k=K``, ``sliding:k=K``, ``tbptt:k1=K,k2=2K-1``.

    ``full`` (or a family given as a complete spec, with ``:``) is taken once, as is. Another family
    with a ``k`` parameter becomes ``FAMILY:k=K``.
    """
    out: list[Method] = []
    for fam in families:
        if ":" in fam or fam == "full":
            out.append(parse_method(fam))
            continue
        if not ks:
            raise UsageError(f"method family {fam!r} needs a K grid (--k 1,2,4,...) or a complete spec like {fam}:k=8")
        cls = METHODS.get(fam)
        for k in ks:
            if fam in GRID_RULES:
                out.append(parse_method(GRID_RULES[fam].format(K=k, K2=2 * k - 1)))
            elif "k" in cls.schema:
                out.append(parse_method(f"{fam}:k={k}"))
            else:
                raise UsageError(f"method family {fam!r} has no K parameter; give complete specs instead")
    unique: list[Method] = []
    for m in out:
        if m not in unique:
            unique.append(m)
    return unique


_TOKEN = re.compile(r"^[a-z][a-z0-9_\-]*$")


def split_specs(text: str) -> list[str]:
    """Split ``"chunked:k=8,tbptt:k1=4,k2=8,full"`` into specs: a ``KEY=VALUE`` item continues the spec before it."""
    out: list[str] = []
    for item in (p.strip() for p in text.split(",")):
        if not item:
            continue
        if "=" in item and ":" not in item:
            if not out:
                raise UsageError(f"malformed method list {text!r}: {item!r} belongs to no method")
            out[-1] += "," + item
        elif ":" in item or _TOKEN.match(item):
            out.append(item)
        else:
            raise UsageError(f"malformed method list {text!r}: cannot read {item!r}")
    return out


def method_columns(method: Method) -> dict[str, Any]:
    """family, spec, k (the grid K: chunked/sliding k, tbptt k1; NaN for full), k1, k2."""
    p = method.params
    nan = math.nan
    if isinstance(method, Full):
        k, k1, k2 = nan, nan, nan
    elif method.family == "chunked":
        k = k1 = k2 = p["k"]
    elif method.family == "sliding":
        k, k1, k2 = p["k"], p.get("k1") or p["k"], nan
    else:
        k1, k2 = p.get("k1", nan), p.get("k2", nan)
        k = p.get("k", k1 if k1 is not None else nan)
    return {"family": method.family, "spec": method.spec, "k": _num(k), "k1": _num(k1), "k2": _num(k2)}


def _num(v: Any) -> float:
    return math.nan if v is None else float(v)


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
) -> list[tuple[Batch, State | None]]:
    """The batches a bias measurement averages over, each with its initial state (None: zero state).

    Episodic tasks: ``n_batches`` independent samples, batch ``n`` drawn with seed
    ``derive_seed("bias", seed, n)``. Streaming tasks: ``n_batches`` segments of the split's B parallel
    streams at evenly spaced positions, each starting from the state reached by running the model
    (without gradient) over the ``warmup`` steps before it from the zero state (default ``warmup =
    seq_len``; 0 starts from the zero state). The gradient never crosses the segment start, as in
    training.
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
    positions = [warm + (room * n) // max(n_batches - 1, 1) for n in range(n_batches)]
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
) -> dict[Method, Gradient]:
    """ĝ of each method on one batch, by the fastest exact route (``fast``) or through the engine.

    ``ladders=False`` leaves out the K-curve route (it keeps a graph of the whole sequence).
    """
    out: dict[Method, Gradient] = {}
    todo = list(methods)
    if fast:
        for m in [m for m in todo if m.family == "sliding" and decomposition is not None]:
            if m.params["k"] <= decomposition.max_lag:
                out[m] = decomposition.sliding(m.params["k"])
        if truth is not None:
            for m in todo:
                if isinstance(m, Full) and m.checkpoint is None:
                    out[m] = truth
        todo = [m for m in todo if m not in out]
        planned = plan([m for m in todo if not isinstance(m, Full)], data.length)[0] if ladders else []
        shared = [m for lad in planned if len(lad.methods) > 1 for m, _ in lad.methods]
        if shared:
            out.update(kcurve_gradients(model, data, loss_kind, shared, state))
        todo = [m for m in todo if m not in out]
    for m in todo:
        out[m] = method_gradient(model, data, m, loss_kind, state)
    return out


# -- statistics ----------------------------------------------------------------------------------


def bootstrap_relative_bias(
    diff: np.ndarray, true: np.ndarray, *, n_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """``‖mean(diff)‖ / ‖mean(true)‖`` over rows, and its bootstrap (BCa) confidence interval.

    Resampling is over rows (batches). Only the row Gram matrices enter, so each resample costs N²
    regardless of the parameter count.
    """
    n = diff.shape[0]
    gd, gt = diff @ diff.T, true @ true.T

    def statistic(idx: np.ndarray, axis: int = -1) -> np.ndarray:
        idx = np.moveaxis(np.asarray(idx), axis, -1).astype(int)
        num = gd[idx[..., :, None], idx[..., None, :]].sum((-1, -2))
        den = gt[idx[..., :, None], idx[..., None, :]].sum((-1, -2))
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.sqrt(np.maximum(num, 0) / den)

    value = float(statistic(np.arange(n)))
    if n < 2 or n_boot < 1 or not math.isfinite(value):
        return value, math.nan, math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = stats.bootstrap((np.arange(n),), statistic, vectorized=True, n_resamples=n_boot,
                              confidence_level=level, method="BCa", random_state=np.random.default_rng(seed),
                              batch=max(1, 4_000_000 // (n * n)))
    lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    if not (math.isfinite(lo) and math.isfinite(hi)):  # degenerate (e.g. a constant statistic)
        boot = res.bootstrap_distribution
        if np.allclose(boot, value):
            lo = hi = value
    return value, lo, hi


def _unbiased_sq_norm_of_mean(x: np.ndarray) -> float:
    """Unbiased estimate of ‖E x‖² from rows: Σ_{n≠m} x_nᵀx_m / N(N-1)."""
    n = x.shape[0]
    if n < 2:
        return math.nan
    s = x.sum(0)
    return float((s @ s - (x * x).sum()) / (n * (n - 1)))


def group_metrics(est: np.ndarray, true: np.ndarray, *, n_boot: int, level: float, seed: int) -> dict[str, float]:
    """All bias columns for one method and parameter group (rows: batches)."""
    n = est.shape[0]
    nt = np.linalg.norm(true, axis=1)
    ne = np.linalg.norm(est, axis=1)
    nd = np.linalg.norm(est - true, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(nt > 0, nd / nt, np.nan)
        cos = np.where((nt > 0) & (ne > 0), (est * true).sum(1) / (ne * nt), np.nan)
        ratio = np.where(nt > 0, ne / nt, np.nan)

    def mean_se(x: np.ndarray) -> tuple[float, float]:
        x = x[np.isfinite(x)]
        if not len(x):
            return math.nan, math.nan
        return float(x.mean()), float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else math.nan

    diff = est - true
    value, lo, hi = bootstrap_relative_bias(diff, true, n_boot=n_boot, level=level, seed=seed)
    ub_num, ub_den = _unbiased_sq_norm_of_mean(diff), _unbiased_sq_norm_of_mean(true)
    mean_est = est.mean(0)
    var_est = float(est.var(0, ddof=1).sum()) if n > 1 else math.nan
    var_true = float(true.var(0, ddof=1).sum()) if n > 1 else math.nan
    out = {}
    for name, arr in (("relative_error", rel), ("cosine", cos), ("norm_ratio", ratio)):
        out[f"{name}_mean"], out[f"{name}_se"] = mean_se(arr)
    out.update({
        "relative_bias": value, "relative_bias_lo": lo, "relative_bias_hi": hi,
        "relative_bias_unbiased": (math.sqrt(max(ub_num, 0.0) / ub_den) if ub_den and ub_den > 0 else math.nan),
        "bias_norm": float(np.linalg.norm(diff.mean(0))), "true_mean_norm": float(np.linalg.norm(true.mean(0))),
        "variance_trace": var_est, "variance_trace_true": var_true,
        "snr": float(np.linalg.norm(mean_est) / math.sqrt(var_est)) if var_est and var_est > 0 else math.nan,
        "n_params": int(est.shape[1]),
    })
    return out


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

    def mean_se(x: list[float]) -> tuple[float, float]:
        arr = np.asarray(x, float)
        arr = arr[np.isfinite(arr)]
        if not len(arr):
            return math.nan, math.nan
        return float(arr.mean()), float(arr.std(ddof=1) / math.sqrt(len(arr))) if len(arr) > 1 else math.nan

    out: dict[str, float] = {}
    out["relative_error_mean"], out["relative_error_se"] = mean_se([p.relative_error for p in per])
    out["cosine_mean"], out["cosine_se"] = mean_se([p.cosine for p in per])
    out["norm_ratio_mean"], out["norm_ratio_se"] = mean_se(
        [p.estimate_norm / math.sqrt(p.sq_true_norm) if p.sq_true_norm > 0 else math.nan for p in per])
    rb, se = pooled.relative_error, pooled.relative_error_se
    var_est = float(est.var(0, ddof=1).sum()) if n_batches > 1 else math.nan
    out.update({
        "relative_bias": rb, "relative_bias_lo": max(0.0, rb - z * se), "relative_bias_hi": rb + z * se,
        "relative_bias_unbiased": math.nan, "bias_norm": math.sqrt(max(pooled.sq_error, 0.0)),
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


def default_max_lag(seq_len: int, methods: Sequence[Method]) -> int:
    """Lags profiled when not given: every sliding K, and at least min(T - 1, 64)."""
    slide = [m.params["k"] for m in methods if m.family == "sliding"]
    return max(1, min(seq_len, max([min(seq_len - 1, 64), *slide])))


def analyse_bias(
    task: Task,
    model: nn.Module,
    methods: Sequence[Method | str],
    *,
    seq_len: int,
    batch_size: int,
    n_batches: int,
    seed: int,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    true_checkpoint: int | None = None,
    n_boot: int = 2000,
    ci_level: float = 0.95,
    split: str = "valid",
    warmup: int | None = None,
    max_lag: int | None = None,
    profile_batches: int = 1,
    fit_from: int = 1,
    fast: bool = True,
    with_provenance: bool = True,
    labels: dict[str, Any] | None = None,
    probes: int = 0,
) -> BiasReport:
    """Measure every method against the true gradient at the model's current θ (see module doc).

    ``dtype`` (e.g. float64) computes everything on a copy of the model in that dtype.
    ``max_lag``: lags of the profile (0: none); the profile pools the first ``profile_batches``.
    ``labels``: extra constant columns (e.g. ``{"model": "lstm", "hidden": 64}``).
    ``probes > 0``: no true gradient is formed; g enters only through that many forward-mode
    directional derivatives per batch (:mod:`tbptt_bench.analysis.truegrad`), for sequences whose BPTT graph
    does not fit. Only group ``all``; the interval is ±z·SE over probes (see :func:`probe_metrics`).
    """
    check_protocol(model)
    methods = [parse_method(m) for m in methods]
    if not methods:
        raise UsageError("no methods to measure; give at least one method spec")
    if n_batches < 1:
        raise UsageError(f"the number of batches must be ≥ 1, got {n_batches}")
    if seq_len < 1:
        raise UsageError(f"seq_len must be ≥ 1, got {seq_len}")
    warn_long_windows(methods, seq_len)
    if true_checkpoint is not None and true_checkpoint < 1:
        raise UsageError(f"the checkpoint length must be ≥ 1, got {true_checkpoint}")
    if not 0 < ci_level < 1:
        raise UsageError(f"the confidence level must be in (0, 1), got {ci_level}")
    if probes < 0 or probes == 1:
        raise UsageError(f"the number of probes must be 0 (exact true gradient) or ≥ 2, got {probes}")
    lag_max = default_max_lag(seq_len, methods) if max_lag is None else max_lag
    if lag_max < 0 or lag_max > seq_len:
        raise UsageError(f"the maximum lag D must be between 0 and the sequence length T={seq_len}, got {lag_max}")
    first = next(model.parameters())
    dev = resolve_device(device) if device is not None else first.device
    dt = resolve_dtype(dtype) if dtype is not None else first.dtype
    mdl = in_dtype(model, dt).to(dev)
    check_state(mdl.initial_state(batch_size))
    names = [n for n, p in mdl.named_parameters() if p.requires_grad]
    groups = _group_index(mdl, names)
    slide_max = max([m.params["k"] for m in methods if m.family == "sliding"], default=0)
    batches = bias_batches(task, mdl, seq_len=seq_len, batch_size=batch_size, n_batches=n_batches, seed=seed,
                           split=split, warmup=warmup)
    true_rows: list[np.ndarray] = []
    est_rows: dict[Method, list[np.ndarray]] = {m: [] for m in methods}
    decs: list[LagDecomposition] = []
    t0 = time.perf_counter()
    for n, (batch, state) in enumerate(batches):
        data = batch.to(dev, dt)
        profile_here = n < profile_batches and lag_max > 0
        D = max(slide_max if fast else 0, lag_max if profile_here else 0)
        dec = lag_decomposition(mdl, data, task.loss_kind, min(D, seq_len), state, profile=profile_here) if D else None
        if dec is not None and profile_here:
            decs.append(dec)
        truth = None
        if probes:
            directions = probe_directions(mdl, probes, derive_seed("probes", seed), "rademacher")
            dirs = np.stack([flatten(v, names).cpu().numpy() for v in directions])
            true_rows.append(directional_derivatives(mdl, data, task.loss_kind, directions, state).numpy())
        else:
            truth = true_gradient(mdl, data, task.loss_kind, state, checkpoint=true_checkpoint)
            true_rows.append(flatten(truth, names).cpu().numpy())
        # The K-curve route keeps one full-length graph: not when the caller asked for checkpointing.
        ests = method_estimates(mdl, data, task.loss_kind, methods, state, fast=fast,
                                ladders=true_checkpoint is None, truth=truth, decomposition=dec)
        for m in methods:
            est_rows[m].append(flatten(ests[m], names).cpu().numpy())
        log.info("bias batch %d/%d done (%.1f s)", n + 1, n_batches, time.perf_counter() - t0)
    elapsed = time.perf_counter() - t0
    profile = decomposition_profile(decs, fit_from) if decs else None
    true_mat = np.stack(true_rows)
    meta = {
        "task": task.name, "model": type(model).__name__, **(labels or {}), "seq_len": seq_len, "batch_size": batch_size,
        "n_batches": n_batches, "seed": seed, "dtype": str(dt).replace("torch.", ""), "split": split,
        "streaming": bool(task.streaming), "warmup": (seq_len if warmup is None else warmup) if task.streaming else 0,
        "true_method": f"probes:{probes}" if probes else Full(checkpoint=true_checkpoint).spec, "n_boot": n_boot, "ci_level": ci_level,
        "fast": fast, "max_lag": lag_max, "seconds": elapsed,
    }
    prov = provenance(dev) if with_provenance else {}
    rows = []
    for i, m in enumerate(methods):
        est_mat = np.stack(est_rows[m])
        bound = math.nan
        if profile is not None:
            bound = 0.0 if isinstance(m, Full) else profile.method_extrapolation(m.updates(seq_len), seq_len)
        for group in (("all",) if probes else GROUPS):
            idx = groups.get(group)
            if idx is None:
                continue
            row = {**method_columns(m), "group": group}
            if probes:
                row.update(probe_metrics(est_mat, dirs, true_mat, level=ci_level))
            else:
                row.update(group_metrics(est_mat[:, idx], true_mat[:, idx], n_boot=n_boot, level=ci_level,
                                         seed=derive_seed("bootstrap", seed, i, group)))
            row["bound"] = bound
            row.update({"n_batches": n_batches, **meta, **prov})
            rows.append(row)
    table = pd.DataFrame(rows)
    lags = profile.to_frame() if profile is not None else pd.DataFrame(columns=LAG_COLUMNS)
    if len(lags):
        lags.insert(0, "task", task.name)
    return BiasReport(table, lags, profile, meta)


LAG_COLUMNS = ["lag", "mean", "q10", "q50", "q90", "mass", "n_pairs", "fitted", "fitted_robust", "rate",
               "rate_robust", "rate_robust_lo", "rate_robust_hi", "fit_from", "fit_to", "tail", "lower_norm",
               "bound", "horizon"]


def measure_bias(
    task: Task,
    model: nn.Module,
    methods: Sequence[Method | str],
    *,
    seq_len: int,
    batch_size: int,
    n_batches: int,
    seed: int,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    true_checkpoint: int | None = None,
    n_boot: int = 2000,
    **options: Any,
) -> pd.DataFrame:
    """The tidy bias table: one row per (method spec, parameter group). See :func:`analyse_bias`."""
    return analyse_bias(task, model, methods, seq_len=seq_len, batch_size=batch_size, n_batches=n_batches,
                        seed=seed, device=device, dtype=dtype, true_checkpoint=true_checkpoint, n_boot=n_boot,
                        **options).table


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
    "relative_error": "relative_error_mean", "cosine": "cosine_mean", "norm_ratio": "norm_ratio_mean", "snr": "snr",
}


def parse_update_list(text: str) -> list[int]:
    """``"0,100,200"`` → ``[0, 100, 200]`` (integers ≥ 0)."""
    out = []
    for item in (s.strip() for s in text.split(",") if s.strip()):
        try:
            value = int(item)
        except ValueError:
            raise UsageError(f"update counts are integers ≥ 0 separated by commas, e.g. 0,100,200; got {item!r}") from None
        if value < 0:
            raise UsageError(f"update counts must be ≥ 0, got {value}")
        out.append(value)
    return out


def bias_snapshots(
    task: Task,
    methods: Sequence[Method | str],
    at: Sequence[int],
    *,
    seq_len: int,
    batch_size: int,
    n_batches: int = 4,
    seed: int = 0,
    n_boot: int = 1000,
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
                             seed=derive_seed("bias-snapshot", seed), n_boot=n_boot, max_lag=0,
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
