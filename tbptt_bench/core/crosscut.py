"""Any update list for a model whose declared state parts stay differentiable across a cut (docs/design.md §7.1).

The engine's own path for such models handles consecutive chunks only. This module runs every other
update shape exactly (overlapping windows, per-loss windows, windows before the losses, scales):

* the **cut set** ``C`` is every window start ``w(t) = Update.start_for(t)`` of every loss whose window
  is not empty, position 0 excluded;
* a **trajectory** is forwarded once, with gradient, from the run's initial state: at each position
  ``p`` the scale of the update whose losses straddle ``p`` (``loss_start < p < loss_end``) is applied
  to the whole state, and at each ``p ∈ C`` every undeclared part is detached. The trajectory's
  declared parts therefore carry exactly the paths that cross earlier cuts through them;
* loss ``t`` of update ``u`` is computed by a window forward from the trajectory's state at ``w(t)``
  to ``t``, applying ``u``'s scales at the positions inside ``(w(t), t]`` and no cut there. Losses
  whose window is empty (``w(t) > t``, tbptt with k2 < k1) keep the read-out term only.

Hence loss ``t`` keeps every path inside its window (the contributions of §2.4 with their weights)
plus every path that crosses ``w(t)`` and the cuts of ``C`` before it through declared parts only.
Windows of the same length that hold one loss each (``sliding``) are stacked along the batch, as in
the engine. Windows whose start is the trajectory's frontier extend the trajectory as they go, so
chunked and ARTBP updates forward each step once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from tbptt_bench.core.mask import Update
from tbptt_bench.models.protocol import State, detach_state, map_state, truncate_state
from tbptt_bench.tasks.base import Batch

#: Maximum number of one-loss windows stacked into one call.
STACK_BLOCK = 512

Fetch = Callable[[int, int], Batch]
Core = Callable[[torch.Tensor, State], "tuple[torch.Tensor, State]"]
LossFn = Callable[[torch.Tensor, Batch, int, int], torch.Tensor]


def is_chunk_shaped(updates: Sequence[Update]) -> bool:
    """Whether every update is a window starting at its first loss with no lag limit and no scales."""
    return all(u.window_start == u.loss_start and u.max_lag is None and not u.scales for u in updates)


def scaled(state: State, factor: float) -> State:
    """Identity forward; the adjoint flowing back through ``state`` multiplied by ``factor``."""
    return map_state(lambda s: s if not s.requires_grad else s.detach() + factor * (s - s.detach()), state)


@dataclass(frozen=True)
class _Group:
    """Losses ``[la, lb)`` of one update that share the window start ``w`` (``w`` None: read-out only)."""

    w: int | None
    la: int
    lb: int


def _groups(u: Update) -> list[_Group]:
    out: list[_Group] = []
    for t in range(u.loss_start, u.loss_end):
        w = u.start_for(t)
        w_or_none = w if w <= t else None
        if out and out[-1].w == w_or_none and out[-1].lb == t:
            out[-1] = _Group(w_or_none, out[-1].la, t + 1)
        else:
            out.append(_Group(w_or_none, t, t + 1))
    return out


class CrossCutRun:
    """One pass of updates over a source for a model with declared cross-cut parts ``keep``.

    :meth:`plan` makes updates known (their window starts join the cut set before the trajectory
    passes them); :meth:`steps` runs them, and may be called again with later updates (a stream fed
    in pieces), ``horizon`` then bounding what later updates may read.
    """

    def __init__(self, state: State, keep: tuple[int, ...], fetch: Fetch, core: Core, loss: LossFn) -> None:
        self.keep = keep
        self.fetch, self.core, self.loss = fetch, core, loss
        self.cuts: set[int] = set()
        self.owner_scale: dict[int, float] = {}
        self.traj: dict[int, State] = {0: detach_state(state)}
        self.done = 0

    def plan(self, updates: Sequence[Update]) -> None:
        """Make ``updates`` known: their window starts are cuts, their scales the trajectory's."""
        for u in updates:
            self.cuts.update(g.w for g in _groups(u) if g.w)
            self.owner_scale.update((p, f) for p, f in u.scales if u.loss_start < p < u.loss_end)

    def steps(self, updates: Sequence[Update], horizon: int | None = None
              ) -> Iterator[tuple[int, Update, torch.Tensor, State]]:
        """Yield ``(index, update, loss, state after the update)`` for ``updates`` (planned already)."""
        needed = [min(u.window_start, u.loss_start) for u in updates]
        for i, u in enumerate(updates):
            total, after = self._update(u, _groups(u))
            yield self.done, u, total, detach_state(after)
            self.done += 1
            later = min([*needed[i + 1 :], *(() if horizon is None else (horizon,))], default=u.loss_end)
            base = max((p for p in self.traj if p <= later), default=0)
            frontier = max(self.traj)
            self.traj = {p: s for p, s in self.traj.items() if p >= base or p == frontier}

    def final_state(self, end: int) -> State:
        """The trajectory's state at ``end`` (detached)."""
        return detach_state(self._trajectory(end))

    # -- the trajectory ----------------------------------------------------------------------------
    def _boundary(self, p: int, state: State) -> State:
        """The trajectory's state at position ``p``: the owner's scale applied, cut if ``p ∈ C``."""
        if p in self.owner_scale:
            state = scaled(state, self.owner_scale[p])
        return truncate_state(state, self.keep) if p in self.cuts else state

    def _trajectory(self, p: int) -> State:
        """The trajectory's state at ``p``, forwarding (with gradient) from the latest stored one before it."""
        if p in self.traj:
            return self.traj[p]
        q = max(k for k in self.traj if k <= p)
        state = self.traj[q]
        marks = sorted({x for x in self.cuts | set(self.owner_scale) if q < x < p} | {p})
        for x, y in zip([q, *marks[:-1]], marks):
            _, state = self.core(self.fetch(x, y).inputs, state)
            state = self._boundary(y, state)
            if y in self.cuts or y == p:
                self.traj[y] = state
        return state

    # -- one update --------------------------------------------------------------------------------
    def _update(self, u: Update, groups: list[_Group]) -> tuple[torch.Tensor, State]:
        """Σ ℓ_t over the update's losses (gradient: its ``G_j``) and the state at its end."""
        total: torch.Tensor | None = None
        after: State | None = None
        singles: dict[int, list[_Group]] = {}
        for g in groups:
            if g.w is not None and g.lb - g.la == 1 and not u.scales and g.w != max(self.traj):
                singles.setdefault(g.lb - g.w, []).append(g)
                after = None
                continue
            loss, after = self._readout_only(g) if g.w is None else self._window(u, g)
            total = loss if total is None else total + loss
        for length, gs in singles.items():
            for i in range(0, len(gs), STACK_BLOCK):
                loss = self._stacked(gs[i : i + STACK_BLOCK], length)
                total = loss if total is None else total + loss
        if after is None:
            after = self._trajectory(u.loss_end)
        assert total is not None
        return total, after

    def _readout_only(self, g: _Group) -> tuple[torch.Tensor, State]:
        """Losses with an empty window: features without gradient, the read-out's direct term only."""
        start = self._trajectory(g.la)
        data = self.fetch(g.la, g.lb)
        with torch.no_grad():
            features, state = self.core(data.inputs, start)
        return self.loss(features, data, 0, g.lb - g.la), state

    def _window(self, u: Update, g: _Group) -> tuple[torch.Tensor, State]:
        """Losses ``[la, lb)`` reaching back to ``w``; extends the trajectory while the two coincide."""
        assert g.w is not None
        scales = dict(u.scales)
        marks = sorted({x for x in self.cuts | set(self.owner_scale) | set(scales) if g.w < x < g.lb} | {g.lb})
        state = self._trajectory(g.w)
        same = g.w == max(self.traj)
        total: torch.Tensor | None = None
        for x, y in zip([g.w, *marks[:-1]], marks):
            if x != g.w:
                if same and x not in self.cuts and scales.get(x) == self.owner_scale.get(x):
                    state = self.traj[x]
                else:
                    same = False
                    state = scaled(state, scales[x]) if x in scales else state
            data = self.fetch(x, y)
            features, state = self.core(data.inputs, state)
            loss = self.loss(features, data, max(g.la, x) - x, max(min(g.lb, y) - x, 0))
            total = loss if total is None else total + loss
            if same and y > max(self.traj):
                self.traj[y] = self._boundary(y, state)
        assert total is not None
        return total, state

    def _stacked(self, gs: list[_Group], length: int) -> torch.Tensor:
        """One-loss windows of equal ``length``, stacked along the batch: one call, the last position scored."""
        states = [self._trajectory(g.w) for g in gs if g.w is not None]
        if isinstance(states[0], tuple):
            state: State = tuple(torch.cat([s[j] for s in states], dim=1) for j in range(len(states[0])))
        else:
            state = torch.cat(states, dim=1)  # type: ignore[arg-type]
        pieces = [self.fetch(g.lb - length, g.lb) for g in gs]
        data = Batch(*(torch.cat([getattr(p, f) for p in pieces], dim=0) for f in ("inputs", "targets", "weights")))
        features, _ = self.core(data.inputs, state)
        return self.loss(features, data, length - 1, length)
