"""The plain truncation families: ``full``, ``tbptt:k1,k2``, ``chunked:k`` and ``sliding:k[,k1]``.

T = sequence or stream-segment length, positions 0-based (docs/design.md §2):

* ``full`` — one update over all T losses, every lag kept. ``checkpoint=C`` recomputes activations
  per chunk of C steps in the backward pass (same gradient, memory ~ T/C + C).
* ``tbptt:k1,k2`` — updates at u = k1, 2k1, …; losses in ``[u-k1, u)`` may reach steps ``s ≥ u-k2``.
  A trailing segment shorter than k1 is an update of its own ending at T (see ``segment_updates``).
  k2 > k1 overlaps windows (Williams & Peng's BPTT(h; h') with h = k2, h' = k1); k2 = k1 is chunked;
  k2 < k1 gives recurrent gradient only to the last k2 steps of each segment.
* ``chunked:k`` — ``tbptt:k1=k,k2=k`` ("detach every k").
* ``sliding:k[,k1]`` — every loss reaches exactly its last k steps (ĝ_K of Aicher et al. 2019);
  updates every k1 steps (default k).
"""

from __future__ import annotations

import numpy as np

from tbptt_bench.core.mask import Update
from tbptt_bench.methods.base import Method, positive_int, register_method


def segment_updates(
    length: int, k1: int, k2: int, first_update: int = 0, max_lag: int | None = None
) -> list[Update]:
    """Updates every k1 steps; the trailing remainder (if any) is an update of its own.

    The losses of segment ``[a, e)`` (``e = a + k1``, or T for a trailing segment) reach steps
    ``s ≥ a + k1 - k2`` when k2 ≥ k1 — the window of the nominal update, so a loss's lags never depend
    on T and ``chunked:k`` detaches at multiples of k — and ``s ≥ e - k2`` when k2 < k1 (the last k2
    steps of the segment receive recurrent gradient).
    """
    out = []
    for a in range(0, length, k1):
        e = min(a + k1, length)
        start = a + k1 - k2 if k2 >= k1 else e - k2
        out.append(Update(a, e, max(0, start), max_lag))
    return out


@register_method
class Full(Method):
    family = "full"
    summary = "full BPTT: one update per sequence, every lag kept (checkpoint=C: recompute per C steps)"
    schema = {"checkpoint": positive_int(required=False)}
    k_param = None
    rank = 0
    exact = True

    @property
    def series(self) -> str:
        """Full BPTT is one reference, with or without checkpointing (same gradient)."""
        return self.family

    @property
    def checkpoint(self) -> int | None:
        return self.params["checkpoint"]

    def updates(self, length: int, first_update: int = 0, rng: np.random.Generator | None = None) -> list[Update]:
        return [Update(0, length, 0)]


@register_method
class TBPTT(Method):
    family = "tbptt"
    summary = "TBPTT(k1, k2): update every k1 steps, each loss reaches back to u - k2 (Williams & Peng)"
    schema = {"k1": positive_int(), "k2": positive_int()}
    k_param = "k1"
    rank = 10

    @classmethod
    def at_k(cls, k: int) -> Method:
        """tbptt(K, 2K-1): chunks of K losses, each backpropagated over 2K-1 steps, so every loss keeps at
        least K lags (the updates Aicher, Foti & Fox 2019 train with)."""
        return cls(k1=k, k2=2 * k - 1)

    @property
    def series(self) -> str:
        """``tbptt(K,2K-1)``, ``tbptt(K,K)`` or ``tbptt(K,rK)``: how far back each update reaches, in K = k1."""
        k1, k2 = self.params["k1"], self.params["k2"]
        reach = "K" if k2 == k1 else ("2K-1" if k2 == 2 * k1 - 1 else f"{k2 / k1:g}K")
        return f"tbptt(K,{reach})"

    @property
    def label(self) -> str:
        return f"tbptt({self.params['k1']},{self.params['k2']})"

    def updates(self, length: int, first_update: int = 0, rng: np.random.Generator | None = None) -> list[Update]:
        return segment_updates(length, self.params["k1"], self.params["k2"])


@register_method
class Chunked(Method):
    family = "chunked"
    summary = "chunked TBPTT = tbptt:k1=k,k2=k (detach every k steps)"
    schema = {"k": positive_int()}
    k_param = "k"
    rank = 20

    def updates(self, length: int, first_update: int = 0, rng: np.random.Generator | None = None) -> list[Update]:
        return segment_updates(length, self.params["k"], self.params["k"])


@register_method
class Sliding(Method):
    family = "sliding"
    summary = "sliding(k): every loss reaches exactly its last k steps; updates every k1 (default k)"
    schema = {"k": positive_int(), "k1": positive_int(required=False)}
    k_param = "k"
    rank = 30

    @property
    def fixed_lags(self) -> int | None:
        return self.params["k"]

    def updates(self, length: int, first_update: int = 0, rng: np.random.Generator | None = None) -> list[Update]:
        k1 = self.params["k1"] or self.params["k"]
        return [Update(u.loss_start, u.loss_end, 0, self.params["k"]) for u in segment_updates(length, k1, k1)]
