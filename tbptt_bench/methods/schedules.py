"""Schedules of the truncation length K over training, and windows built from a K.

A *window family* turns one truncation length K into the window of one update (docs/design.md §2):

* ``chunked`` — tbptt(K, K): the losses of a K-step segment reach back to its start;
* ``overlap`` — tbptt(K, 2K-1): each loss receives at least K lags (Aicher, Foti & Fox 2019 train
  with these updates; their ĝ_K is the loss-wise version of this);
* ``sliding`` — sliding(K) with an update every K steps: every loss receives exactly K lags.

A *schedule* gives K for every global update count n (0-based, counted over the whole run by the
``first_update`` argument of :meth:`Method.updates`), so K changes exactly at the update the spec names,
even in the middle of a sequence or stream segment:

* ``stepped:k=4,then=8@100:16@300,family=chunked`` — K = 4 for updates 0..99, 8 for 100..299, 16 from
  300 (the grammar splits parameters at commas, so the steps are joined by colons);
* ``curriculum:start=4,end=64,over=1000,family=chunked`` — K moves linearly from ``start`` (update 0)
  to ``end`` (update ``over`` and after): ``K(n) = start + trunc((end - start)·min(n, over)/over)``.
"""

from __future__ import annotations

import re
from abc import abstractmethod
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from tbptt_bench.errors import UsageError
from tbptt_bench.core.mask import Update
from tbptt_bench.methods.base import Method, Param, positive_int, register_method


@dataclass(frozen=True)
class Window:
    """The window of one update: segment length k1, reach k2 (None: back to the sequence start), max_lag."""

    k1: int
    k2: int | None
    max_lag: int | None = None


def window_update(start: int, length: int, w: Window) -> Update:
    """The update whose losses are ``[start, min(start + k1, length))``, with tbptt's window rule.

    Same rule as :func:`tbptt_bench.methods.truncation.segment_updates` for one segment: the losses reach steps
    ``s ≥ start + k1 - k2`` when k2 ≥ k1 and ``s ≥ end - k2`` when k2 < k1 (never before 0).
    """
    end = min(start + w.k1, length)
    if w.k2 is None:
        first = 0
    elif w.k2 >= w.k1:
        first = start + w.k1 - w.k2
    else:
        first = end - w.k2
    return Update(start, end, max(0, first), w.max_lag)


def per_update_windows(length: int, first_update: int, window_of: Callable[[int], Window]) -> list[Update]:
    """Consecutive updates over ``length`` steps, update n (global count) using ``window_of(n)``."""
    out: list[Update] = []
    start, n = 0, first_update
    while start < length:
        u = window_update(start, length, window_of(n))
        out.append(u)
        start, n = u.loss_end, n + 1
    return out


#: Window families: truncation length K → window of one update.
WINDOW_FAMILIES: dict[str, Callable[[int], Window]] = {
    "chunked": lambda k: Window(k, k),
    "overlap": lambda k: Window(k, 2 * k - 1),
    "sliding": lambda k: Window(k, None, k),
}


def family_param(default: str = "chunked") -> Param:
    """The ``family=`` parameter: which window a truncation length K gives."""
    names = ", ".join(WINDOW_FAMILIES)
    return Param(str, default, lambda v: v in WINDOW_FAMILIES, f"one of {names}", required=False)


def window_for(family: str, k: int) -> Window:
    return WINDOW_FAMILIES[family](k)


_STEP = re.compile(r"^(\d+)@(\d+)$")


def parse_steps(k: int, then: str) -> list[tuple[int, int]]:
    """``k=4, then="8@100:16@300"`` → ``[(0, 4), (100, 8), (300, 16)]`` (from update, K)."""
    usage = "expected then=K1@N1:K2@N2... with K ≥ 1 and 0 < N1 < N2 < ..., e.g. then=8@100:16@300"
    steps = [(0, k)]
    for part in str(then).split(":") if then else []:
        match = _STEP.match(part.strip())
        if not match:
            raise UsageError(f"method 'stepped': piece {part!r} of then={then!r} is not K@N; {usage}")
        steps.append((int(match.group(2)), int(match.group(1))))
    ats = [n for n, _ in steps]
    if any(v < 1 for _, v in steps) or any(b <= a for a, b in zip(ats, ats[1:])):
        raise UsageError(f"method 'stepped': then={then!r} is invalid; {usage}")
    return steps


class ScheduledK(Method):
    """A method whose update n uses the window family's window for K(n)."""

    constant_k = False

    @abstractmethod
    def schedule(self, update: int) -> int:
        """K at 0-based global update ``update``."""

    def k_used(self, update: int) -> int | None:
        return self.schedule(update)

    def updates(self, length: int, first_update: int = 0, rng: np.random.Generator | None = None) -> list[Update]:
        family = self.params["family"]
        return per_update_windows(length, first_update, lambda n: window_for(family, self.schedule(n)))


@register_method
class Stepped(ScheduledK):
    family = "stepped"
    summary = "K piecewise constant: k=4,then=8@100:16@300 (K=8 after 100 updates, ...); family=chunked|overlap|sliding"
    schema = {
        "k": positive_int(),
        "then": Param(str, None, lambda v: True, "K1@N1:K2@N2..., e.g. 8@100:16@300", required=False),
        "family": family_param(),
    }

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.steps = parse_steps(self.params["k"], self.params["then"])

    def schedule(self, update: int) -> int:
        k = self.steps[0][1]
        for at, value in self.steps:
            if update >= at:
                k = value
        return k


@register_method
class Curriculum(ScheduledK):
    family = "curriculum"
    summary = "K linear in the update count, from `start` to `end` at update `over`; family=chunked|overlap|sliding"
    schema = {"start": positive_int(), "end": positive_int(), "over": positive_int(), "family": family_param()}

    def schedule(self, update: int) -> int:
        start, end, over = self.params["start"], self.params["end"], self.params["over"]
        moved = (end - start) * min(update, over)
        return start + (moved // over if moved >= 0 else -(-moved // over))
