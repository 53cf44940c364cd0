"""Adaptive truncation length (Aicher, Foti & Fox 2019): keep the estimated relative bias under δ.

Spec ``adaptive:delta=0.1,kmin=2,kmax=100,every=50[,k0=15][,window=100][,family=overlap]``.

Every ``every`` updates, at the current θ, the method measures the lag profile φ_d on recent data — the
first ``window`` steps of the sequence or stream segment it is about to train on, from that segment's
true initial state — with :func:`tbptt_bench.core.lags.lag_profile`, and sets K to the smallest value in
``[kmin, kmax]`` whose extrapolated relative bias :func:`tbptt_bench.core.lags.extrapolated_bias` (for
ĝ_K = sliding(K), every loss keeping lags 0..K-1; an estimate under a geometric-decay assumption, not a
bound) is at most δ; if none is, K = kmax. Training then
uses the window family's updates for that K: ``overlap`` (default) is tbptt(K, 2K-1), as in the paper's
experiments, so every loss keeps at least K lags; ``chunked`` and ``sliding`` are also accepted.

The estimate happens in :meth:`Adaptive.observe`, which training calls before each sequence or stream
segment; a new K therefore takes effect at the first segment boundary at least ``every`` updates after
the previous estimate (the first estimate is at the start, or, with ``k0``, after ``every`` updates of
K = k0). Its time counts as training time. Outside training (``grad``, ``explain``) nothing has been
estimated and the method uses ``k0`` (default ``kmax``), with a warning.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

import numpy as np

from tbptt_bench.errors import UsageError
from tbptt_bench.core.lags import LagProfile, extrapolated_bias, lag_profile
from tbptt_bench.core.mask import Update
from tbptt_bench.methods.base import Method, Param, positive_int, register_method
from tbptt_bench.methods.schedules import family_param, per_update_windows, window_for
from tbptt_bench.models.protocol import cross_cut_parts

if TYPE_CHECKING:
    from torch import nn

    from tbptt_bench.core.engine import Source
    from tbptt_bench.models.protocol import State

log = logging.getLogger(__name__)


def smallest_k(profile: LagProfile, delta: float, kmin: int, kmax: int) -> tuple[int, float]:
    """The smallest K in ``[kmin, kmax]`` with ``extrapolated_bias(profile, K) ≤ delta`` (else kmax), and that estimate."""
    estimate = math.nan
    for k in range(kmin, kmax + 1):
        estimate = extrapolated_bias(profile, k)
        if estimate <= delta:
            return k, estimate
    return kmax, estimate


@register_method
class Adaptive(Method):
    family = "adaptive"
    summary = "K re-chosen every N updates: smallest K in [kmin, kmax] with estimated relative bias ≤ delta"
    schema = {
        "delta": Param(float, None, lambda v: v > 0 and math.isfinite(v), "a relative bias > 0, e.g. 0.1"),
        "kmin": positive_int(2, required=False),
        "kmax": positive_int(100, required=False),
        "every": positive_int(50, required=False),
        "k0": positive_int(required=False),
        "window": Param(int, 100, lambda v: v >= 2, "an integer ≥ 2", required=False),
        "family": family_param("overlap"),
    }
    constant_k = False

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        p = self.params
        if p["kmin"] > p["kmax"]:
            raise UsageError(f"method 'adaptive': kmin={p['kmin']} must be ≤ kmax={p['kmax']}")
        if p["k0"] is not None and not p["kmin"] <= p["k0"] <= p["kmax"]:
            raise UsageError(f"method 'adaptive': k0={p['k0']} must lie in [kmin, kmax] = [{p['kmin']}, {p['kmax']}]")
        self.k: int | None = p["k0"]
        self.last_estimate: int | None = None
        #: One entry per estimate: the update count, the chosen K, its extrapolated bias and the fitted decay rate.
        self.history: list[dict[str, float]] = []
        self._warned = False

    def due(self, update: int) -> bool:
        """Whether an estimate is due before global update ``update``."""
        every = self.params["every"]
        if self.last_estimate is None:
            return self.k is None or update >= every
        return update - self.last_estimate >= every

    def observe(self, update: int, model: nn.Module, source: Source, state: State, loss_kind: str) -> None:
        if not self.due(update):
            return
        if cross_cut_parts(model):
            raise UsageError(f"adaptive chooses K from the lag profile, which {type(model).__name__} has not: its state "
                             "crosses cuts (docs/design.md §7.1); use a fixed-K family such as chunked or tbptt")
        p = self.params
        n = min(p["window"], source.length)
        data = source.slice(0, n)
        profile = lag_profile(model, data, loss_kind, max(1, min(n - 1, p["kmax"])), state)
        self.k, estimate = smallest_k(profile, p["delta"], p["kmin"], p["kmax"])
        self.last_estimate = update
        self.history.append({"update": update, "k": self.k, "extrapolation": estimate, "rate": profile.rate})
        log.info("adaptive: update %d: K = %d (estimated relative bias %.3g, δ = %g, decay rate %.3f)",
                 update, self.k, estimate, p["delta"], profile.rate)

    def current_k(self) -> int:
        if self.k is not None:
            return self.k
        if not self._warned:
            log.warning("adaptive: no lag profile estimated (K is chosen during training); using K = %d",
                        self.params["kmax"])
            self._warned = True
        return self.params["kmax"]

    def k_used(self, update: int) -> int | None:
        return self.current_k()

    def updates(self, length: int, first_update: int = 0, rng: np.random.Generator | None = None) -> list[Update]:
        window = window_for(self.params["family"], self.current_k())
        return per_update_windows(length, first_update, lambda n: window)
