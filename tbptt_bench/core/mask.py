"""The truncation mask: the one definition every gradient method in the project is built on.

A model's full gradient splits into contributions ``c(t, d)`` — the part of ∂ℓ_t/∂θ that flows through
the use of θ at step ``s = t - d`` (docs/design.md §2). A gradient method is a schedule of *updates*, and
each update is a set of losses plus a weight ``m(t, s)`` on each contribution those losses may send.

Positions here are 0-based: step ``t`` is ``0..T-1``, and "state at position p" is the state after
``p`` steps (position 0 is the initial state). An :class:`Update` says: losses ``t`` in
``[loss_start, loss_end)`` belong to it; loss ``t`` reaches step ``s`` iff ``window_start ≤ s ≤ t``
and (when ``max_lag`` is set) ``t - s < max_lag``; a contribution that crosses state position ``p``
(``s < p ≤ t``) is multiplied by the factor that ``scales`` gives ``p``. Parameters that act outside the
recurrence (the read-out) keep their direct term for every loss of every update.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class Update:
    """One optimiser update: which losses it sums and which contributions each loss keeps."""

    loss_start: int
    loss_end: int
    window_start: int
    max_lag: int | None = None
    scales: tuple[tuple[int, float], ...] = field(default=())

    def __post_init__(self) -> None:
        if not 0 <= self.window_start and 0 <= self.loss_start < self.loss_end:
            raise ValueError(f"invalid update {self}")
        if self.max_lag is not None and self.max_lag < 1:
            raise ValueError(f"max_lag must be ≥ 1, got {self.max_lag}")

    def start_for(self, t: int) -> int:
        """The earliest step that loss ``t`` reaches."""
        if self.max_lag is None:
            return self.window_start
        return max(self.window_start, t - self.max_lag + 1)

    def weight(self, t: int, s: int) -> float:
        """``m(t, s)`` for a loss of this update (0 outside the mask)."""
        if not (self.loss_start <= t < self.loss_end) or s > t or s < self.start_for(t):
            return 0.0
        w = 1.0
        for p, factor in self.scales:
            if s < p <= t:
                w *= factor
        return w


def mask_matrix(updates: Sequence[Update], length: int) -> np.ndarray:
    """``M[t, s]``: the weight with which loss ``t`` receives the contribution of step ``s``.

    Lower-triangular; full BPTT is all ones on and below the diagonal. Each loss must belong to exactly
    one update.
    """
    m = np.zeros((length, length))
    owner = np.full(length, -1)
    for i, u in enumerate(updates):
        for t in range(u.loss_start, min(u.loss_end, length)):
            if owner[t] >= 0:
                raise ValueError(f"loss {t} belongs to updates {owner[t]} and {i}")
            owner[t] = i
            for s in range(t + 1):
                m[t, s] = u.weight(t, s)
    if (owner < 0).any():
        raise ValueError(f"losses {np.flatnonzero(owner < 0).tolist()} belong to no update")
    return m


def update_owner(updates: Sequence[Update], length: int) -> np.ndarray:
    """For each loss position, the index of the update it belongs to."""
    owner = np.full(length, -1)
    for i, u in enumerate(updates):
        owner[u.loss_start : min(u.loss_end, length)] = i
    return owner


def _ranges(values: list[int]) -> str:
    """``[0,1,2,5]`` → ``"0-2,5"``."""
    if not values:
        return "-"
    out, start, prev = [], values[0], values[0]
    for v in values[1:] + [None]:  # type: ignore[list-item]
        if v is not None and v == prev + 1:
            prev = v
            continue
        out.append(f"{start}" if start == prev else f"{start}-{prev}")
        if v is not None:
            start = prev = v
    return ",".join(out)


def explain(updates: Sequence[Update], length: int) -> str:
    """A text table: for each loss (1-based step t), its update and the lags d it receives.

    Lags are ``d = t - s``; a weight other than 1 is shown after the lag range it applies to.
    """
    m = mask_matrix(updates, length)
    owner = update_owner(updates, length)
    lines = [f"{'t':>5}  {'update':>6}  {'ends at':>7}  lags d received (s = t - d)"]
    for t in range(length):
        u = updates[owner[t]]
        lags = [t - s for s in range(t, -1, -1) if m[t, s] != 0]
        weights = sorted({round(m[t, t - d], 6) for d in lags})
        text = _ranges(lags)
        if weights and weights != [1.0]:
            text += "  (weights " + ", ".join(f"d={d}:{m[t, t - d]:g}" for d in lags if m[t, t - d] != 1.0) + ")"
        if not lags:
            text += "  (read-out term only)"
        lines.append(f"{t + 1:>5}  {owner[t] + 1:>6}  {u.loss_end:>7}  {text}")
    return "\n".join(lines)


def render_mask(updates: Sequence[Update], length: int) -> str:
    """The mask as a character picture: row t, column s; '#' kept, '.' dropped, '~' reweighted."""
    m = mask_matrix(updates, length)
    rows = []
    for t in range(length):
        row = "".join("#" if m[t, s] == 1 else ("~" if m[t, s] != 0 else ".") for s in range(t + 1))
        rows.append(f"{t + 1:>5} {row}")
    return "\n".join(rows)


def update_steps(u: Update) -> tuple[int, int]:
    """Recurrent steps an update runs forward and backward in training (docs/design.md §3.7).

    The compute proxy for equal-compute comparisons. Forward counts every step the update runs, with or
    without a graph: for a shared window, from ``min(window_start, loss_start)`` to ``loss_end`` (a
    window reaching before the update's losses, k2 > k1, is recomputed from its stored boundary state;
    steps before a late window, k2 < k1, run without a graph). Backward counts the steps the gradient
    passes through: the window, ``loss_end - window_start``. Per-loss windows (``max_lag``) run the
    losses that share the update's window as one window and every other loss as its own stacked window
    of ``max_lag`` steps, on top of advancing the state over the update's losses once.
    """
    a, b, w = u.loss_start, u.loss_end, u.window_start
    if u.max_lag is None:
        return b - min(w, a), max(0, b - w)
    shared_end = min(b, w + u.max_lag)
    forward = backward = 0
    if a < shared_end:
        forward, backward = shared_end - min(w, a), shared_end - w
    stacked = b - max(a, shared_end)
    if stacked > 0:
        forward += stacked * (u.max_lag + 1)
        backward += stacked * u.max_lag
    return forward, backward


def step_counts(updates: Sequence[Update]) -> tuple[int, int]:
    """Total recurrent steps forwarded and backpropagated over ``updates`` (see :func:`update_steps`)."""
    steps = [update_steps(u) for u in updates]
    return sum(f for f, _ in steps), sum(b for _, b in steps)
