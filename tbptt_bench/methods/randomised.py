"""Randomised unbiased truncation (ARTBP, Tallec & Ollivier 2017) as a random mask with compensation.

Spec ``artbp:c=0.1,min=8``. Over a sequence of T steps, the state positions ``p = 1..T-1`` are visited
in order; ``last`` is the most recent truncation point (0 at the start). A position with
``p - last ≥ min`` is a truncation point with probability ``c``; otherwise gradient flows through it
and is multiplied there by the compensation factor ``1/(1 - c)``. Positions closer than ``min`` to the
last truncation are never truncation points and carry factor 1. Each stretch ``[a, e)`` between
consecutive truncation points is one update: its losses reach back to step a, and a contribution
``c(t, s)`` of a loss of that update is weighted by the product of the factors of the positions it
crosses (``s < p ≤ t``), i.e. ``Update(a, e, a, scales=((p, 1/(1-c)) for p in a+min .. e-1))``.

Unbiasedness (derived in docs/adaptive.md): write ``X_p = 1[no cut at p] / (1 - c_p)`` with ``c_p`` the
cut probability at p given the decisions before p (c or 0). The weight of ``c(t, s)`` is
``Π_{s<p≤t} X_p`` and ``E[X_p | decisions before p] = 1``, so by the tower rule
``E[Π X_p] = 1``: the expected estimate is the full gradient of the sequence.

``c`` must lie in (0, 1): c = 1 cuts at every eligible position, where no factor can compensate
(the expectation of a crossing contribution would be 0). ``min`` = 1 (the default) makes every
position eligible. Draws come from the ``rng`` the training loop passes (seeded from the run's seed);
without one, from the method's own generator seeded with 0, so ``grad`` is reproducible and a bias
analysis over N batches gets N independent draws.

The expectation over the draws is exact and draw-free (:func:`expected_mask`): ``M(t, s)`` is non-zero
only when no cut falls in ``(s, t]``, and then it is the weight of the update that starts at the last
cut ``a ≤ s``; so ``E M(t, s) = Σ_a P(cut at a) (1 - c)^(eligible positions in (a, t]) w_a(t, s)``, with
``w_a`` read from :func:`artbp_updates` itself. A change to the compensation therefore moves the
expectation, a change to how the draws are made does not.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from tbptt_bench.core.mask import Update
from tbptt_bench.methods.base import Method, Param, positive_int, register_method

#: Seed of a method's own generator, used when no generator is passed (analysis outside training).
DEFAULT_SEED = 0


def truncation_probability() -> Param:
    rule = "a truncation probability in (0, 1) (c = 1 would cut at every step, leaving nothing to compensate)"
    return Param(float, None, lambda v: 0.0 < v < 1.0, rule)


def sample_cuts(length: int, c: float, min_len: int, rng: np.random.Generator) -> list[int]:
    """Random truncation points in ``1..length-1`` under the hazard described in the module doc."""
    cuts: list[int] = []
    last = 0
    for p in range(1, length):
        if p - last >= min_len and rng.random() < c:
            cuts.append(p)
            last = p
    return cuts


def cuts_probability(length: int, cuts: Sequence[int], c: float, min_len: int) -> float:
    """The probability that :func:`sample_cuts` returns exactly ``cuts``."""
    chosen = set(cuts)
    prob, last = 1.0, 0
    for p in range(1, length):
        eligible = p - last >= min_len
        if p in chosen:
            if not eligible:
                return 0.0
            prob *= c
            last = p
        elif eligible:
            prob *= 1.0 - c
    return prob


def cut_marginals(length: int, c: float, min_len: int) -> np.ndarray:
    """``q[a]``: the probability that :func:`sample_cuts` cuts at position ``a`` (``q[0] = 1``: the start).

    A cut at ``a`` follows a cut at ``b ≤ a - min`` with no cut at the ``a - b - min`` eligible positions
    between them: ``q[a] = c Σ_b q[b] (1 - c)^(a - b - min)``.
    """
    q = np.zeros(length)
    q[0] = 1.0
    for a in range(min_len, length):
        b = np.arange(0, a - min_len + 1)
        q[a] = c * float(q[b] @ (1.0 - c) ** (a - b - min_len))
    return q


def expected_mask(length: int, c: float, min_len: int) -> np.ndarray:
    """``E M[t, s]`` over every draw of :func:`sample_cuts`, exactly (no sampling; see the module doc)."""
    q = cut_marginals(length, c, min_len)
    t = np.arange(length)
    out = np.zeros((length, length))
    for a in np.flatnonzero(q > 0):
        update = artbp_updates(length, [a] if a > 0 else [], c, min_len)[-1]
        factor = np.ones(length)
        for p, f in update.scales:
            factor[p] *= f
        survive = q[a] * (1.0 - c) ** np.maximum(0, t - a - min_len + 1)  # no cut in (a, t]
        for s in range(update.window_start, length):
            weight = np.cumprod(np.concatenate([[1.0], factor[s + 1:]]))  # w_a(t, s) for t = s..T-1
            out[s:, s] += survive[s:] * weight
    return out


def artbp_updates(length: int, cuts: Sequence[int], c: float, min_len: int) -> list[Update]:
    """One update per stretch between truncation points, with the compensation factors as scales."""
    bounds = [0, *sorted(cuts), length]
    factor = 1.0 / (1.0 - c)
    out = []
    for a, e in zip(bounds[:-1], bounds[1:]):
        scales = tuple((p, factor) for p in range(a + min_len, e))
        out.append(Update(a, e, a, None, scales))
    return out


@register_method
class ARTBP(Method):
    family = "artbp"
    summary = "randomised truncation with compensation 1/(1-c) where not cut: unbiased (Tallec & Ollivier 2017)"
    schema = {"c": truncation_probability(), "min": positive_int(1, required=False)}
    k_param = None
    deterministic = False

    def updates(self, length: int, first_update: int = 0, rng: np.random.Generator | None = None) -> list[Update]:
        if rng is None:  # the method's own stream: reproducible, and a new draw for every sequence
            rng = self.__dict__.setdefault("_rng", np.random.default_rng(DEFAULT_SEED))
        c, min_len = self.params["c"], self.params["min"]
        return artbp_updates(length, sample_cuts(length, c, min_len, rng), c, min_len)

    def expected_mask(self, length: int) -> np.ndarray:
        return expected_mask(length, self.params["c"], self.params["min"])
