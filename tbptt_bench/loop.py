"""Truncated BPTT inside any training loop: a method's updates one at a time, for the caller's backward.

The caller keeps the optimiser, scheduler, clipping, mixed precision and the ``backward`` call; this
module supplies, update by update, a loss whose gradient is exactly the update's ``G_j`` under the
method's mask (docs/design.md §2.3, §7.4), and carries the recurrent state across updates and batches.
Batches are consecutive pieces of one stream (``boundary="carry"``): every update is the one the
stream fed whole would give, windows reaching into earlier pieces (docs/design.md §2.8;
:mod:`tbptt_bench.core.stream` plans the updates and bounds what is kept), or each batch is a segment
of its own (``boundary="cut"``). The losses come from the project's one engine
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
import copy
import functools
import logging
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence, Union

import numpy as np
import torch
from torch import nn

from tbptt_bench.core.crosscut import is_chunk_shaped
from tbptt_bench.core.engine import Engine, Source, UpdateStep
from tbptt_bench.core.stream import StreamBuffer, UpdatePlan
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


class _ReentrantBackward(torch.autograd.Function):
    """A loss whose plain ``backward()`` backpropagates the wrapped loss with ``retain_graph=True``.

    Some updates share graph with later ones (a model's cross-cut state parts, docs/design.md §7.1);
    the wrapper lets ``loss.backward()``, ``manual_backward`` and scaled backward passes keep that graph,
    as ``torch.utils.checkpoint`` runs a backward inside a backward.
    """

    @staticmethod
    def forward(ctx: Any, anchor: torch.Tensor, held: list[torch.Tensor]) -> torch.Tensor:  # type: ignore[override]
        ctx.held = held
        return held[0].detach().clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, None]:  # type: ignore[override]
        torch.autograd.backward(ctx.held[0], grad, retain_graph=True)
        return None, None


def releasable(loss: torch.Tensor, retain_graph: bool) -> torch.Tensor:
    """``loss``, made safe for a plain ``backward()`` when its graph must outlive that call."""
    if not retain_graph or not loss.requires_grad:
        return loss
    anchor = torch.zeros((), device=loss.device, dtype=loss.dtype, requires_grad=True)
    return _ReentrantBackward.apply(anchor, [loss])


@dataclass
class Step:
    """One update, ready for the caller's backward pass.

    ``loss``: ``Σ_t ℓ_t`` over the update's losses (docs/design.md §2.1); its gradient is the update's
    ``G_j``, and a plain ``loss.backward()`` (or ``manual_backward``) is all it needs, for every model.
    ``index``: the update's 0-based count since the utility was made. ``batch_index``: the batch in
    which its last loss arrived. ``update``: its losses and window, as positions in the stream (mode
    ``"carry"``) or in the batch (mode ``"cut"``; docs/design.md §2.4, §2.8). ``state``: the detached
    state after its last loss. ``weights``: its losses' weights ``[B, n]``. ``retain_graph``: whether
    the engine keeps the update's graph for later ones (the loss takes care of it).
    """

    loss: torch.Tensor
    index: int
    batch_index: int
    update: Update
    state: State
    weights: torch.Tensor
    retain_graph: bool = False

    @property
    def scored_steps(self) -> float:
        """Scored steps per batch row in this update, ``Σ_{b,t} w[b,t] / B`` (a host sync)."""
        return float(self.weights.sum()) / self.weights.shape[0]

    def loss_per_step(self) -> float:
        """The update's loss per scored step, for logging (a host sync)."""
        n = self.scored_steps
        return float(self.loss.detach()) / n if n > 0 else float("nan")


#: How batches relate: one stream (gradient and updates run across batches) or one segment each.
BOUNDARIES = ("carry", "cut")


class _OpenStream:
    """A stream being fed in ``carry`` mode: its buffer, its update plan and its engine run."""

    def __init__(self, engine: Engine, method: Method, first_update: int, rng: np.random.Generator, state: State,
                 batch_size: int) -> None:
        self.buffer = StreamBuffer(batch_size)
        self.plan = UpdatePlan(method, first_update, rng)
        # a model with cross-cut parts runs updates other than consecutive chunks on the cross-cut path
        crosscut = bool(engine.keep_parts) and not is_chunk_shaped(method.updates(64, first_update, copy.deepcopy(rng)))
        self.run = engine.start(self.buffer, state, crosscut=crosscut)

    def feed(self, piece: Batch) -> Iterator[UpdateStep]:
        """Add ``piece``; the engine's steps over the updates it settles."""
        self.buffer.append(piece)
        n = self.buffer.length
        settled = self.plan.settle(n)
        self.plan.advance(n)
        return self.run.steps(settled, self.plan.horizon(n), self.plan.ahead(n))

    def close(self) -> list[Update]:
        """The updates left at the end of the stream."""
        return self.plan.close(self.buffer.length)

    def forget(self) -> None:
        """Drop the data no later update reads."""
        self.buffer.drop_before(self.run.earliest_needed())


class TBPTT:
    """Runs a gradient method's updates over batches and streams, for any training loop.

    ``model`` follows the model protocol (``initial_state(B)``, ``forward(inputs, state)``, optional
    ``core``/``readout``; see :func:`wrap_rnn` for a plain ``nn.LSTM``/``nn.GRU``/``nn.RNN`` with a
    head). ``method`` is a spec such as ``"tbptt:k1=16,k2=32"`` or a :class:`Method`. ``loss`` is
    ``"cross_entropy"`` (class targets ``[B, T]``) or ``"mse"`` (targets ``[B, T, D]``).
    ``boundary`` says what consecutive batches are (docs/design.md §2.8):

    * ``"carry"`` (default): consecutive pieces of one stream. Every update is the one the stream fed
      whole would have (updates at multiples of k1 along the stream, windows reaching into earlier
      pieces); a partial segment at the end of a batch waits for the next batch; :meth:`flush` (or
      :meth:`reset`, or the end of :meth:`stream`) ends the stream and closes it;
    * ``"cut"``: each batch is a segment of its own: the carried state is a constant at its start, no
      gradient crosses it, and its trailing losses are an update at the end of the batch.

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
        boundary: str = "carry",
        seed: int = 0,
        autocast: torch.dtype | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        check_protocol(model)
        if loss not in LOSS_KINDS:
            raise UsageError(f"unknown loss {loss!r}; accepted: {', '.join(LOSS_KINDS)}")
        if boundary not in BOUNDARIES:
            raise UsageError(f"unknown boundary {boundary!r}; accepted: {', '.join(BOUNDARIES)}")
        self.model = model
        self.method = parse_method(method)
        self.loss_kind = loss
        self.boundary = boundary
        self.engine = Engine(model, loss, device=device, checkpoint=self.method.checkpoint)
        self.autocast = autocast
        self.rng = method_rng(seed)
        #: Updates yielded so far (the global update count that hybrid and scheduled K follow).
        self.updates_done = 0
        #: Batches finished so far.
        self.batches_done = 0
        self._state: State | None = None
        self._running = False
        self._open: _OpenStream | None = None
        self._closing: _OpenStream | None = None

    @property
    def state(self) -> State | None:
        """The carried state (detached) after the last update yielded, or None at the start of a stream."""
        return self._state

    @property
    def held_steps(self) -> int:
        """Steps of the open stream held in memory per row (``carry``): bounded by the window."""
        return self._open.buffer.held() if self._open is not None else 0

    def reset(self, state: State | None = None) -> None:
        """End the stream; the next batch starts a new one from ``model.initial_state`` (or ``state``).

        In ``carry`` mode the losses still waiting are closed as the stream's last update(s), yielded
        first by the next :meth:`steps` or :meth:`flush`.
        """
        if state is not None:
            check_state(state)
            state = detach_state(state)
        if self._open is not None:
            self._closing, self._open = self._open, None
        self._state = state

    def flush(self) -> Iterator[Step]:
        """End the stream (``carry``): yield the update(s) over the losses still waiting; the next batch
        starts a new stream from ``model.initial_state``."""
        self.reset()
        yield from self._drain()

    def steps(self, batch: BatchLike) -> Iterator[Step]:
        """The updates settled by one batch, each before its backward pass.

        Ask for the next step only after the previous one's backward (and optimiser step, if any). An
        empty batch yields nothing. In ``cut`` mode, the state carried into the next batch is the state
        after the last update yielded, so breaking out early continues the stream from there.
        """
        data = as_batch(batch)
        if self._running:
            raise UsageError("the previous batch's steps are still running; finish or close them before the next batch")
        yield from self._drain()
        if data.length == 0:
            self.batches_done += 1
            return
        if self.boundary == "cut":
            yield from self._segment_steps(data)
        else:
            yield from self._stream_steps(data)
        self.batches_done += 1

    def stream(self, batches: Iterable[BatchLike]) -> Iterator[Step]:
        """:meth:`steps` over consecutive batches of one stream; in ``carry`` mode, then :meth:`flush`
        (in ``cut`` mode the state stays carried for more batches)."""
        for batch in batches:
            yield from self.steps(batch)
        if self.boundary == "carry":
            yield from self.flush()

    # -- the two modes -----------------------------------------------------------------------------
    def _segment_steps(self, data: Batch) -> Iterator[Step]:
        h0 = self._initial_state(data.batch_size)
        self.method.observe(self.updates_done, self.model, data, h0, self.loss_kind)
        updates = self.method.updates(data.length, first_update=self.updates_done, rng=self.rng)
        yield from self._run(self.engine.steps(data, updates, h0, fixed_params=False), data)

    def _stream_steps(self, data: Batch) -> Iterator[Step]:
        if self._open is None:
            h0 = self._initial_state(data.batch_size)
            self.method.observe(self.updates_done, self.model, data, h0, self.loss_kind)
            self._open = _OpenStream(self.engine, self.method, self.updates_done, self.rng, h0, data.batch_size)
        elif self._open.buffer.batch_size != data.batch_size:
            raise UsageError(
                f"the stream has batch size {self._open.buffer.batch_size} but this batch has {data.batch_size}; "
                "call reset() (or flush()) before a batch of another size")
        stream = self._open
        yield from self._run(stream.feed(data), stream.buffer)
        stream.forget()

    def _drain(self) -> Iterator[Step]:
        """The closing updates of a stream that has ended."""
        stream, self._closing = self._closing, None
        if stream is None:
            return
        carried = self._state
        yield from self._run(stream.run.steps(stream.close()), stream.buffer)
        if stream.plan.rng_after is not None:
            self.rng = stream.plan.rng_after
        self._state = carried

    def _run(self, inner: Iterator[UpdateStep], source: Source) -> Iterator[Step]:
        """Wrap the engine's steps: forwards under autocast, the carried state, the update count."""
        self._running = True
        try:
            while True:
                with self._autocast_context():
                    try:
                        step = next(inner)
                    except StopIteration as stop:
                        if stop.value is not None:
                            self._state = self._carried(stop.value)
                        break
                self._state = self._carried(step.state)
                index = self.updates_done
                self.updates_done += 1
                u = step.update
                weights = source.slice(u.loss_start, u.loss_end).weights
                yield Step(releasable(step.loss, step.retain_graph), index, self.batches_done, u, self._state,
                           weights, step.retain_graph)
        finally:
            self._running = False
            close = getattr(inner, "close", None)
            if close is not None:
                close()

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


@functools.lru_cache(maxsize=None)
def autocast_supported(dtype: torch.dtype = torch.bfloat16, device: str = "cpu") -> bool:
    """Whether this machine runs a fused ``nn.LSTM`` forward and backward under ``torch.autocast(dtype)``.

    oneDNN has no bf16 LSTM primitive on CPUs without AVX-512 (it raises "could not create a primitive
    descriptor"), so a bfloat16 run there fails at the first forward; ask first and choose float32 instead.
    """
    try:
        lstm = nn.LSTM(2, 2, batch_first=True).to(device)
        with torch.autocast(device_type=torch.device(device).type, dtype=dtype):
            out, _ = lstm(torch.zeros(1, 2, 2, device=device))
        out.float().sum().backward()
        return True
    except RuntimeError:
        return False


def cast_state(state: State, dtype: torch.dtype) -> State:
    """The state with its floating tensors in ``dtype`` (e.g. after a bfloat16 forward)."""
    return map_state(lambda s: s.to(dtype) if s.is_floating_point() else s, state)
