"""States along a forward trajectory, and the model's recurrent core called on stacked rows.

The gradient analyses (the lag decomposition in :mod:`tbptt_bench.core.lags`, the nested K curve in
:mod:`tbptt_bench.analysis.kcurve`) treat the states of one forward pass as data: they restart the core from
the stored state at many positions at once, stacking those restarts along the batch dimension so
that one fused call covers them all. This module holds the pieces they share: the core/read-out split
of the model protocol, stacking of tensor-or-tuple states, and the stored states themselves.

Positions are 0-based state positions: position ``p`` is the state after ``p`` steps (position 0 is
the initial state). A stacked state holds several states side by side in dimension 1; "rows" are that
dimension.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import nn

from tbptt_bench.models.protocol import State, check_state, has_readout, map_state
from tbptt_bench.tasks.base import Batch


def core_fn(model: nn.Module) -> Callable[[torch.Tensor, State], tuple[torch.Tensor, State]]:
    """The recurrent part: ``model.core`` when the model splits off a read-out, else ``model``."""
    return model.core if has_readout(model) else model  # type: ignore[return-value]


def readout_fn(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The read-out applied to core features (the identity for models without the split)."""
    return model.readout if has_readout(model) else (lambda features: features)  # type: ignore[return-value]


def parts(state: State) -> tuple[torch.Tensor, ...]:
    """The tensors of a state, as a tuple."""
    return state if isinstance(state, tuple) else (state,)


def like(template: State, tensors: Sequence[torch.Tensor]) -> State:
    """Rebuild a state shaped like ``template`` from its tensors."""
    return tuple(tensors) if isinstance(template, tuple) else tensors[0]


def cat_states(states: Sequence[State]) -> State:
    """Stack states along the batch dimension (rows of ``states[0]`` first)."""
    first = states[0]
    return like(first, [torch.cat([parts(s)[j] for s in states], dim=1) for j in range(len(parts(first)))])


def rows(state: State, a: int, b: int) -> State:
    """Rows ``a..b-1`` of a stacked state."""
    return map_state(lambda s: s[:, a:b], state)


def leaf(state: State) -> State:
    """A detached copy that requires grad: the graph is cut here and the adjoint can be read off."""
    return map_state(lambda s: s.detach().requires_grad_(True), state)


def zeros_like_state(state: State) -> State:
    return map_state(torch.zeros_like, state)


def shift_rows(state: State, by: int) -> State:
    """Move rows ``by`` places towards the start (rows that fall off are dropped, zeros come in)."""

    def shift(s: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(s)
        n = s.shape[1]
        if 0 < by < n:
            out[:, : n - by] = s[:, by:]
        elif by == 0:
            out.copy_(s)
        return out

    return map_state(shift, state)


def states_every(model: nn.Module, data: Batch, every: int, state: State, count: int | None = None) -> list[State]:
    """States at positions ``0, every, 2·every, …`` (``count`` of them; default ⌈T/every⌉), no gradient.

    One fused call per stretch of ``every`` steps, as the engine runs a chunk.
    """
    core = core_fn(model)
    n = count if count is not None else math.ceil(data.length / every)
    out = [map_state(lambda s: s.detach(), state)]
    with torch.no_grad():
        for i in range(1, n):
            _, state = core(data.inputs[:, (i - 1) * every : i * every], state)
            out.append(map_state(lambda s: s.detach(), state))
    return out


def blocked(x: torch.Tensor, width: int, blocks: int) -> torch.Tensor:
    """``[B, T, ...]`` → ``[blocks·B, width, ...]``: block ``b`` (steps ``b·width…``) in rows ``b·B…``.

    Steps past T are zero (padding; give them zero loss weight).
    """
    B, T = x.shape[0], x.shape[1]
    pad = blocks * width - T
    if pad > 0:
        x = torch.cat([x, x.new_zeros((B, pad, *x.shape[2:]))], dim=1)
    x = x[:, : blocks * width].reshape(B, blocks, width, *x.shape[2:])
    return x.transpose(0, 1).reshape(blocks * B, width, *x.shape[3:])


def dense_states(model: nn.Module, data: Batch, state: State) -> State:
    """States at every position ``0..T-1`` stacked position-major: rows ``p·B … p·B+B-1`` hold position p.

    Computed with about 2√T sequential calls: fused stretches of ``w ≈ √T`` steps give the states at
    multiples of w, then ``w`` single steps run on all stretches at once.
    """
    B, T = data.batch_size, data.length
    width = max(1, math.isqrt(T))
    blocks = math.ceil(T / width)
    starts = cat_states(states_every(model, data, width, state, blocks))
    inputs = blocked(data.inputs, width, blocks)
    core = core_fn(model)
    by_offset = [starts]
    current = starts
    with torch.no_grad():
        for i in range(width - 1):
            _, current = core(inputs[:, i : i + 1], current)
            by_offset.append(map_state(lambda s: s.detach(), current))
    # by_offset[i] rows b·B.. hold position b·width + i; reorder to position-major and cut at T.
    pieces = []
    for j in range(len(parts(state))):
        t = torch.stack([parts(s)[j] for s in by_offset], dim=1)  # [d0, width, blocks·B, ...]
        rest = t.shape[3:]
        t = t.reshape(t.shape[0], width, blocks, B, *rest).transpose(1, 2)
        pieces.append(t.reshape(t.shape[0], blocks * width * B, *rest)[:, : T * B])
    return like(state, pieces)


def prepare(model: nn.Module, source, state: State | None):  # type: ignore[no-untyped-def]
    """What a whole-sequence analysis starts from: trainable parameter names and tensors, the whole
    source on the parameters' device and dtype, and the (checked) initial state."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    first = params[0] if params else None
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None else torch.get_default_dtype()
    data = source.slice(0, source.length).to(device, dtype)
    h0 = model.initial_state(source.batch_size) if state is None else state
    check_state(h0)
    return names, params, data, h0
