"""The true gradient g at any length: exact, checkpointed, float64, or probed in forward mode.

* exact full BPTT and full BPTT with activation checkpointing run through the engine
  (:func:`true_gradient`, ``full`` and ``full:checkpoint=C``); memory ~T and ~T/C + C;
* float64 on demand: :func:`in_dtype` makes a copy of the model in another dtype, so that both ĝ and
  g can be computed there;
* where even the checkpointed graph does not fit, forward-mode probes: for a random direction ``v``
  with ``E[v vᵀ] = I`` (Rademacher by default), ``vᵀg`` is the directional derivative of the total
  loss, computed with ``torch.func.jvp`` chunk by chunk (state and its tangent carried across chunks,
  no graph kept: memory independent of T), through kernels that have a forward-mode derivative
  (oneDNN's and cuDNN's fused RNN kernels have none, so both are switched off for it); where even
  those have none, ``vᵀg`` comes from g by reverse mode, checkpointed (:data:`PROBE_ROUTES`). Then ``E[(vᵀ(ĝ - g))²] = ‖ĝ - g‖²``,
  ``ĝᵀg`` and ``‖g‖²`` follow without bias from the known ĝ (see :func:`estimate_from_probes`); the
  relative error and cosine are ratios of these means, with jackknife standard errors over the probes
  (:func:`probe_compare`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import warnings
from dataclasses import asdict, dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from scipy import stats
from torch import nn

from tbptt_bench.core.engine import Source, step_loss_sum
from tbptt_bench.errors import UsageError
from tbptt_bench.analysis.gradients import Gradient, flatten, true_gradient
from tbptt_bench.models.protocol import State, check_protocol, check_state, map_state

__all__ = ["ProbeEstimate", "directional_derivatives", "in_dtype", "probe_compare", "probe_directions", "true_gradient"]

PROBE_KINDS = ("rademacher", "gaussian")
#: How :func:`directional_derivatives` computed ``vᵀg``: ``jvp``, forward mode through kernels that
#: support it (oneDNN and cuDNN off); ``reverse``, when the model has an operation without a
#: forward-mode derivative even then: g by reverse mode (checkpointed every ``chunk`` steps), then ``vᵀg``.
PROBE_ROUTES = ("jvp", "reverse")

log = logging.getLogger(__name__)


def in_dtype(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of ``model`` with floating-point parameters and buffers in ``dtype`` (the model itself if equal)."""
    first = next(model.parameters(), None)
    if first is not None and first.dtype == dtype:
        return model
    return copy.deepcopy(model).to(dtype)


def probe_directions(model: nn.Module, n: int, seed: int, kind: str = "rademacher") -> list[Gradient]:
    """``n`` random directions in parameter space with ``E[v vᵀ] = I``, drawn from ``seed``."""
    if kind not in PROBE_KINDS:
        raise UsageError(f"unknown probe distribution {kind!r}; accepted: {', '.join(PROBE_KINDS)}")
    if n < 2:
        raise UsageError(f"at least 2 probes are needed for a standard error, got {n}")
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        v: Gradient = {}
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if kind == "gaussian":
                r = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            else:
                r = torch.randint(0, 2, p.shape, generator=gen).to(torch.float64) * 2 - 1
            v[name] = r.to(device=p.device, dtype=p.dtype)
        out.append(v)
    return out


def directional_derivatives(
    model: nn.Module,
    source: Source,
    loss_kind: str,
    directions: Sequence[Gradient],
    state: State | None = None,
    chunk: int = 256,
    *,
    return_route: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, str]:
    """``vᵀg`` for each direction ``v`` (float64, on the CPU); with ``return_route``, also which of
    :data:`PROBE_ROUTES` computed it.

    Forward mode: each chunk of ``chunk`` steps is evaluated with ``torch.func.jvp`` from the state and
    state tangent left by the previous one, so memory does not grow with the sequence length. A model
    with an operation that has no forward-mode derivative falls back to reverse mode (logged).
    """
    check_protocol(model)
    if chunk < 1:
        raise UsageError(f"the probe chunk length must be ≥ 1, got {chunk}")
    try:
        out, route = _forward_probes(model, source, loss_kind, directions, state, chunk), "jvp"
    except (NotImplementedError, RuntimeError) as exc:
        if not isinstance(exc, NotImplementedError) and "forward ad" not in str(exc).lower():
            raise
        log.warning("forward-mode probes unavailable (%s); vᵀg from reverse mode instead", str(exc).splitlines()[0])
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        g = flatten(true_gradient(model, source, loss_kind, state, checkpoint=chunk), names)
        out, route = torch.stack([torch.dot(flatten(v, names), g) for v in directions]).cpu(), "reverse"
    return (out, route) if return_route else out


def _forward_probes(model: nn.Module, source: Source, loss_kind: str, directions: Sequence[Gradient],
                    state: State | None, chunk: int) -> torch.Tensor:
    from torch.func import functional_call, jvp  # imported here: torch.func pulls in sympy (slow start-up)

    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    first = next(iter(params.values()))
    B, T = source.batch_size, source.length
    h0 = model.initial_state(B) if state is None else state
    check_state(h0)
    out = torch.zeros(len(directions), dtype=torch.float64)
    for i, v in enumerate(directions):
        tangent = {n: v[n] for n in names}
        h = map_state(lambda s: s.detach(), h0)
        dh = map_state(torch.zeros_like, h)
        total = torch.zeros((), dtype=torch.float64, device=first.device)
        for a in range(0, T, chunk):
            data = source.slice(a, min(T, a + chunk)).to(first.device, first.dtype)

            def run(p: dict[str, torch.Tensor], s: State, data=data) -> tuple[torch.Tensor, State]:
                outputs, new = functional_call(model, p, (data.inputs, s))
                return step_loss_sum(outputs, data, loss_kind, B), new

            # oneDNN's and cuDNN's fused RNN kernels have no forward-mode derivative; the native ones do.
            with torch.no_grad(), _native_kernels():
                (_, h), (dloss, dh) = jvp(run, (params, h), (tangent, dh))
            total += dloss.to(torch.float64)
        out[i] = total
    return out


@contextlib.contextmanager
def _native_kernels() -> Iterator[None]:
    """oneDNN and cuDNN off (oneDNN's flag setter warns about TF32 on Intel GPUs, irrelevant here: silenced)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        flags = torch.backends.mkldnn.flags(enabled=False)
        flags.__enter__()
    try:
        with torch.backends.cudnn.flags(enabled=False):
            yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            flags.__exit__(None, None, None)


def _jackknife_se(stat, n: int) -> float:  # type: ignore[no-untyped-def]
    """Jackknife standard error of ``stat(mask)`` over ``n`` probes."""
    if n < 2:
        return math.nan
    keep = np.ones(n, dtype=bool)
    values = []
    for i in range(n):
        keep[i] = False
        values.append(stat(keep))
        keep[i] = True
    values = np.asarray(values, dtype=float)
    if not np.all(np.isfinite(values)):
        return math.nan
    return float(np.sqrt((n - 1) / n * ((values - values.mean()) ** 2).sum()))


@dataclass(frozen=True)
class ProbeEstimate:
    """Probe estimates of ĝ against g, each with its standard error over the probes."""

    n_probes: int
    sq_error: float
    sq_error_se: float
    sq_true_norm: float
    sq_true_norm_se: float
    dot: float
    dot_se: float
    relative_error: float
    relative_error_se: float
    cosine: float
    cosine_se: float
    estimate_norm: float
    route: str = "jvp"  # how vᵀg was computed (PROBE_ROUTES)

    def as_dict(self) -> dict[str, float | str]:
        return asdict(self)


def mean_sem(x: Sequence[float] | np.ndarray, *, finite_only: bool = True) -> tuple[float, float]:
    """Mean and standard error of the mean (``scipy.stats.sem``, ddof 1) of ``x``; NaN where undefined.

    ``finite_only`` leaves out NaN and infinite entries first (a batch whose true gradient is zero).
    """
    arr = np.asarray(x, dtype=float)
    if finite_only:
        arr = arr[np.isfinite(arr)]
    if not len(arr):
        return math.nan, math.nan
    return float(arr.mean()), float(stats.sem(arr)) if len(arr) > 1 else math.nan


def estimate_from_probes(a: np.ndarray, b: np.ndarray, estimate_norm: float) -> ProbeEstimate:
    """Statistics from ``a_i = vᵢᵀĝ`` and ``b_i = vᵢᵀg`` (``estimate_norm`` = ‖ĝ‖, known exactly).

    ĝ is known, so g is written ``ĝ - e`` with ``e = ĝ - g`` and only terms in ``e`` are probed:
    ``ĝᵀg = ‖ĝ‖² - ĝᵀe`` and ``‖g‖² = ‖ĝ‖² - 2ĝᵀe + ‖e‖²``, each estimated without bias per probe. Their
    noise shrinks with ‖e‖ instead of growing with ‖g‖ (a control variate).
    """
    a, b = np.asarray(a, float), np.asarray(b, float)
    n = len(a)
    est2 = estimate_norm**2
    e = a - b
    err2 = e**2
    dot = est2 - a * e
    true2 = est2 - 2 * a * e + err2

    def rel(m: np.ndarray) -> float:
        t = true2[m].mean()
        return float(math.sqrt(err2[m].mean() / t)) if t > 0 else math.nan

    def cos(m: np.ndarray) -> float:
        t = true2[m].mean()
        return float(dot[m].mean() / (estimate_norm * math.sqrt(t))) if t > 0 and estimate_norm > 0 else math.nan

    all_ = np.ones(n, dtype=bool)
    e2, e2_se = mean_sem(err2, finite_only=False)
    t, t_se = mean_sem(true2, finite_only=False)
    d, d_se = mean_sem(dot, finite_only=False)
    return ProbeEstimate(n, e2, e2_se, t, t_se, d, d_se, rel(all_), _jackknife_se(rel, n), cos(all_),
                         _jackknife_se(cos, n), estimate_norm)


def probe_compare(
    model: nn.Module,
    source: Source,
    loss_kind: str,
    estimate: Gradient,
    *,
    n_probes: int = 32,
    seed: int = 0,
    state: State | None = None,
    kind: str = "rademacher",
    chunk: int = 256,
) -> ProbeEstimate:
    """Compare an estimate ĝ with the true gradient without forming g: forward-mode probes."""
    directions = probe_directions(model, n_probes, seed, kind)
    b, route = directional_derivatives(model, source, loss_kind, directions, state, chunk, return_route=True)
    names = list(estimate)
    flat = flatten(estimate, names)
    a = np.array([float(torch.dot(flatten(v, names), flat)) for v in directions])
    return dataclasses.replace(estimate_from_probes(a, b.numpy(), float(torch.linalg.vector_norm(flat))), route=route)
