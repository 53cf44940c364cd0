"""Periodic hybrid truncation: tbptt(k1, k2) updates, with every n-th update reaching much further back.

Spec ``hybrid:k1=16,k2=16,every=10,long=256`` (``k2`` defaults to ``k1``). Updates come every k1 steps
exactly as for ``tbptt:k1,k2``; update number n (1-based, counted over the whole run through
``first_update``, so the period runs on across sequences and stream segments) is a *long* update when
n is a multiple of ``every``. A long update keeps the same losses but its window is that of
``tbptt(k1, long)``: its losses reach steps ``s ≥ u - long + 1`` (u = the update's end). ``long=0`` (the
default) reaches back to the start of the current sequence — for streaming tasks the start of the stream
segment, since gradient never crosses a segment boundary in training.

Mask: ``m(t, s) = 1`` iff ``s ≥ u - k2 + 1`` for a short update, ``s ≥ u - long + 1`` (or ``s ≥ 1``) for
a long one. ``every=1`` is ``tbptt:k1,k2=long``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tbptt_bench.errors import UsageError
from tbptt_bench.core.mask import Update
from tbptt_bench.methods.base import Method, Param, positive_int, register_method
from tbptt_bench.methods.schedules import Window, per_update_windows


@register_method
class Hybrid(Method):
    family = "hybrid"
    summary = "tbptt(k1, k2) with every n-th update reaching back `long` steps (long=0: to the sequence start)"
    schema = {
        "k1": positive_int(),
        "k2": positive_int(required=False),
        "every": positive_int(),
        "long": Param(int, 0, lambda v: v >= 0, "an integer ≥ 0 (0: back to the sequence start)", required=False),
    }
    k_param = "k1"
    rank = 40
    constant_k = False

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        if self.params["k2"] is None:
            self.params["k2"] = self.params["k1"]
        long, k2 = self.params["long"], self.params["k2"]
        if long and long < k2:
            raise UsageError(f"method 'hybrid': long={long} must be ≥ k2={k2} (or 0 for the whole sequence so far)")

    def is_long(self, update: int) -> bool:
        """Whether 0-based global update ``update`` is a long one (the every-th, 2·every-th, ...)."""
        return (update + 1) % self.params["every"] == 0

    def window(self, update: int) -> Window:
        p = self.params
        if self.is_long(update):
            return Window(p["k1"], p["long"] or None)
        return Window(p["k1"], p["k2"])

    def k_used(self, update: int) -> int | None:
        """The reach k2 of a short update, ``long`` of a long one (None when it reaches the start)."""
        return self.window(update).k2

    def updates(self, length: int, first_update: int = 0, rng: np.random.Generator | None = None) -> list[Update]:
        return per_update_windows(length, first_update, self.window)
