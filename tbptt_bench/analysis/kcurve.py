"""Whole K curves in one pass: chunked and TBPTT gradients for a grid of K that share their work.

A method is *chunk-shaped* when its updates (its mask, :mod:`tbptt_bench.core.mask`) are consecutive
segments of ``k1`` losses whose window reaches ``ext ≥ 0`` steps before the segment's first loss
(clipped at the sequence start): ``chunked:k`` is ``(k1 = k, ext = 0)``, ``tbptt:k1,k2`` with
``k2 ≥ k1`` is ``(k1, ext = k2 - k1)``. The shape is read from the method's update list, so the
truncation semantics stay in one place.

**Nesting.** Let ``Λ_K(c)`` be the adjoint, at the first state of chunk ``c`` of ``chunked(K)``, of
the losses of that chunk. When ``K' = m·K``, a chunk of K' is m chunks of K, and adjoints are linear in
the losses injected into them, so

    chunked(K') = chunked(K) + Σ_{chunks of K'} Σ_{q<m-1} [backward through sub-chunk q of the adjoint
                  that the losses of sub-chunks q+1..m-1 leave at its end]

and ``Λ_K'`` is what those backward passes leave at the chunk start plus ``Λ_K`` of the first
sub-chunk. A grid K_0 | K_1 | … | K_n is one ladder: the base ``chunked(g)`` (g = the gcd of the grid
and of the TBPTT extensions) costs one backward pass, each rung about ``(1 - 1/m)`` of one. A TBPTT
method adds the backward pass of ``Λ_{k1}`` through the ``ext`` steps before each chunk; methods with
the same k1 share it (the shorter extension is a prefix of the longer).

**Layout.** The sequence is cut into blocks of ``W = max K`` steps (the last block zero-padded with
zero loss weight), the blocks stacked along the batch (``⌈T/W⌉·B`` rows), and the core run from the
stored block-start states in fused calls that each start from a leaf state: every backward pass above
is one ``autograd.grad`` call on segments of that graph, with the adjoint injected through the
segments' final states. Two stages when the grid allows: rungs up to a split level S ≈ √(g·W) run on
a graph of g-step segments over blocks of S steps (its block starts are the segment starts of the
coarse graph), rungs above S on a graph of S-step segments over blocks of W — the same arithmetic with
about a tenth of the kernel calls. TBPTT extensions run on the stage their k1 belongs to (one stage
only, if an extension does not fit S-step segments). Cost measured in ``benchmarks/bench_kcurve.py``
(docs/bias.md); memory about that of one full BPTT graph.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from functools import reduce
from typing import Sequence

import torch
from torch import nn

from tbptt_bench.analysis.gradients import true_gradient
from tbptt_bench.core.engine import Source, step_loss_sum
from tbptt_bench.errors import UsageError
from tbptt_bench.methods.base import Method, parse_method
from tbptt_bench.models.protocol import State, check_protocol, cross_cut_parts
from tbptt_bench.tasks.base import Batch
from tbptt_bench.core.trajectory import (
    blocked, cat_states, core_fn, leaf, like, parts, prepare, readout_fn, shift_rows, states_every,
)
from tbptt_bench.models.protocol import map_state

log = logging.getLogger(__name__)

Gradient = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ChunkShape:
    """Updates of ``k1`` losses whose window starts ``ext`` steps before their first loss."""

    k1: int
    ext: int


def chunk_shape(method: Method | str, length: int) -> ChunkShape | None:
    """The chunk shape of a method's updates over ``length`` steps, or None if it has none."""
    method = parse_method(method)
    updates = method.updates(length)
    if not updates or any(u.scales or u.max_lag is not None for u in updates):
        return None
    k1 = updates[0].loss_end - updates[0].loss_start
    ext = max(u.loss_start - u.window_start for u in updates)
    for i, u in enumerate(updates):
        a = i * k1
        if (u.loss_start, u.loss_end, u.window_start) != (a, min(a + k1, length), max(0, a - ext)):
            return None
    if updates[-1].loss_end != length or ext < 0:
        return None
    return ChunkShape(k1, ext)


@dataclass
class Ladder:
    """Chunk lengths that divide each other, and the methods computed from them."""

    levels: list[int]
    methods: list[tuple[Method, ChunkShape]] = field(default_factory=list)

    @property
    def base(self) -> int:
        exts = [s.ext for _, s in self.methods if s.ext > 0]
        return reduce(math.gcd, self.levels + exts)


def plan(methods: Sequence[Method | str], length: int) -> tuple[list[Ladder], list[Method]]:
    """Group chunk-shaped methods into ladders of nested k1; return the ladders and the other methods."""
    shaped: list[tuple[Method, ChunkShape]] = []
    others: list[Method] = []
    for m in methods:
        method = parse_method(m)
        shape = chunk_shape(method, length)
        if shape is None:
            others.append(method)
        else:
            shaped.append((method, shape))
    ladders: list[Ladder] = []
    for k1 in sorted({s.k1 for _, s in shaped}):
        home = next((lad for lad in ladders if k1 % lad.levels[-1] == 0), None)
        if home is None:
            ladders.append(Ladder([k1]))
        else:
            home.levels.append(k1)
    for method, shape in shaped:
        next(lad for lad in ladders if shape.k1 in lad.levels).methods.append((method, shape))
    return ladders, others


class _Graph:
    """A block-stacked forward pass, cut into leaf-started segments of ``g`` steps.

    ``starts`` holds the state at the start of every block of ``width`` steps (block ``b`` in rows
    ``b·B…``); the sequence is zero-padded to whole blocks. ``loss`` (Σ ℓ_t over the sequence) is
    built only when asked for.
    """

    def __init__(self, model: nn.Module, data: Batch, loss_kind: str, starts: State, width: int, g: int,
                 with_loss: bool = True) -> None:
        B = data.batch_size
        self.B, self.width, self.g = B, width, g
        self.blocks = parts(starts)[0].shape[1] // B
        self.segments = width // g
        x = blocked(data.inputs, width, self.blocks)
        core = core_fn(model)
        self.leaves: list[State] = []
        self.outs: list[State] = []
        features = []
        current = starts
        for i in range(self.segments):
            start = leaf(current)
            f, current = core(x[:, i * g : (i + 1) * g], start)
            self.leaves.append(start)
            self.outs.append(current)
            features.append(f)
        self.loss: torch.Tensor | None = None
        if with_loss:
            batch = Batch(x, blocked(data.targets, width, self.blocks), blocked(data.weights, width, self.blocks))
            self.loss = step_loss_sum(readout_fn(model)(torch.cat(features, dim=1)), batch, loss_kind, B)

    def starts_every_segment(self) -> State:
        """The segment-start states re-stacked as blocks of ``g`` steps (block-major), for a finer graph."""
        B, per = self.B, self.segments
        out = []
        for j in range(len(parts(self.leaves[0]))):
            t = torch.stack([parts(s)[j].detach() for s in self.leaves], dim=1)  # [d0, per, blocks·B, ...]
            rest = t.shape[3:]
            t = t.reshape(t.shape[0], per, self.blocks, B, *rest).transpose(1, 2)
            out.append(t.reshape(t.shape[0], self.blocks * per * B, *rest))
        return like(self.leaves[0], out)


def _add(a: list[torch.Tensor], b: Sequence[torch.Tensor | None]) -> None:
    for i, g in enumerate(b):
        if g is not None:
            a[i] += g


def _grad_states(grads: Sequence[torch.Tensor | None], templates: Sequence[State]) -> list[tuple[torch.Tensor, ...]]:
    """Split a flat gradient list back into per-segment state tuples (zeros where unused)."""
    out, i = [], 0
    for tpl in templates:
        ps = parts(tpl)
        out.append(tuple(grads[i + j] if grads[i + j] is not None else torch.zeros_like(p) for j, p in enumerate(ps)))
        i += len(ps)
    return out


def _backward(graph: _Graph, params: list[torch.Tensor], segs: list[int], adjoints: list[tuple[torch.Tensor, ...]]
              ) -> tuple[Sequence[torch.Tensor | None], list[tuple[torch.Tensor, ...]]]:
    """Inject ``adjoints`` at the final states of segments ``segs``; parameter and start-state gradients."""
    outputs = [t for s in segs for t in parts(graph.outs[s])]
    cots = [t for a in adjoints for t in a]
    starts = [graph.leaves[s] for s in segs]
    inputs = [t for s in starts for t in parts(s)]
    grads = torch.autograd.grad(outputs, [*params, *inputs], grad_outputs=cots, retain_graph=True, allow_unused=True)
    return grads[: len(params)], _grad_states(grads[len(params):], starts)


def _base(graph: _Graph, params: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[tuple[torch.Tensor, ...]]]:
    """chunked(g) (every segment alone, with its losses) and Λ_g of every segment."""
    assert graph.loss is not None
    grads = torch.autograd.grad(graph.loss, [*params, *(t for s in graph.leaves for t in parts(s))],
                                retain_graph=True, allow_unused=True)
    total = [torch.zeros_like(p) for p in params]
    _add(total, grads[: len(params)])
    return total, _grad_states(grads[len(params):], graph.leaves)


def _climb(graph: _Graph, params: list[torch.Tensor], levels: list[int], lam: list[tuple[torch.Tensor, ...]],
           level_grad: dict[int, list[torch.Tensor]]) -> dict[int, list[tuple[torch.Tensor, ...]]]:
    """Rungs ``levels[0] → levels[1] → …`` on one graph; fills ``level_grad``, returns Λ of every level.

    ``lam`` holds Λ of ``levels[0]`` per chunk of that length within a block (block-local index).
    """
    g = graph.g
    lams = {levels[0]: lam}
    for prev, level in zip(levels[:-1], levels[1:]):
        m, n = level // prev, prev // g
        chunks = graph.width // level
        cross = [torch.zeros_like(p) for p in params]
        rho = [lam[c * m + m - 1] for c in range(chunks)]
        for q in range(m - 2, -1, -1):
            mu = rho
            for r in range(n):
                segs = [(c * level + q * prev) // g + n - 1 - r for c in range(chunks)]
                pg, mu = _backward(graph, params, segs, mu)
                _add(cross, pg)
            rho = [tuple(a + b for a, b in zip(lam[c * m + q], mu[c])) for c in range(chunks)]
        lam = rho
        lams[level] = lam
        level_grad[level] = [a + b for a, b in zip(level_grad[prev], cross)]
    return lams


def _split_level(ladder: Ladder, levels: list[int]) -> int | None:
    """The rung where a coarser graph takes over (two stages), or None for one stage.

    Fine segments (``g`` steps) are needed only below it; above, segments of ``split`` steps cut the
    number of kernel calls. Chosen near √(g·W); every TBPTT extension must fit one of the stages.
    """
    g, top = levels[0], levels[-1]
    inner = [lv for lv in levels[1:-1] if lv * lv <= g * top]
    if not inner:
        return None
    split = inner[-1]
    if any(s.ext and s.k1 > split and s.ext % split for _, s in ladder.methods):
        return None
    return split


def _to_coarse(lam: tuple[torch.Tensor, ...], coarse: _Graph, per: int) -> list[tuple[torch.Tensor, ...]]:
    """Λ of the fine blocks (block ``b·per + c`` in rows) as one entry per coarse segment ``c``."""
    B = coarse.B
    out = []
    for c in range(per):
        out.append(tuple(t.reshape(t.shape[0], coarse.blocks, per, B, *t.shape[2:])[:, :, c]
                         .reshape(t.shape[0], coarse.blocks * B, *t.shape[2:]) for t in lam))
    return out


def _ladder_gradients(model: nn.Module, data: Batch, loss_kind: str, state: State, ladder: Ladder,
                      names: list[str], params: list[torch.Tensor]) -> dict[Method, Gradient]:
    g = ladder.base
    levels = sorted(set(ladder.levels) | {g})
    top = levels[-1]
    starts = cat_states(states_every(model, data, top, state, math.ceil(data.length / top)))
    split = _split_level(ladder, levels)
    level_grad: dict[int, list[torch.Tensor]] = {}
    if split is None:
        fine = coarse = _Graph(model, data, loss_kind, starts, top, g)
        level_grad[g], lam = _base(fine, params)
        lams = _climb(fine, params, levels, lam, level_grad)
    else:
        # Coarse graph first (segments of `split` steps): its segment starts are the fine graph's blocks.
        coarse = _Graph(model, data, loss_kind, starts, top, split, with_loss=False)
        fine = _Graph(model, data, loss_kind, coarse.starts_every_segment(), split, g)
        level_grad[g], lam = _base(fine, params)
        lams = _climb(fine, params, [lv for lv in levels if lv <= split], lam, level_grad)
        coarse_lams = _climb(coarse, params, [lv for lv in levels if lv >= split],
                             _to_coarse(lams[split][0], coarse, top // split), level_grad)
    out: dict[Method, Gradient] = {}
    for k1 in ladder.levels:
        exts = sorted({s.ext for _, s in ladder.methods if s.k1 == k1})
        if split is None or k1 <= split:
            ext_grad = _extensions(fine, params, lams[k1], k1, exts)
        else:
            ext_grad = _extensions(coarse, params, coarse_lams[k1], k1, exts)
        for method, shape in ladder.methods:
            if shape.k1 == k1:
                total = [a + b for a, b in zip(level_grad[k1], ext_grad[shape.ext])]
                out[method] = {n: t.detach().clone() for n, t in zip(names, total)}
    return out


def _extensions(graph: _Graph, params: list[torch.Tensor], lam: list[tuple[torch.Tensor, ...]], k1: int,
                exts: list[int]) -> dict[int, list[torch.Tensor]]:
    """Parameter gradient of pushing each ``Λ_{k1}`` back ``ext`` steps before its chunk, for each ext."""
    acc = [torch.zeros_like(p) for p in params]
    out = {0: [a.clone() for a in acc]}
    g, B = graph.g, graph.B
    mu = list(lam)
    offset = [c * k1 // g for c in range(len(lam))]
    for depth in range(1, max(exts, default=0) // g + 1):
        for c in range(len(mu)):
            if offset[c] == 0:  # step into the previous block: its rows sit B rows earlier
                mu[c] = tuple(parts(shift_rows(mu[c], B)))
                offset[c] = graph.segments
            offset[c] -= 1
        pg, mu = _backward(graph, params, list(offset), mu)
        _add(acc, pg)
        if depth * g in exts:
            out[depth * g] = [a.clone() for a in acc]
    return out


def kcurve_gradients(
    model: nn.Module,
    source: Source,
    loss_kind: str,
    methods: Sequence[Method | str],
    state: State | None = None,
) -> dict[Method, Gradient]:
    """ĝ of every chunk-shaped method in ``methods`` (others are left out), sharing work along ladders.

    Returns ``{method: {parameter name: gradient}}``, equal to :func:`~tbptt_bench.analysis.gradients.method_gradient`
    of each method up to floating-point rounding. A model with state parts that cross a cut
    (docs/design.md §7.1) gets nothing here: the nesting assumes a cut detaches the whole state, so its
    callers fall back to one engine run per method.
    """
    check_protocol(model)
    if cross_cut_parts(model):
        return {}
    T = source.length
    ladders, _ = plan(methods, T)
    if not ladders:
        return {}
    names, params, data, h0 = prepare(model, source, state)
    out: dict[Method, Gradient] = {}
    for ladder in ladders:
        log.debug("k-curve ladder %s (base %d) for %s", ladder.levels, ladder.base, [m.spec for m, _ in ladder.methods])
        out.update(_ladder_gradients(model, data, loss_kind, h0, ladder, names, params))
    return out


# --------------------------------------------------------------------------- long horizons


@dataclass
class StreamedCurve:
    """chunked(K) gradients for a nested grid of K and (optionally) the true gradient, over one source."""

    gradients: dict[int, Gradient]
    truth: Gradient | None
    span: int
    checkpoint: int


def _check_grid(ks: Sequence[int], length: int) -> list[int]:
    """The grid sorted; refuses K outside 1..T and grids whose K do not divide each other."""
    grid = sorted(set(int(k) for k in ks))
    if not grid:
        raise UsageError("the K grid is empty; give at least one chunk length K ≥ 1")
    if grid[0] < 1 or grid[-1] > length:
        raise UsageError(f"every K must lie in 1..T = 1..{length}, got {grid}")
    bad = [(a, b) for a, b in zip(grid, grid[1:]) if b % a]
    if bad:
        raise UsageError(f"the streamed K curve needs nested K (each dividing the next), but {bad[0][0]} does "
                         f"not divide {bad[0][1]}; use dyadic K (1, 2, 4, …) or kcurve_gradients for other grids")
    return grid


def _default_span(grid: list[int], length: int) -> int:
    """The largest grid K not above ~2√T (at least the smallest K): the ladder's block length."""
    cap = max(grid[0], 2 * math.isqrt(length))
    return max(k for k in grid if k <= cap)


def _accumulate(total: Gradient | None, part: Gradient) -> Gradient:
    if total is None:
        return {n: t.clone() for n, t in part.items()}
    for n, t in part.items():
        total[n] += t
    return total


def streamed_chunked_curve(
    model: nn.Module,
    source: Source,
    loss_kind: str,
    ks: Sequence[int],
    *,
    state: State | None = None,
    span: int | None = None,
    checkpoint: int | None = None,
    with_truth: bool = True,
) -> StreamedCurve:
    """chunked(K) for every K of a nested grid, and g, with memory independent of T up to O(T/span) states.

    Exact because a chunk of K never crosses a multiple of a larger grid K (docs/design.md §2.5: chunked
    cuts at multiples of K, the trailing chunk an update of its own, §2.6). K ≤ ``span`` (default: the
    largest grid K ≤ 2√T): the nested ladder (:func:`kcurve_gradients`) on consecutive slices of
    ``span`` steps, each from the state the slice starts in; memory one ladder graph of ``span`` steps.
    K > ``span``: the sum over chunks of full BPTT on each chunk from its stored start state, with
    activations recomputed per ``checkpoint`` steps (default ``span``); memory ~K/C + C states.
    g: ``full:checkpoint=C`` (§3.8). Data are read one slice at a time (``source.slice``).
    """
    check_protocol(model)
    T = source.length
    grid = _check_grid(ks, T)
    span = _default_span(grid, T) if span is None else span
    if span < 1 or any(k <= span and span % k for k in grid):
        raise UsageError(f"span must be a positive multiple of every grid K it covers, got span={span} for K={grid}")
    checkpoint = span if checkpoint is None else checkpoint
    if checkpoint < 1:
        raise UsageError(f"checkpoint must be ≥ 1 steps, got {checkpoint}")
    h = model.initial_state(source.batch_size) if state is None else state
    small = [k for k in grid if k <= span]
    large = [k for k in grid if k > span]
    grads: dict[int, Gradient | None] = {k: None for k in grid}
    starts: dict[int, State] = {}
    core = core_fn(model)
    first = next(model.parameters())
    for a in range(0, T, span):
        b = min(a + span, T)
        starts[a] = map_state(lambda s: s.detach(), h)
        piece = source.slice(a, b)
        if small:
            specs = {k: f"chunked:k={k}" for k in small}
            out = kcurve_gradients(model, piece, loss_kind, list(specs.values()), state=h)
            by_spec = {m.spec: g for m, g in out.items()}
            for k, spec in specs.items():
                grads[k] = _accumulate(grads[k], by_spec[spec])
        with torch.no_grad():
            _, h = core(piece.to(first.device, first.dtype).inputs, h)
    for k in large:
        for a in range(0, T, k):
            part = true_gradient(model, source.slice(a, min(a + k, T)), loss_kind, state=starts[a],
                                 checkpoint=checkpoint)
            grads[k] = _accumulate(grads[k], part)
        log.debug("streamed chunked(%d): %d chunks", k, math.ceil(T / k))
    truth = None
    if with_truth:
        h0 = model.initial_state(source.batch_size) if state is None else state
        truth = true_gradient(model, source, loss_kind, state=h0, checkpoint=checkpoint)
    return StreamedCurve({k: g for k, g in grads.items() if g is not None}, truth, span, checkpoint)


def effective_context(relative_bias: dict[int, float], level: float) -> int | None:
    """The smallest K whose relative bias is at most ``level`` (None if no K of the curve reaches it)."""
    ok = [k for k, v in sorted(relative_bias.items()) if v <= level]
    return ok[0] if ok else None
