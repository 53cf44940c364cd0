"""Define a gradient method without touching the engine: from a function that returns updates, or a mask.

Two decorators register a new method family (usable in every spec, in ``train``, ``grad``, ``explain``
and suites). Put them in a plugin file (a ``*.py`` in a folder passed with ``--plugins DIR`` or
``TBPTT_BENCH_PLUGINS``) and the family is available without editing the package.

``define_method`` — the function returns the :class:`~tbptt_bench.core.mask.Update` list over a sequence;
``first_update`` (the number of updates made before this sequence) makes any schedule over training
possible, e.g. with :func:`per_update_windows`::

    @define_method("doubling", summary="chunked K, doubled every 100 updates", params={"k": positive_int()})
    def doubling(length, first_update, rng, k):
        return per_update_windows(length, first_update, lambda n: Window(k << (n // 100), k << (n // 100)))

``define_mask_method`` — the function is the mask ``m(t, s)`` (0-based loss t, step s ≤ t: 1 keeps the
contribution, 0 drops it, another value weights it), with an update every ``every`` steps::

    @define_mask_method("decay", summary="lag d weighted by rho**d", params={"rho": real(0, 1)}, every=8)
    def decay(t, s, rho):
        return rho ** (t - s)

The mask is turned into updates by :func:`updates_from_mask`, which accepts exactly the masks the engine
can run (per update: a window start, an optional lag limit, and per-position factors) and verifies the
result entry by entry; anything else is a UsageError that says which loss breaks which rule.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from tbptt_bench.errors import UsageError
from tbptt_bench.core.mask import Update
from tbptt_bench.methods.base import AUTO, METHODS, Method, Param, positive_int
from tbptt_bench.methods.schedules import Window, per_update_windows

__all__ = [
    "Param", "Update", "Window", "choice", "define_mask_method", "define_method", "per_update_windows",
    "positive_int", "probability", "real", "updates_from_mask",
]

UpdatesFn = Callable[..., Sequence[Update]]
MaskFn = Callable[..., float]


def real(low: float | None = None, high: float | None = None, default: float | None = None) -> Param:
    """A float parameter in the open interval (low, high) (either end may be None)."""
    lo = -np.inf if low is None else low
    hi = np.inf if high is None else high
    return Param(float, default, lambda v: lo < v < hi, f"a number in ({lo:g}, {hi:g})", default is None)


def probability(default: float | None = None) -> Param:
    """A probability in (0, 1]."""
    return Param(float, default, lambda v: 0.0 < v <= 1.0, "a probability in (0, 1]", default is None)


def choice(*values: str, default: str | None = None) -> Param:
    """A string parameter from a fixed set."""
    return Param(str, default, lambda v: v in values, "one of " + ", ".join(values), default is None)


def _register(family: str, summary: str, params: dict[str, Param] | None, body: dict[str, Any],
              replace: bool, k_param: str | None) -> type[Method]:
    if k_param not in (AUTO, None) and k_param not in (params or {}):
        raise UsageError(f"method family {family!r}: k_param={k_param!r} is not one of its parameters")
    cls = type(f"Custom_{family}", (Method,), {"family": family, "summary": summary,
                                                "schema": dict(params or {}), "k_param": k_param, **body})
    METHODS.register(family, cls, replace=replace)  # type: ignore[arg-type]
    return cls  # type: ignore[return-value]


def check_partition(family: str, updates: Sequence[Update], length: int) -> list[Update]:
    """The updates' losses must be consecutive ranges covering ``[0, length)``; UsageError otherwise."""
    out = list(updates)
    pos = 0
    for i, u in enumerate(out):
        if not isinstance(u, Update):
            raise UsageError(f"method {family!r}: update {i} is a {type(u).__name__}, expected tbptt_bench.core.mask.Update")
        if u.loss_start != pos or u.loss_end > length:
            raise UsageError(f"method {family!r}: update {i} covers losses [{u.loss_start}, {u.loss_end}); "
                             f"expected consecutive ranges from {pos} covering [0, {length})")
        pos = u.loss_end
    if pos != length:
        raise UsageError(f"method {family!r}: its updates cover losses [0, {pos}), expected [0, {length})")
    return out


def define_method(
    family: str,
    *,
    summary: str,
    params: dict[str, Param] | None = None,
    k_used: Callable[..., int | None] | None = None,
    k_param: str | None = AUTO,
    replace: bool = False,
) -> Callable[[UpdatesFn], type[Method]]:
    """Decorator: register ``fn(length, first_update, rng, **params) -> [Update, ...]`` as ``family``.

    ``k_used(update, **params)``, if given, reports the truncation length at a global update (logged by
    training). ``k_param`` names the parameter that is the truncation length K (:attr:`Method.k_param`;
    default ``k``, else ``k1``), which puts the family on K grids and K axes. The returned updates are
    checked to cover every loss exactly once, in order.
    """

    def wrap(fn: UpdatesFn) -> type[Method]:
        def updates(self: Method, length: int, first_update: int = 0,
                    rng: np.random.Generator | None = None) -> list[Update]:
            return check_partition(family, fn(length, first_update, rng, **self.params), length)

        body: dict[str, Any] = {"updates": updates, "__doc__": fn.__doc__}
        if k_used is not None:
            body["k_used"] = lambda self, update: k_used(update, **self.params)
        return _register(family, summary, params, body, replace, k_param)

    return wrap


def define_mask_method(
    family: str,
    *,
    summary: str,
    params: dict[str, Param] | None = None,
    every: int | str | None = None,
    k_param: str | None = AUTO,
    replace: bool = False,
) -> Callable[[MaskFn], type[Method]]:
    """Decorator: register a mask ``m(t, s, **params)`` (0-based, s ≤ t) as ``family``.

    Updates come every ``every`` steps (an int, or the name of an integer parameter); None gives one
    update per sequence. The mask is evaluated for each sequence length once and cached. ``k_param``:
    as for :func:`define_method`.
    """
    if every is not None and not isinstance(every, int) and every not in (params or {}):
        raise UsageError(f"define_mask_method({family!r}): every={every!r} is neither an int nor a parameter name")

    def wrap(fn: MaskFn) -> type[Method]:
        def updates(self: Method, length: int, first_update: int = 0,
                    rng: np.random.Generator | None = None) -> list[Update]:
            cache = self.__dict__.setdefault("_mask_updates", {})
            if length not in cache:
                period = self.params[every] if isinstance(every, str) else every
                ends = list(range(period, length, period)) + [length] if period else [length]
                matrix = np.array([[fn(t, s, **self.params) if s <= t else 0.0 for s in range(length)]
                                   for t in range(length)], dtype=np.float64)
                try:
                    cache[length] = updates_from_mask(matrix, ends)
                except UsageError as exc:
                    raise UsageError(f"method {family!r}: {exc}") from None
            return list(cache[length])

        return _register(family, summary, params, {"updates": updates, "__doc__": fn.__doc__}, replace, k_param)

    return wrap


def updates_from_mask(matrix: np.ndarray, ends: Sequence[int], rtol: float = 1e-12) -> list[Update]:
    """Updates that realise mask ``matrix[t, s]`` with update boundaries ``ends``, verified exactly.

    Within one update, the engine can run: losses that receive no recurrent contribution coming first
    (read-out only), every other loss t receiving a contiguous range of steps ending at t with
    ``m(t, t) = 1``, the range starting at a shared window start or at ``t - L + 1`` for one lag limit L,
    and weights that are products of per-position factors (a contribution crossing position p gets the
    factor of p). A UsageError names the first loss that breaks this.
    """
    m = np.asarray(matrix, dtype=np.float64)
    length = m.shape[0]
    if m.shape != (length, length) or np.any(np.triu(m, 1) != 0):
        raise UsageError(f"a mask must be a lower-triangular T×T matrix, got shape {m.shape} or entries above "
                         "the diagonal")
    bounds = list(ends)
    if not bounds or bounds[-1] != length or any(b <= a for a, b in zip([0] + bounds, bounds)):
        raise UsageError(f"update ends must increase strictly from above 0 to T={length}, got {bounds}")
    out = []
    for a, e in zip([0] + bounds[:-1], bounds):
        u = _fit_update(m, a, e)
        rows = np.array([[u.weight(t, s) for s in range(length)] for t in range(a, e)])
        if not np.allclose(rows, m[a:e], rtol=rtol, atol=0.0):
            bad = a + int(np.flatnonzero(~np.isclose(rows, m[a:e], rtol=rtol, atol=0.0).all(axis=1))[0])
            raise UsageError(f"loss {bad}: its weights are not a product of per-position factors shared by "
                             f"the losses of its update [{a}, {e})")
        out.append(u)
    return out


def _fit_update(m: np.ndarray, a: int, e: int) -> Update:
    """The one candidate Update for losses ``[a, e)``; :func:`updates_from_mask` verifies it."""
    starts: dict[int, int] = {}
    empty: list[int] = []
    for t in range(a, e):
        kept = np.flatnonzero(m[t, : t + 1])
        if kept.size == 0:
            empty.append(t)
            continue
        lo = int(kept[0])
        if kept[-1] != t or kept.size != t - lo + 1:
            raise UsageError(f"loss {t}: the steps it receives must form one range ending at step {t}")
        if m[t, t] != 1.0:
            raise UsageError(f"loss {t}: the weight of its own step (lag 0) must be 1, got {m[t, t]:g}")
        starts[t] = lo
    window = min(starts.values(), default=e)
    if empty and max(empty) >= window:
        raise UsageError(f"loss {max(empty)}: a loss without recurrent gradient must come before step {window}, "
                         "where its update's window starts")
    lags = {t - lo + 1 for t, lo in starts.items() if lo > window}
    if len(lags) > 1:
        raise UsageError(f"losses of update [{a}, {e}) use several lag limits {sorted(lags)}; at most one is possible")
    max_lag = lags.pop() if lags else None
    factors = []
    for p in range(window + 1, e):
        rows = [t for t, lo in starts.items() if t >= p and lo <= p - 1]
        if rows:
            t = rows[0]
            factor = float(m[t, p - 1] / m[t, p])
            if factor != 1.0:
                factors.append((p, factor))
    if factors and max_lag is not None:
        raise UsageError(f"update [{a}, {e}): weights together with a lag limit are not supported by the engine")
    return Update(a, e, window, max_lag, tuple(factors))
