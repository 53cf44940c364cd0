"""Truncated BPTT inside any training loop: a method's updates one at a time, for the caller's backward.

The caller keeps the optimiser, scheduler, clipping, mixed precision and the ``backward`` call; this
module supplies, update by update, a loss whose gradient is exactly the update's ``G_j`` under the
method's mask (docs/design.md §2.3, §7.4), and carries the recurrent state across updates and across
the batches of a stream (each batch is a segment in the sense of docs/design.md §2.8: its initial state
is the carried state, treated as a constant). The losses come from the project's one engine
(:meth:`tbptt_bench.core.engine.Engine.steps`), so every family — tbptt with k2 < k1, = k1 or > k1
(windows recomputed from stored boundary states with the current θ), trailing segments, sliding,
hybrid, ARTBP, scheduled and adaptive K — behaves exactly as in the benchmark.

Example::

    tbptt = TBPTT(model, "tbptt:k1=16,k2=32", loss="cross_entropy")
    for inputs, targets in loader:                 # consecutive pieces of B parallel streams
        for step in tbptt.steps((inputs, targets)):
            step.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence, Union

import numpy as np
import torch
from torch import nn

from tbptt_bench.core.engine import Engine
from tbptt_bench.core.mask import Update
from tbptt_bench.errors import UsageError
from tbptt_bench.methods.base import Method, parse_method
from tbptt_bench.models.protocol import State, check_protocol, check_state, detach_state, map_state
from tbptt_bench.seeding import method_rng
from tbptt_bench.tasks.base import Batch

log = logging.getLogger(__name__)

LOSS_KINDS = ("cross_entropy", "mse")

#: A batch: a :class:`Batch`, or ``(inputs, targets)`` / ``(inputs, targets, weights)``, batch first.
BatchLike = Union[Batch, Sequence[torch.Tensor]]


def as_batch(data: BatchLike) -> Batch:
    """A :class:`Batch` from ``(inputs, targets[, weights])`` (weights default to 1 on every step)."""
    if isinstance(data, Batch):
        return data
    if not isinstance(data, (tuple, list)) or len(data) not in (2, 3):
        raise UsageError(
            f"a batch must be a Batch or a tuple (inputs, targets[, weights]) of tensors, got {type(data).__name__}"
        )
    inputs, targets = data[0], data[1]
    if not all(isinstance(t, torch.Tensor) for t in data) or inputs.dim() < 2:
        raise UsageError("a batch's inputs, targets and weights must be tensors, inputs shaped [B, T, ...]")
    lead = tuple(inputs.shape[:2])
    weights = data[2] if len(data) == 3 else torch.ones(lead, device=inputs.device)
    if tuple(targets.shape[:2]) != lead or tuple(weights.shape) != lead:
        raise UsageError(
            f"inputs start with [B, T] = {list(lead)}, so targets must start with it and weights be exactly it; "
            f"got targets {list(targets.shape)} and weights {list(weights.shape)} (batch first, time second)"
        )
    return Batch(inputs, targets, weights)


@dataclass
class Step:
    """One update, ready for the caller's backward pass.

    ``loss``: ``Σ_t ℓ_t`` over the update's losses (docs/design.md §2.1); its gradient is the update's
    ``G_j``. ``index``: the update's 0-based count since the utility was made. ``batch_index``: the
    batch of the stream it belongs to. ``update``: its losses and window as positions in the batch
    (docs/design.md §2.4). ``state``: the detached state after its last loss.
    """

    loss: torch.Tensor
    index: int
    batch_index: int
    update: Update
    state: State
    batch: Batch

    @property
    def scored_steps(self) -> float:
        """Scored steps per batch row in this update, ``Σ_{b,t} w[b,t] / B`` (a host sync)."""
        w = self.batch.weights[:, self.update.loss_start : self.update.loss_end]
        return float(w.sum()) / self.batch.batch_size

    def loss_per_step(self) -> float:
        """The update's loss per scored step, for logging (a host sync)."""
        n = self.scored_steps
        return float(self.loss.detach()) / n if n > 0 else float("nan")


class TBPTT:
    """Runs a gradient method's updates over batches and streams, for any training loop.

    ``model`` follows the model protocol (``initial_state(B)``, ``forward(inputs, state)``, optional
    ``core``/``readout``; see :func:`wrap_rnn` for a plain ``nn.LSTM``/``nn.GRU``/``nn.RNN`` with a
    head). ``method`` is a spec such as ``"tbptt:k1=16,k2=32"`` or a :class:`Method`. ``loss`` is
    ``"cross_entropy"`` (class targets ``[B, T]``) or ``"mse"`` (targets ``[B, T, D]``).
    ``seed`` seeds the method's own draws (ARTBP) by the rule training uses. ``autocast``: a dtype
    (e.g. ``torch.bfloat16``) under which the forward passes run, on the model's device type; the
    forward happens when the next step is asked for, so wrapping the loop body in ``torch.autocast``
    does not reach it. The utility never steps, zeroes or schedules the caller's optimiser.
    """

    def __init__(
        self,
        model: nn.Module,
        method: str | Method,
        loss: str = "cross_entropy",
        *,
        seed: int = 0,
        autocast: torch.dtype | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        check_protocol(model)
        if loss not in LOSS_KINDS:
            raise UsageError(f"unknown loss {loss!r}; accepted: {', '.join(LOSS_KINDS)}")
        self.model = model
        self.method = parse_method(method)
        self.loss_kind = loss
        self.engine = Engine(model, loss, device=device, checkpoint=self.method.checkpoint)
        self.autocast = autocast
        self.rng = method_rng(seed)
        #: Updates yielded so far (the global update count that hybrid and scheduled K follow).
        self.updates_done = 0
        #: Batches finished so far.
        self.batches_done = 0
        self._state: State | None = None
        self._running = False

    @property
    def state(self) -> State | None:
        """The carried state (detached), or None before the first batch or after :meth:`reset`."""
        return self._state

    def reset(self, state: State | None = None) -> None:
        """Start the next batch from ``model.initial_state`` (or from ``state``): a new stream."""
        if state is not None:
            check_state(state)
            state = detach_state(state)
        self._state = state

    def steps(self, batch: BatchLike) -> Iterator[Step]:
        """The updates over one batch (one segment of the stream), each before its backward pass.

        Ask for the next step only after the previous one's backward (and optimiser step, if any). The
        state carried into the next batch is the state after the last update yielded, so breaking out
        early continues the stream from there.
        """
        data = as_batch(batch)
        if self._running:
            raise UsageError("the previous batch's steps are still running; finish or close them before the next batch")
        h0 = self._initial_state(data.batch_size)
        self.method.observe(self.updates_done, self.model, data, h0, self.loss_kind)
        updates = self.method.updates(data.length, first_update=self.updates_done, rng=self.rng)
        inner = self.engine.steps(data, updates, h0, fixed_params=False)
        self._running = True
        try:
            while True:
                with self._autocast_context():
                    try:
                        step = next(inner)
                    except StopIteration as stop:
                        self._state = self._carried(stop.value)
                        break
                self._state = self._carried(step.state)
                index = self.updates_done
                self.updates_done += 1
                yield Step(step.loss, index, self.batches_done, step.update, self._state, data)
            self.batches_done += 1
        finally:
            self._running = False
            inner.close()

    def stream(self, batches: Iterable[BatchLike]) -> Iterator[Step]:
        """:meth:`steps` over consecutive batches, the state carried from each to the next."""
        for batch in batches:
            yield from self.steps(batch)

    def _carried(self, state: State) -> State:
        """The state to carry, detached and (after a lower-precision forward) in the model's dtype."""
        state = detach_state(state)
        return cast_state(state, self.engine.dtype) if self.autocast is not None else state

    def _initial_state(self, batch_size: int) -> State:
        if self._state is None:
            state = self.model.initial_state(batch_size)
            check_state(state)
            return state
        carried = self._state[0] if isinstance(self._state, tuple) else self._state
        if carried.shape[1] != batch_size:
            raise UsageError(
                f"the carried state has batch size {carried.shape[1]} but this batch has {batch_size}; "
                "call reset() before a batch of another size"
            )
        return self._state

    def _autocast_context(self) -> contextlib.AbstractContextManager[Any]:
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.engine.device.type, dtype=self.autocast)


class RNNModel(nn.Module):
    """A plain ``nn.LSTM``/``nn.GRU``/``nn.RNN`` (``batch_first=True``) plus a head, as a protocol model.

    ``core`` is ``[encoder →] rnn`` and ``readout`` the head, so the head's parameters keep their
    direct gradient term under every method (docs/design.md §2.2). The state is the module's own
    ``h`` (``[layers, B, H]``), or ``(h, c)`` for an LSTM.
    """

    def __init__(self, rnn: nn.RNNBase, head: nn.Module, encoder: nn.Module | None = None) -> None:
        super().__init__()
        if not isinstance(rnn, nn.RNNBase):
            raise UsageError(f"wrap_rnn needs an nn.LSTM, nn.GRU or nn.RNN, got {type(rnn).__name__}")
        if not rnn.batch_first:
            raise UsageError("wrap_rnn needs batch_first=True (inputs [B, T, ...]); build the rnn with batch_first=True")
        if rnn.bidirectional:
            raise UsageError("a bidirectional rnn reads the future and cannot be truncated in time; use bidirectional=False")
        self.rnn = rnn
        self.head = head
        self.encoder = encoder

    def initial_state(self, batch_size: int) -> State:
        """Zeros shaped as the wrapped module's ``h_0`` (and ``c_0``)."""
        p = next(self.rnn.parameters())
        proj = getattr(self.rnn, "proj_size", 0)
        h = torch.zeros(self.rnn.num_layers, batch_size, proj or self.rnn.hidden_size, dtype=p.dtype, device=p.device)
        if isinstance(self.rnn, nn.LSTM):
            c = torch.zeros(self.rnn.num_layers, batch_size, self.rnn.hidden_size, dtype=p.dtype, device=p.device)
            return (h, c)
        return h

    def core(self, inputs: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        x = self.encoder(inputs) if self.encoder is not None else inputs
        return self.rnn(x, state)

    def readout(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def forward(self, inputs: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        features, state = self.core(inputs, state)
        return self.readout(features), state


def wrap_rnn(rnn: nn.RNNBase, head: nn.Module, encoder: nn.Module | None = None) -> RNNModel:
    """Make ``[encoder →] rnn → head`` a protocol model (see :class:`RNNModel`)."""
    return RNNModel(rnn, head, encoder)


def cast_state(state: State, dtype: torch.dtype) -> State:
    """The state with its floating tensors in ``dtype`` (e.g. after a bfloat16 forward)."""
    return map_state(lambda s: s.to(dtype) if s.is_floating_point() else s, state)
