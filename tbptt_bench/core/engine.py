"""The one engine: runs a method's updates over a time-sliced source with any recurrent model.

Every task, model and method goes through :class:`Engine.run`. It knows the truncation mask only as
the :class:`~tbptt_bench.core.mask.Update` list a method produces, and implements each update with as few
fused calls as the mask allows:

* a *window* (all losses of the update reach back to the same step) is one chain of fused calls from
  the stored boundary state, split only where a later update needs the state or a gradient scale
  applies; chunked TBPTT is one call per chunk, full BPTT one call per sequence (or per checkpoint
  chunk, recomputed in the backward pass), tbptt(k1 < k2) recomputes its window from the stored
  state at ``u - k2`` — no chains of per-step ``backward`` calls;
* when θ stays fixed between updates (gradient estimates: ``run`` without an update callback, or
  ``fixed_params=True``), segments that a later, overlapping window covers are forwarded once and
  their graphs kept; a later update chains the state gradient back through them (one ``backward``
  per segment). A parameter change seen in the version counters (an optimiser step) drops the kept
  graphs and the run recomputes from then on, so the gradients are the same either way;
* steps before the window (k2 < k1) run without gradient and give only the read-out's direct term;
* per-loss windows (``sliding``) are stacked along the batch dimension and run as one call;
* a model that declares state parts differentiable across a cut (docs/design.md §7.1): consecutive
  chunks (window start = first loss, no lag limit, no scales) run on the simple path, each chunk
  forwarded once from the state the previous chunk left, the cut keeping the declared parts' graphs;
  every other update shape runs through :mod:`tbptt_bench.core.crosscut` (a trajectory cut at every
  window start, windows forwarded from it). Every backward retains the graph for later updates.

Data come from the source one segment at a time, so a long stream is never on the device whole; on
CUDA each chunk goes through page-locked memory with a non-blocking copy, and nothing in an update
waits for the device.
The loss is ``L = Σ_t (1/B) Σ_b w[b,t] · loss(b,t)`` (summed over time, mean over the batch).
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass, field
from typing import Callable, Generator, Iterator, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from tbptt_bench.core.crosscut import CrossCutRun, is_chunk_shaped
from tbptt_bench.core.mask import Update, update_steps
from tbptt_bench.models.protocol import (
    State, check_state, cross_cut_parts, detach_state, has_readout, map_state, truncate_state,
)
from tbptt_bench.tasks.base import Batch

log = logging.getLogger(__name__)

#: Maximum number of per-loss windows stacked into one call for ``sliding`` updates.
WINDOW_BLOCK = 512
#: Longest fused call with gradient on the CPU. oneDNN's RNN kernels run faster on chains of 64-step
#: calls than on one long call (LSTM, batch 32, hidden 128, T = 1024: 0.16 s against 0.27 s for
#: forward and backward; benchmarks/bench_overhead.py), because a call's workspace then stays in cache.
#: On CUDA calls are not split (cuDNN keeps long sequences efficient).
CPU_FUSED_STEPS = 64
_NO_SCALES: dict[int, float] = {}


class Source(Protocol):
    """Anything with a batch size, a length and time slices (a :class:`Batch`, a stream)."""

    @property
    def batch_size(self) -> int: ...

    @property
    def length(self) -> int: ...

    def slice(self, a: int, b: int) -> Batch: ...


@dataclass
class RunResult:
    """What a run returns: the state at the end and each update's loss (detached, on the device)."""

    final_state: State
    update_losses: torch.Tensor


def step_loss_sum(outputs: torch.Tensor, batch: Batch, loss_kind: str, batch_size: int) -> torch.Tensor:
    """``Σ_t ℓ_t`` over the steps of ``batch``: weighted per-element loss summed, divided by B."""
    if loss_kind == "cross_entropy":
        per = F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), batch.targets.reshape(-1), reduction="none")
        per = per.view(batch.weights.shape)
    elif loss_kind == "mse":
        diff = outputs - batch.targets.to(outputs.dtype)
        per = (diff * diff).reshape(*batch.weights.shape, -1).sum(-1)
    else:
        raise ValueError(f"unknown loss kind {loss_kind!r}")
    weights = batch.weights if batch.weights.dtype == per.dtype else batch.weights.to(per.dtype)
    return (per * weights).sum() / batch_size


def scale_grad(state: State, factor: float) -> State:
    """Identity in the forward pass; multiplies the adjoint flowing back through ``state`` by factor."""

    def scale(s: torch.Tensor) -> torch.Tensor:
        if not s.requires_grad:
            return s
        d = s.detach()
        return d + factor * (s - d)

    return map_state(scale, state)


@dataclass
class UpdateStep:
    """One update of :meth:`Engine.steps`, before its backward pass.

    ``index``: the update's position in the list run; ``loss``: ``Σ ℓ_t`` over its losses, whose
    gradient is the update's ``G_j``; ``state``: the (detached) state after its last loss;
    ``retain_graph``: what the backward call must pass (True while kept graphs are reused and for a
    model with cross-cut parts, whose trajectory later updates backpropagate through again).
    """

    index: int
    update: Update
    loss: torch.Tensor
    state: State
    retain_graph: bool = False
    #: Carries kept adjoints back once the loss has been backpropagated (the engine also does it on resume).
    after_backward: Callable[[], None] | None = field(default=None, repr=False)

    def backward(self) -> None:
        """The backward pass this update needs (a no-op for a loss without graph: an online estimate,
        already in ``.grad``)."""
        if self.loss.requires_grad:
            self.loss.backward(retain_graph=self.retain_graph)
        if self.after_backward is not None:
            self.after_backward()


@dataclass
class _Segment:
    """A forward run over steps ``[x, y)`` from a leaf copy of its input state, kept for reuse."""

    state_in: State
    state_out: State
    features: torch.Tensor
    data: Batch
    versions: tuple[int, ...]


def _parts(state: State) -> tuple[torch.Tensor, ...]:
    return state if isinstance(state, tuple) else (state,)


def _later_minimum(values: list[int]) -> list[int]:
    """``out[i] = min(values[i+1:])`` (a large number when empty), in one pass."""
    out = [10**18] * len(values)
    for i in range(len(values) - 2, -1, -1):
        out[i] = min(values[i + 1], out[i + 1])
    return out


def _pinned(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A page-locked CPU copy of ``t`` (floating tensors in ``dtype``), from torch's caching host allocator.

    The allocator keeps a block until the asynchronous copy that reads it has finished, so reusing
    blocks across chunks is safe without waiting on the host.
    """
    if t.device.type != "cpu" or t.is_pinned():
        return t
    out = torch.empty(t.shape, dtype=dtype if t.is_floating_point() else t.dtype, pin_memory=True)
    return out.copy_(t)


def to_device(data: Batch, device: torch.device, dtype: torch.dtype, *, pin: bool = True,
              non_blocking: bool = False) -> Batch:
    """A chunk moved to ``device`` (floating tensors in ``dtype``): to CUDA through page-locked memory,
    asynchronously, so the host does not wait; ``pin=False`` copies from pageable memory."""
    if pin and device.type == "cuda":
        data = Batch(*(_pinned(t, dtype) for t in (data.inputs, data.targets, data.weights)))
        return data.to(device, dtype, non_blocking=True)
    return data.to(device, dtype, non_blocking)


class UpdateEngine(Protocol):
    """What training and the loop utility ask of an engine (:class:`Engine`, ``OnlineEngine``).

    ``steps`` yields each update before its backward pass (:meth:`UpdateStep.backward` does it) and
    returns the final state; ``run`` is ``steps`` with the backward pass and a callback; both keep a
    run's state in the run, so one engine may serve several runs at once.
    """

    device: torch.device
    dtype: torch.dtype

    def update_steps(self, u: Update) -> tuple[int, int]: ...

    def steps(
        self, source: Source, updates: Sequence[Update], state: State, *, fixed_params: bool = False
    ) -> Generator[UpdateStep, None, State]: ...

    def run(
        self,
        source: Source,
        updates: Sequence[Update],
        state: State,
        on_update: Callable[[int, Update, torch.Tensor], bool | None] | None = None,
        *,
        fixed_params: bool | None = None,
    ) -> RunResult: ...


def drive(
    steps: Generator[UpdateStep, None, State],
    count: int,
    on_update: Callable[[int, Update, torch.Tensor], bool | None] | None,
    device: torch.device,
    dtype: torch.dtype,
) -> RunResult:
    """Backpropagate each step of ``steps`` and call ``on_update``; True from it ends the run there."""
    # one preallocated vector, not a tensor object per update: memory stays flat in the length
    losses = torch.empty(count, device=device, dtype=dtype)
    while True:
        try:
            step = next(steps)
        except StopIteration as stop:
            return RunResult(stop.value, losses)
        step.backward()
        loss = step.loss.detach()
        losses[step.index] = loss
        if on_update is not None and on_update(step.index, step.update, loss):
            steps.close()  # the callback asked to stop after this update
            return RunResult(step.state, losses[: step.index + 1])


class Engine:
    """Runs updates of a gradient method for one model on one device: configuration only.

    Each :meth:`steps` or :meth:`run` call keeps its run's state (stored boundary states, kept graphs)
    in its own :class:`EngineRun`, so runs on one engine may interleave. ``checkpoint``: recompute
    activations per chunk of that many steps in the backward pass. ``max_fused_steps``: split calls
    with gradient into pieces of at most that many steps, aligned to multiples of it (the same math;
    default :data:`CPU_FUSED_STEPS` on the CPU, 0 = no limit, the default on CUDA). ``pin_memory``
    (default: on CUDA) stages chunks in page-locked memory.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_kind: str,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        checkpoint: int | None = None,
        non_blocking: bool = False,
        pin_memory: bool | None = None,
        max_fused_steps: int | None = None,
    ) -> None:
        self.model = model
        self.loss_kind = loss_kind
        first = next(model.parameters(), None)
        self.device = torch.device(device) if device is not None else (first.device if first is not None else torch.device("cpu"))
        self.dtype = dtype if dtype is not None else (first.dtype if first is not None else torch.get_default_dtype())
        self.checkpoint = checkpoint
        self.non_blocking = non_blocking
        self.pin_memory = (self.device.type == "cuda") if pin_memory is None else pin_memory
        if max_fused_steps is None:
            max_fused_steps = CPU_FUSED_STEPS if self.device.type == "cpu" else 0
        self.max_fused_steps = max_fused_steps
        self.split_readout = has_readout(model)
        self.params = list(model.parameters())
        self.keep_parts = cross_cut_parts(model)
        #: Run chunk-shaped updates of such a model through the general cross-cut path too (for tests).
        self.force_crosscut = False

    # -- public ----------------------------------------------------------------------------------
    def update_steps(self, u: Update) -> tuple[int, int]:
        """Recurrent steps (forward, backward) an update costs in training (docs/design.md §3.7)."""
        return update_steps(u)

    def run(
        self,
        source: Source,
        updates: Sequence[Update],
        state: State,
        on_update: Callable[[int, Update, torch.Tensor], bool | None] | None = None,
        *,
        fixed_params: bool | None = None,
    ) -> RunResult:
        """Run ``updates`` over ``source`` from ``state``; call ``on_update`` after each backward.

        When ``on_update`` returns True the run ends after that update (the result then covers the
        updates run so far).

        Gradients accumulate in ``.grad`` unless ``on_update`` steps an optimiser and zeroes them.
        ``fixed_params``: whether θ stays the same between updates, so that overlapping windows may
        reuse kept graphs. Default: only when there is no ``on_update`` (nothing can change θ). Pass
        True if ``on_update`` only reads gradients. Either way an in-place change that bumps a
        parameter's version counter (any ``torch.optim`` step) is noticed and ends the reuse; a change
        through ``p.data`` is not, so do not pass True with such a callback.
        This is :meth:`steps` with the backward pass done here.
        """
        retain = on_update is None if fixed_params is None else fixed_params
        steps = self.steps(source, updates, state, fixed_params=retain)
        return drive(steps, len(updates), on_update, self.device, self.dtype)

    def steps(
        self, source: Source, updates: Sequence[Update], state: State, *, fixed_params: bool = False
    ) -> Generator[UpdateStep, None, State]:
        """Yield each update's loss *before* its backward pass; return the final state.

        The consumer calls ``step.backward()`` (or ``step.loss.backward(retain_graph=step.retain_graph)``,
        ``manual_backward``, a scaled backward) and may step an optimiser before asking for the next
        update; the engine then goes on with the state stored at the update's boundaries, so the
        gradient of each yielded loss is exactly the update's ``G_j`` (docs/design.md §2.3, §7.4).
        ``fixed_params=True`` (θ unchanged between updates) lets overlapping windows reuse kept
        graphs; their adjoints are chained when the generator resumes.
        """
        crosscut = bool(self.keep_parts) and (self.force_crosscut or not is_chunk_shaped(updates))
        run = self.start(source, state, fixed_params=fixed_params, crosscut=crosscut)
        yield from run.steps(updates)
        return run.final_state(updates[-1].loss_end if updates else 0)

    def start(self, source: Source, state: State, *, fixed_params: bool = False, crosscut: bool = False) -> EngineRun:
        """A run over ``source`` from ``state``, fed updates by :meth:`EngineRun.steps` (several calls
        continue one run: a stream whose updates become known piece by piece). ``crosscut``: run every
        update through :mod:`tbptt_bench.core.crosscut` (a model with cross-cut parts and updates
        that are not consecutive chunks)."""
        return EngineRun(self, source, state, fixed_params, crosscut)

    # -- model, loss and data (no run state) ------------------------------------------------------
    def versions(self) -> tuple[int, ...]:
        """The parameters' version counters: an optimiser step changes them."""
        return tuple(p._version for p in self.params)

    def core(self, inputs: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """Features (or outputs, for models without a read-out split) and the new state."""
        if self.split_readout:
            return self.model.core(inputs, state)  # type: ignore[operator]
        return self.model(inputs, state)

    def loss(self, features: torch.Tensor, data: Batch, lo: int, hi: int, batch_size: int) -> torch.Tensor:
        """``Σ ℓ_t`` over positions ``lo..hi-1`` of a segment; the read-out runs with gradient."""
        if hi <= lo:
            return torch.zeros((), device=self.device, dtype=self.dtype)
        if lo > 0 or hi < features.shape[1]:  # the whole segment (chunked updates) needs no slices
            features, data = features[:, lo:hi], data.slice(lo, hi)
        outputs = self.model.readout(features) if self.split_readout else features  # type: ignore[operator]
        return step_loss_sum(outputs, data, self.loss_kind, batch_size)

    def fetch(self, source: Source, a: int, b: int) -> Batch:
        """Steps ``[a, b)`` of ``source`` on the engine's device (one chunk; the source stays put)."""
        return self.to_device(source.slice(a, b))

    def holds(self, source: Source) -> bool:
        """Whether ``source`` is a :class:`Batch` already on the engine's device, floating tensors in its
        dtype: then a chunk is a plain slice (moving it would return the same tensors)."""
        return isinstance(source, Batch) and all(
            t.device == self.device and (t.dtype == self.dtype or not t.is_floating_point())
            for t in (source.inputs, source.targets, source.weights))

    def to_device(self, data: Batch) -> Batch:
        """Move a chunk (:func:`to_device`, pinned as ``pin_memory`` says)."""
        return to_device(data, self.device, self.dtype, pin=self.pin_memory, non_blocking=self.non_blocking)


class EngineRun:
    """The state of one run of an :class:`Engine`: stored boundary states, kept graphs, pending links.

    Positions are those of ``source``. :meth:`steps` may be called again with later updates (a
    stream fed in pieces); ``horizon`` then says how far back those later updates may reach, so
    states from there on are kept and everything before it may be forgotten.
    """

    def __init__(self, engine: Engine, source: Source, state: State, fixed_params: bool, crosscut: bool = False) -> None:
        check_state(state)
        self.engine = engine
        self.source = source
        self.batch_size = source.batch_size
        self.splits: set[int] = {0}
        self.split_list: list[int] = [0]
        self.bank: dict[int, State] = {0: detach_state(state)}
        self.kept: dict[tuple[int, int], _Segment] = {}
        self.dense: dict[int, State] = {}
        self.retain = fixed_params and not engine.keep_parts
        self.keep_from = 0
        self.links: list[tuple[State, State]] = []
        self.leaves: list[State] = []
        self.done = 0
        #: Chunks of a source already in place are slices of it, decided once per run, not per chunk.
        self._fetch: Callable[[int, int], Batch] = source.slice if engine.holds(source) else self._moved
        self.cross = CrossCutRun(state, engine.keep_parts, self._fetch, engine.core, self._loss) if crosscut else None

    def steps(self, updates: Sequence[Update], horizon: int | None = None, ahead: Sequence[Update] = ()) -> Iterator[UpdateStep]:
        """Yield each of ``updates`` before its backward pass; chain kept adjoints when resumed.

        ``horizon``: the earliest position a later call's updates may need (None: there is none).
        ``ahead``: later updates known already; their boundary states are stored as the forward passes
        them, exactly as if they had been given with ``updates``.
        """
        engine = self.engine
        if self.cross is not None:
            self.cross.plan([*updates, *ahead])
            for i, u, loss, after in self.cross.steps(updates, horizon):
                yield UpdateStep(i, u, loss, after, True)
            return
        for u in (*updates, *ahead):
            self.splits.update((u.window_start, u.loss_start, u.loss_end))
        self.split_list = sorted(self.splits)
        last = 10**18 if horizon is None else horizon
        keep_from = _later_minimum([self._earliest_needed(u) for u in updates] + [last])
        for i, u in enumerate(updates):
            self.keep_from = keep_from[i]
            self._drop_stale_segments()
            loss = self._update_loss(u)
            after = self.bank.get(u.loss_end)
            if after is None:
                after = self.bank[max(self.bank)]
            yield UpdateStep(self.done, u, loss, after, bool(self.leaves) or bool(engine.keep_parts), self.chain_adjoints)
            self.done += 1
            self.chain_adjoints()  # a no-op when the consumer has chained already
            self._forget_before(keep_from[i], reachable=horizon is not None)
        if not updates:
            self._forget_before(last, reachable=horizon is not None)
        self.kept = {} if horizon is None else self.kept

    def final_state(self, end: int) -> State:
        """The state at ``end``, the end of the last update run (detached)."""
        if self.cross is not None:
            return self.cross.final_state(end)
        return self.bank[end] if end in self.bank else self.bank[max(self.bank)]

    def earliest_needed(self) -> int:
        """The first position whose data a later update may still read."""
        if self.cross is not None:
            return min(self.cross.traj)
        return min(min(self.bank), min(self.dense, default=10**18))

    def _forget_before(self, p: int, reachable: bool) -> None:
        """Drop stored states and kept graphs before ``p``; ``reachable``: first store the state at ``p``
        (a later call's updates, unknown so far, may start anywhere from ``p`` on)."""
        frontier = max(self.bank)
        if reachable and p < frontier:
            self._ensure_state(p)
        for q in [q for q in self.bank if q < p and q != frontier]:
            del self.bank[q]
        if self.kept:
            self.kept = {k: g for k, g in self.kept.items() if k[0] >= p}

    # -- one update ------------------------------------------------------------------------------
    def _update_loss(self, u: Update) -> torch.Tensor:
        a, b = u.loss_start, u.loss_end
        if u.max_lag is None:
            return self._window(u.window_start, a, b, u)
        shared_end = min(b, u.window_start + u.max_lag)  # losses whose window starts at window_start
        total = self._window(u.window_start, a, shared_end, u) if a < shared_end else None
        rest = max(a, shared_end)
        if rest < b:
            if u.scales:
                raise NotImplementedError("gradient scales with per-loss windows are not supported")
            windows = self._stacked_windows(rest, b, u.max_lag)
            total = windows if total is None else total + windows
        self._ensure_state(b)
        assert total is not None
        return total

    def _window(self, start: int, a: int, b: int, u: Update) -> torch.Tensor:
        """Losses ``[a, b)`` reaching back to step ``start`` (one chain of fused calls)."""
        total: torch.Tensor | None = None
        if start > a:  # steps before the window: no recurrent gradient, read-out term only
            total = self._chain(a, start, a, start, u, grad=False)
        loss = self._chain(start, b, max(a, start), b, u, grad=True)
        return loss if total is None else total + loss

    def _chain(self, start: int, end: int, la: int, lb: int, u: Update, grad: bool) -> torch.Tensor:
        """Forward from the state at ``start`` to ``end``; return Σ ℓ_t for t in ``[la, lb)``."""
        engine = self.engine
        state = self._state_at(start)
        first, last = bisect.bisect_right(self.split_list, start), bisect.bisect_left(self.split_list, end)
        scales = dict(u.scales) if u.scales else _NO_SCALES
        split = grad and (engine.checkpoint or (engine.max_fused_steps and end - start > engine.max_fused_steps))
        if first == last and not scales and not split and start < end:  # one call (a chunk): no cut set
            points = [start, end]
        else:
            cuts = {start, end, *self.split_list[first:last]}
            cuts.update(p for p in scales if start < p < end)
            if engine.checkpoint and grad:
                cuts.update(range(start - start % engine.checkpoint + engine.checkpoint, end, engine.checkpoint))
            elif split:
                n = engine.max_fused_steps
                cuts.update(range(start - start % n + n, end, n))
            points = sorted(cuts)
        retain = grad and not scales and not engine.checkpoint and self._worth_retaining(points)
        total: torch.Tensor | None = None
        previous_out: State | None = None
        for x, y in zip(points[:-1], points[1:]):
            if grad and x in scales and x != start:
                state = scale_grad(state, scales[x])
            lo, hi = max(la, x) - x, max(min(lb, y) - x, 0)
            if retain:
                segment = self._segment(x, y, state)
                if previous_out is not None:
                    self.links.append((segment.state_in, previous_out))
                data, features, state = segment.data, segment.features, segment.state_out
                previous_out = state
                loss = self._loss(features, data, lo, hi)
            elif grad and engine.checkpoint:
                loss, state = self._checkpointed(self._fetch(x, y), state, lo, hi)
            else:
                data = self._fetch(x, y)
                with torch.set_grad_enabled(grad):
                    features, state = engine.core(data.inputs, state)
                loss = self._loss(features, data, lo, hi)
            total = loss if total is None else total + loss
            if y in self.splits:
                self.bank[y] = truncate_state(state, engine.keep_parts)
        return total if total is not None else torch.zeros((), device=engine.device, dtype=engine.dtype)

    # -- frozen θ: reuse the graphs of overlapping windows ---------------------------------------
    def _worth_retaining(self, points: list[int]) -> bool:
        """Whether a later window will run over one of these segments (or one is already kept)."""
        if not self.retain:
            return False
        return any(x >= self.keep_from or (x, y) in self.kept for x, y in zip(points[:-1], points[1:]))

    def _segment(self, x: int, y: int, state: State) -> _Segment:
        """Steps ``[x, y)`` with gradient from a leaf copy of ``state``: reused while θ is unchanged."""
        kept = self.kept.get((x, y))
        if kept is not None:
            self.leaves.append(kept.state_in)
            return kept
        leaf = map_state(lambda s: s.detach().requires_grad_(True), state)
        data = self._fetch(x, y)
        features, out = self.engine.core(data.inputs, leaf)
        segment = _Segment(leaf, out, features, data, self.engine.versions())
        self.leaves.append(leaf)
        if x >= self.keep_from:
            self.kept[(x, y)] = segment
        return segment

    def _drop_stale_segments(self) -> None:
        """Forget kept graphs once θ has changed (an optimiser step): recompute from now on."""
        if self.kept and next(iter(self.kept.values())).versions != self.engine.versions():
            self.kept = {}
            self.retain = False

    def chain_adjoints(self) -> None:
        """Carry ∂L/∂(segment input state) back through the earlier segments of the window."""
        if not self.links and not self.leaves:
            return
        for leaf, out in reversed(self.links):
            pairs = [(o, s.grad) for o, s in zip(_parts(out), _parts(leaf)) if s.grad is not None and o.requires_grad]
            if pairs:
                torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs], retain_graph=True)
        for leaf in self.leaves:
            for s in _parts(leaf):
                s.grad = None
        self.links = []
        self.leaves = []

    def _checkpointed(self, data: Batch, state: State, lo: int, hi: int) -> tuple[torch.Tensor, State]:
        """One chunk whose activations are recomputed in the backward pass."""
        is_tuple = isinstance(state, tuple)
        parts = state if isinstance(state, tuple) else (state,)
        core = self.engine.core

        def run(*parts_in: torch.Tensor) -> tuple[torch.Tensor, ...]:
            s = tuple(parts_in) if is_tuple else parts_in[0]
            features, s = core(data.inputs, s)
            out = s if isinstance(s, tuple) else (s,)
            return (self._loss(features, data, lo, hi), *out)

        result = activation_checkpoint(run, *parts, use_reentrant=False)
        new = tuple(result[1:]) if is_tuple else result[1]
        return result[0], new

    def _stacked_windows(self, a: int, b: int, k: int) -> torch.Tensor:
        """Losses ``[a, b)``, loss t reaching exactly steps ``t-k+1..t``: windows stacked in the batch."""
        engine = self.engine
        self._ensure_dense(a - k + 1, b - k + 1)
        total = torch.zeros((), device=engine.device, dtype=engine.dtype)
        for lo in range(a, b, WINDOW_BLOCK):
            ts = range(lo, min(b, lo + WINDOW_BLOCK))
            states = [self.dense[t - k + 1] for t in ts]
            if isinstance(states[0], tuple):
                state: State = tuple(torch.cat([s[j] for s in states], dim=1) for j in range(len(states[0])))
            else:
                state = torch.cat(states, dim=1)  # type: ignore[arg-type]
            base = ts[0] - k + 1  # the block's steps go to the device once; windows are gathered there
            span = self._fetch(base, ts[-1] + 1)
            pieces = [span.slice(t - k + 1 - base, t + 1 - base) for t in ts]
            data = Batch(*(torch.cat([getattr(p, f) for p in pieces], dim=0) for f in ("inputs", "targets", "weights")))
            features, _ = engine.core(data.inputs, state)
            total = total + self._loss(features, data, k - 1, k)
        return total

    # -- states ----------------------------------------------------------------------------------
    def _state_at(self, p: int) -> State:
        if p not in self.bank:
            self._ensure_state(p)
        return self.bank[p]

    def _ensure_state(self, p: int) -> None:
        """Make the state at position ``p`` available, stepping forward without gradient if needed."""
        if p in self.bank:
            return
        q = max(k for k in self.bank if k <= p)
        state = self.bank[q]
        with torch.no_grad():
            data = self._fetch(q, p)
            _, state = self.engine.core(data.inputs, state)
        self.bank[p] = detach_state(state)

    def _ensure_dense(self, a: int, b: int) -> None:
        """States at every position in ``[a, b)`` (for per-loss windows), computed step by step."""
        self.dense = {p: s for p, s in self.dense.items() if p >= a}
        missing = [p for p in range(a, b) if p not in self.dense]
        if not missing:
            return
        self._ensure_state(missing[0])
        state = self.bank[missing[0]]
        self.dense[missing[0]] = state
        if b - 1 <= missing[0]:
            return
        span = self._fetch(missing[0], b - 1)  # one transfer; the steps are sliced on the device
        with torch.no_grad():
            for p in range(missing[0] + 1, b):
                _, state = self.engine.core(span.inputs[:, p - 1 - missing[0]:p - missing[0]], state)
                self.dense[p] = detach_state(state)

    def _earliest_needed(self, u: Update) -> int:
        if u.max_lag is None:
            return min(u.window_start, u.loss_start)
        return min(u.window_start, max(u.window_start, u.loss_start - u.max_lag + 1), u.loss_start)

    # -- data and loss of this run ---------------------------------------------------------------
    def _moved(self, a: int, b: int) -> Batch:
        return self.engine.fetch(self.source, a, b)

    def _loss(self, features: torch.Tensor, data: Batch, lo: int, hi: int) -> torch.Tensor:
        return self.engine.loss(features, data, lo, hi, self.batch_size)
