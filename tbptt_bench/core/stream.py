"""A stream fed in pieces, run as one sequence: which updates are settled, and the data they still need.

A data loader yields consecutive pieces of B parallel streams. Fed whole, a stream of N steps is one
sequence with the method's updates ``U(N)`` (docs/design.md §2.4, §2.6). Fed in pieces, the same updates
must come out, in the same order, each as soon as the data for it has arrived (docs/design.md §2.8):

* an update is *settled* at length ``n`` when it is in both ``U(n)`` and ``U(n + 1)``: the steps to come
  can no longer change it (a tbptt segment is settled once its k1-th loss has arrived; a partial segment
  at the end of a piece is not, and waits for the next piece). :meth:`UpdatePlan.close` settles the rest
  at an explicit end of stream, with the trailing-segment rule of §2.6;
* the *horizon* is the earliest position that an unsettled update reaches (window start, or the first
  state a per-loss window starts from); the engine keeps the state there and the buffer the data from
  there on, so memory is bounded by the window, not by the stream;
* the plan is recomputed from a *restart* position ``r``: the loss start of an update at or before the
  horizon from which ``U`` over the rest of the stream, started afresh with the update count and the
  random generator as they stand at ``r``, gives the same unsettled updates. The restart moves forward only when
  that holds on a lookahead as long again as the stretch being planned, so the planning work per piece
  is bounded by the window as well. The lookahead is also at least twice the longest reach settled so
  far, so that the states later updates start from are stored as the forward passes them, as in the
  whole stream. A K schedule whose reach jumps beyond that between two updates would see some of its
  window states recomputed at a later θ in training (at frozen θ the updates are the same anyway).

One thing the pieces cannot know is where the stream will end: a trailing tbptt(k1 > k2) update
(§2.6) reaches back from the end, so in training its window's first state may be recomputed with the
current θ where the whole stream had stored it earlier.

Random methods (ARTBP) draw their cuts position by position from one generator; the plan keeps the
generator's state at the restart, so the draws are those of the whole stream.
"""

from __future__ import annotations

import copy
from typing import Protocol

import numpy as np
import torch

from tbptt_bench.core.mask import Update
from tbptt_bench.tasks.base import Batch

#: A position later than any stream.
NEVER = 10**18


class Schedule(Protocol):
    """What the plan needs of a method: its updates over a sequence of some length."""

    def updates(self, length: int, first_update: int = 0, rng: np.random.Generator | None = None) -> list[Update]: ...


def shifted(u: Update, offset: int) -> Update:
    """``u`` with every position moved by ``offset``."""
    if offset == 0:
        return u
    scales = tuple((p + offset, f) for p, f in u.scales)
    return Update(u.loss_start + offset, u.loss_end + offset, u.window_start + offset, u.max_lag, scales)


def earliest_needed(u: Update) -> int:
    """The first position whose state or data the update reads."""
    first = min(u.window_start, u.loss_start)
    if u.max_lag is not None:
        first = min(first, max(u.window_start, u.loss_start - u.max_lag + 1))
    return first


class StreamBuffer:
    """The pieces of a stream received so far, from the first position still needed; a :class:`Source`
    in stream positions."""

    def __init__(self, batch_size: int) -> None:
        self._batch_size = batch_size
        self.pieces: list[tuple[int, Batch]] = []
        self.end = 0

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def length(self) -> int:
        return self.end

    def append(self, piece: Batch) -> None:
        """Add the next ``piece`` (``[B, T, ...]``) at the end of the stream."""
        if piece.length:
            self.pieces.append((self.end, piece))
            self.end += piece.length

    def drop_before(self, p: int) -> None:
        """Forget the pieces that end at or before position ``p``."""
        self.pieces = [(a, piece) for a, piece in self.pieces if a + piece.length > p]

    def held(self) -> int:
        """Steps held in memory (per stream row)."""
        return sum(piece.length for _, piece in self.pieces)

    def slice(self, a: int, b: int) -> Batch:
        """Steps ``[a, b)`` of the stream (they must still be held)."""
        parts = [piece.slice(max(a, s) - s, min(b, s + piece.length) - s)
                 for s, piece in self.pieces if s < b and s + piece.length > a]
        if not parts or self.pieces[0][0] > a or b > self.end:
            raise IndexError(f"steps {a}..{b} of the stream are not held (held: {self.pieces[0][0] if self.pieces else self.end}..{self.end})")
        if len(parts) == 1:
            return parts[0]
        return Batch(*(torch.cat([getattr(p, f) for p in parts], dim=1) for f in ("inputs", "targets", "weights")))


class UpdatePlan:
    """The updates of ``method`` over a stream whose length grows; see the module doc."""

    def __init__(self, method: Schedule, first_update: int, rng: np.random.Generator) -> None:
        self.method = method
        self.restart = 0
        self.count_at_restart = first_update
        self.rng_at_restart = copy.deepcopy(rng)
        self.settled_end = 0
        self.reach = 1
        #: The generator after drawing the whole stream's updates (set by :meth:`close`).
        self.rng_after: np.random.Generator | None = None

    def settle(self, n: int) -> list[Update]:
        """The updates newly settled once the stream has ``n`` steps (stream positions)."""
        now, longer = self._updates(n), self._updates(n + 1)
        out = []
        for u, v in zip(now, longer):
            if u != v:
                break
            if u.loss_start >= self.settled_end:
                out.append(u)
        self._mark(out)
        return out

    def close(self, n: int) -> list[Update]:
        """The updates not yet settled when the stream ends at ``n`` steps."""
        rng = self._rng()
        out = [u for u in self._updates(n, rng) if u.loss_start >= self.settled_end]
        self.rng_after = rng
        self._mark(out)
        return out

    def ahead(self, n: int) -> list[Update]:
        """Updates not yet settled at ``n`` steps that the lookahead already fixes (their positions are final)."""
        m = self._lookahead(n)
        out = []
        for u, v in zip(self._updates(m), self._updates(m + 1)):
            if u != v:
                break
            if u.loss_start >= self.settled_end:
                out.append(u)
        return out

    def horizon(self, n: int) -> int:
        """The earliest position an update not yet settled may read (NEVER when none can come)."""
        pending = [earliest_needed(u) for m in (n, self._lookahead(n)) for u in self._unsettled(self._updates(m))]
        return min(pending, default=NEVER)

    def advance(self, n: int) -> None:
        """Move the restart forward to the latest settled update start from which planning anew gives
        the same updates over the lookahead and, were the stream to end now, the same closing updates."""
        horizon = self.horizon(n)
        ahead = self._updates(self._lookahead(n))
        starts = [u.loss_start for u in ahead if self.restart < u.loss_start <= min(horizon, self.settled_end)]
        closing = self._updates(n)
        for r in reversed(starts):
            count = self.count_at_restart + sum(u.loss_start < r for u in ahead)
            rng = self._rng()
            self.method.updates(r - self.restart + 1, first_update=self.count_at_restart, rng=rng)

            def anew(m: int, r: int = r, count: int = count, rng: np.random.Generator = rng) -> list[Update]:
                return [shifted(u, r) for u in self.method.updates(m - r, first_update=count, rng=copy.deepcopy(rng))]

            if (self._unsettled(anew(self._lookahead(n))) == self._unsettled(ahead)
                    and self._unsettled(anew(n)) == self._unsettled(closing)):
                self.restart, self.count_at_restart, self.rng_at_restart = r, count, rng
                return

    # -- helpers -----------------------------------------------------------------------------------
    def _lookahead(self, n: int) -> int:
        """How far ahead to plan: as long again as the stretch from the restart, and at least twice the
        longest reach (last loss to first position needed) of any update settled so far."""
        return n + 1 + max(n - self.restart, 2 * self.reach)

    def _rng(self) -> np.random.Generator:
        return copy.deepcopy(self.rng_at_restart)

    def _updates(self, n: int, rng: np.random.Generator | None = None) -> list[Update]:
        """``U(n)`` from the restart on, in stream positions."""
        if n <= self.restart:
            return []
        relative = self.method.updates(n - self.restart, first_update=self.count_at_restart,
                                       rng=self._rng() if rng is None else rng)
        return [shifted(u, self.restart) for u in relative]

    def _unsettled(self, updates: list[Update]) -> list[Update]:
        return [u for u in updates if u.loss_end > self.settled_end]

    def _mark(self, settled: list[Update]) -> None:
        self.reach = max([self.reach, *(u.loss_end - earliest_needed(u) for u in settled)])
        if settled:
            self.settled_end = settled[-1].loss_end
