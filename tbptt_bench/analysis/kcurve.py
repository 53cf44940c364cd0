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
sub-chunk. A grid K_0 | K_1 | … | K_n is one ladder: the base ``chunked(g)`` (g = the gcd of the fine stage's K
and of the TBPTT extensions) costs one backward pass, each rung about ``(1 - 1/m)`` of one. A TBPTT
method adds the backward pass of ``Λ_{k1}`` through the ``ext`` steps before each chunk; methods with
the same k1 share it (the shorter extension is a prefix of the longer), and for every m-th chunk it is
the first backward pass of the rung above, kept at that depth instead of run again.

**Layout.** The sequence is cut into blocks of ``W = max K`` steps (the last block zero-padded with
zero loss weight), the blocks stacked along the batch (``⌈T/W⌉·B`` rows), and the core run from the
stored block-start states in fused calls that each start from a leaf state at a cut point: every
backward pass above is one ``autograd.grad`` call on segments of that graph, with the adjoint injected
through the segments' final states. Two stages when the grid allows: rungs up to a split level
S ≈ √(g·W) run on a graph cut every g steps over blocks of S steps (its block starts are states of the
coarse graph), rungs above S on a graph cut at multiples of S and ``e`` steps before every chunk start
for each coarse extension ``e`` — the same arithmetic with about a tenth of the kernel calls.
Ladders run on spans of about :data:`SPAN` steps (TBPTT ones after a zero-weighted lead-in).
The passes run on the model's input fold when it declares one (docs/design.md §3.9). Cost measured in ``benchmarks/bench_kcurve.py``
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
from tbptt_bench.models.protocol import State, check_protocol, cross_cut_parts, input_fold
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
    """A block-stacked forward pass, cut into leaf-started segments at the positions ``bounds``.

    ``starts`` holds the state at the start of every block of ``width`` steps (block ``b`` in rows
    ``b·B…``); the sequence is zero-padded to whole blocks. ``bounds`` (``0 = b_0 < … < b_n = width``)
    are the block positions where a segment starts; the same cut points hold in every block. ``loss``
    (Σ ℓ_t over the sequence) is built only when asked for.
    """

    def __init__(self, model: nn.Module, data: Batch, loss_kind: str, starts: State, width: int,
                 bounds: Sequence[int], with_loss: bool = True) -> None:
        B = data.batch_size
        self.B, self.width, self.bounds = B, width, list(bounds)
        assert self.bounds[0] == 0 and self.bounds[-1] == width and self.bounds == sorted(set(self.bounds))
        self.index = {pos: i for i, pos in enumerate(self.bounds)}
        self.blocks = parts(starts)[0].shape[1] // B
        self.segments = len(self.bounds) - 1
        x = blocked(data.inputs, width, self.blocks)
        core = core_fn(model)
        self.leaves: list[State] = []
        self.outs: list[State] = []
        features = []
        current = starts
        for a, b in zip(self.bounds[:-1], self.bounds[1:]):
            start = leaf(current)
            f, current = core(x[:, a:b], start)
            self.leaves.append(start)
            self.outs.append(current)
            features.append(f)
        self.loss: torch.Tensor | None = None
        if with_loss:
            batch = Batch(x, blocked(data.targets, width, self.blocks), blocked(data.weights, width, self.blocks))
            self.loss = step_loss_sum(readout_fn(model)(torch.cat(features, dim=1)), batch, loss_kind, B)

    def length(self, segment: int) -> int:
        return self.bounds[segment + 1] - self.bounds[segment]

    def path(self, a: int, b: int) -> list[int]:
        """The segments that make up block positions ``a..b`` (both cut points), last first."""
        return list(range(self.index[b] - 1, self.index[a] - 1, -1))

    def starts_every(self, every: int) -> State:
        """The states at the block positions that are multiples of ``every`` (all cut points), re-stacked
        as blocks of ``every`` steps (block-major): the starts of a finer graph."""
        chosen = [self.leaves[self.index[p]] for p in range(0, self.width, every)]
        B, per = self.B, len(chosen)
        out = []
        for j in range(len(parts(chosen[0]))):
            t = torch.stack([parts(s)[j].detach() for s in chosen], dim=1)  # [d0, per, blocks·B, ...]
            rest = t.shape[3:]
            t = t.reshape(t.shape[0], per, self.blocks, B, *rest).transpose(1, 2)
            out.append(t.reshape(t.shape[0], self.blocks * per * B, *rest))
        return like(chosen[0], out)


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


def _hop_lengths(graph: _Graph, paths: list[list[int]]) -> list[int]:
    """The common segment lengths of parallel paths (every chunk is cut alike: the cut points repeat)."""
    lengths = [[graph.length(s) for s in p] for p in paths]
    if any(ls != lengths[0] for ls in lengths):
        raise AssertionError(f"k-curve graph: chunks cut unlike each other ({lengths[:2]}); the cut points must repeat")
    return lengths[0]


def _base(graph: _Graph, params: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[tuple[torch.Tensor, ...]]]:
    """chunked(g) (every segment alone, with its losses) and Λ_g of every segment; segments all of g steps."""
    assert graph.loss is not None and len({graph.length(s) for s in range(graph.segments)}) == 1
    grads = torch.autograd.grad(graph.loss, [*params, *(t for s in graph.leaves for t in parts(s))],
                                retain_graph=True, allow_unused=True)
    total = [torch.zeros_like(p) for p in params]
    _add(total, grads[: len(params)])
    return total, _grad_states(grads[len(params):], graph.leaves)


Snapshots = dict[tuple[int, int], list[torch.Tensor]]


def _climb(graph: _Graph, params: list[torch.Tensor], levels: list[int], lam: list[tuple[torch.Tensor, ...]],
           level_grad: dict[int, list[torch.Tensor]], exts: dict[int, list[int]], snaps: Snapshots
           ) -> dict[int, list[tuple[torch.Tensor, ...]]]:
    """Rungs ``levels[0] → levels[1] → …`` on one graph; fills ``level_grad``, returns Λ of every level.

    ``lam`` holds Λ of ``levels[0]`` per chunk of that length within a block (block-local index). The
    first backward pass of a rung ``K → m·K`` pushes Λ_K of the last K-chunk of every m·K-chunk through
    the K-chunk before it: exactly the TBPTT extension of those chunks. Its parameter gradient after
    ``e`` steps is kept in ``snaps[(K, e)]`` for every extension ``e ≤ K`` in ``exts[K]``.
    """
    lams = {levels[0]: lam}
    for prev, level in zip(levels[:-1], levels[1:]):
        m = level // prev
        chunks = graph.width // level
        cross = [torch.zeros_like(p) for p in params]
        wanted = {e for e in exts.get(prev, []) if 0 < e <= prev}
        rho = [lam[c * m + m - 1] for c in range(chunks)]
        for q in range(m - 2, -1, -1):
            mu = rho
            paths = [graph.path(c * level + q * prev, c * level + (q + 1) * prev) for c in range(chunks)]
            depth = 0
            for r, length in enumerate(_hop_lengths(graph, paths)):
                pg, mu = _backward(graph, params, [p[r] for p in paths], mu)
                _add(cross, pg)
                depth += length
                if q == m - 2 and depth in wanted:
                    snaps[(prev, depth)] = [t.clone() for t in cross]
            rho = [tuple(a + b for a, b in zip(lam[c * m + q], mu[c])) for c in range(chunks)]
        lam = rho
        lams[level] = lam
        level_grad[level] = [a + b for a, b in zip(level_grad[prev], cross)]
    return lams


def _extensions(graph: _Graph, params: list[torch.Tensor], lam: list[tuple[torch.Tensor, ...]], k1: int,
                exts: list[int], chunk_ids: list[int]) -> dict[int, list[torch.Tensor]]:
    """Parameter gradient of pushing ``Λ_{k1}`` of the block-local chunks ``chunk_ids`` back ``e`` steps
    before their chunk, for every ``e`` in ``exts`` (into the previous block where a push crosses one)."""
    acc = [torch.zeros_like(p) for p in params]
    out = {0: [a.clone() for a in acc]}
    B = graph.B
    mu = [lam[c] for c in chunk_ids]
    pos = [c * k1 for c in chunk_ids]
    depth, target = 0, max(exts, default=0)
    while chunk_ids and depth < target:
        for i, p in enumerate(pos):
            if p == 0:  # step into the previous block: its rows sit B rows earlier
                mu[i] = tuple(parts(shift_rows(mu[i], B)))
                pos[i] = graph.width
        segs = [graph.index[p] - 1 for p in pos]
        (length,) = _hop_lengths(graph, [[s] for s in segs])
        pg, mu = _backward(graph, params, segs, mu)
        _add(acc, pg)
        depth += length
        pos = [graph.bounds[s] for s in segs]
        if depth in exts:
            out[depth] = [a.clone() for a in acc]
    return {e: out.get(e, acc) for e in [0, *exts]}


def _split_level(ladder: Ladder, levels: list[int]) -> int | None:
    """The rung where a coarser graph takes over (two stages), or None for one stage.

    Fine segments (``g`` steps) are needed only below it; above, segments of about ``split`` steps cut
    the number of kernel calls. Chosen near √(g·W).
    """
    g, top = levels[0], levels[-1]
    inner = [lv for lv in levels[1:-1] if lv * lv <= g * top]
    return inner[-1] if inner else None


def _to_coarse(lam: tuple[torch.Tensor, ...], coarse: _Graph, per: int) -> list[tuple[torch.Tensor, ...]]:
    """Λ of the fine blocks (block ``b·per + c`` in rows) as one entry per ``split``-chunk ``c`` of a coarse block."""
    B = coarse.B
    out = []
    for c in range(per):
        out.append(tuple(t.reshape(t.shape[0], coarse.blocks, per, B, *t.shape[2:])[:, :, c]
                         .reshape(t.shape[0], coarse.blocks * B, *t.shape[2:]) for t in lam))
    return out


def _bounds(width: int, step: int, period: int, exts: Sequence[int]) -> list[int]:
    """Cut points of a block: every multiple of ``step``, and every position ``e`` steps before a
    multiple of ``period`` for each extension ``e`` (so that each extension ends on a cut point)."""
    cuts = set(range(0, width + 1, step))
    for e in exts:
        cuts.update(p for p in range((-e) % period, width + 1, period))
    return sorted(cuts)


def _ladder_gradients(model: nn.Module, data: Batch, loss_kind: str, state: State, ladder: Ladder,
                      names: list[str], params: list[torch.Tensor], block_starts: list[State] | None = None
                      ) -> dict[Method, Gradient]:
    exts = {k1: sorted({s.ext for _, s in ladder.methods if s.k1 == k1 and s.ext > 0}) for k1 in ladder.levels}
    g = ladder.base
    levels = sorted(set(ladder.levels) | {g})
    top = levels[-1]
    if block_starts is None:
        block_starts = states_every(model, data, top, state, math.ceil(data.length / top))
    starts = cat_states(block_starts)
    split = _split_level(ladder, levels)
    level_grad: dict[int, list[torch.Tensor]] = {}
    snaps: Snapshots = {}
    if split is None:
        fine = _Graph(model, data, loss_kind, starts, top, range(0, top + 1, g))
        level_grad[g], lam = _base(fine, params)
        lams = _climb(fine, params, levels, lam, level_grad, exts, snaps)
        graph_of = {k: fine for k in levels}
    else:
        # Coarse graph first (cut at multiples of `split`, and where a coarse extension ends): its
        # states at multiples of `split` start the fine graph's blocks.
        coarse_exts = [e for k, es in exts.items() if k >= split for e in es]
        coarse = _Graph(model, data, loss_kind, starts, top, _bounds(top, split, split, coarse_exts), with_loss=False)
        fine_exts = [e for k, es in exts.items() if k < split for e in es]
        g_fine = reduce(math.gcd, [lv for lv in levels if lv <= split] + fine_exts)
        fine_levels = sorted({lv for lv in levels if lv <= split} | {g_fine})
        fine = _Graph(model, data, loss_kind, coarse.starts_every(split), split, range(0, split + 1, g_fine))
        level_grad[g_fine], lam = _base(fine, params)
        lams = _climb(fine, params, fine_levels, lam, level_grad, exts, snaps)
        coarse_levels = [lv for lv in levels if lv >= split]
        lams.update(_climb(coarse, params, coarse_levels, _to_coarse(lams[split][0], coarse, top // split),
                           level_grad, exts, snaps))
        graph_of = {k: (fine if k < split else coarse) for k in levels}
    out: dict[Method, Gradient] = {}
    for k1 in ladder.levels:
        above = [lv for lv in levels if lv > k1]
        m = above[0] // k1 if above else 0
        chunk_count = graph_of[k1].width // k1
        ext_grad: dict[int, list[torch.Tensor]] = {0: [torch.zeros_like(p) for p in params]}
        if exts[k1]:
            reused = [e for e in exts[k1] if (k1, e) in snaps]
            # The first rung above k1 pushed Λ of every m-th chunk already; push the others here.
            ids = [c for c in range(chunk_count) if not (reused and c % m == m - 1)]
            explicit = _extensions(graph_of[k1], params, lams[k1], k1, exts[k1], ids)
            if reused:
                missing = [e for e in exts[k1] if e not in reused]
                if missing:  # the reused snapshots miss some extension: push the skipped chunks for those
                    skipped = [c for c in range(chunk_count) if c % m == m - 1]
                    extra = _extensions(graph_of[k1], params, lams[k1], k1, missing, skipped)
                    for e in missing:
                        snaps[(k1, e)] = extra[e]
            for e in exts[k1]:
                ext_grad[e] = [a + b for a, b in zip(explicit[e], snaps[(k1, e)])] if reused else explicit[e]
        for method, shape in ladder.methods:
            if shape.k1 == k1:
                total = [a + b for a, b in zip(level_grad[k1], ext_grad[shape.ext])]
                out[method] = {n: t.detach().clone() for n, t in zip(names, total)}
    return out


def _accumulate(total: Gradient | None, part: Gradient) -> Gradient:
    if total is None:
        return {n: t.clone() for n, t in part.items()}
    for n, t in part.items():
        total[n] += t
    return total


#: Steps per span of a ladder: graphs of about this length stay cache-friendly.
SPAN = 1024


def _spans(model: nn.Module, data: Batch, loss_kind: str, state: State, ladder: Ladder, names: list[str],
           params: list[torch.Tensor]) -> dict[Method, Gradient]:
    """The ladder on consecutive spans of a multiple of its top K (about :data:`SPAN` steps), each from
    the state a no-gradient pass carries there. Chunks of every K never cross a span's end (docs/design.md
    §2.5); a TBPTT window that reaches back past a span's start is served by a lead-in of whole top-K
    chunks before the span whose losses weigh zero. So the sum over spans is exact."""
    top = max(ladder.levels)
    span = max(top, SPAN // top * top)
    if data.length <= span:
        return _ladder_gradients(model, data, loss_kind, state, ladder, names, params)
    reach = max(s.ext for _, s in ladder.methods)
    lead = -(-reach // top) * top
    total: dict[Method, Gradient | None] = {m: None for m, _ in ladder.methods}
    starts = states_every(model, data, top, state)  # starts[i]: the state at step i·top
    for a in range(0, data.length, span):
        first = max(0, a - lead)
        piece = data.slice(first, min(a + span, data.length))
        if first < a:
            weights = piece.weights.clone()
            weights[:, : a - first] = 0
            piece = Batch(piece.inputs, piece.targets, weights)
        blocks = starts[first // top : math.ceil((first + piece.length) / top)]
        for method, g in _ladder_gradients(model, piece, loss_kind, blocks[0], ladder, names, params, blocks).items():
            total[method] = _accumulate(total[method], g)
    return {m: g for m, g in total.items() if g is not None}


def kcurve_gradients(
    model: nn.Module,
    source: Source,
    loss_kind: str,
    methods: Sequence[Method | str],
    state: State | None = None,
    fold: bool = True,
) -> dict[Method, Gradient]:
    """ĝ of every chunk-shaped method in ``methods`` (others are left out), sharing work along ladders.

    Returns ``{method: {parameter name: gradient}}``, equal to :func:`~tbptt_bench.analysis.gradients.method_gradient`
    of each method up to floating-point rounding. With ``fold`` the passes run on the model's input
    fold when it declares one (docs/design.md §3.9) and the gradients are mapped back. A model with
    state parts that cross a cut (docs/design.md §7.1) gets nothing here: the nesting assumes a cut
    detaches the whole state, so its callers fall back to one engine run per method.
    """
    check_protocol(model)
    if cross_cut_parts(model):
        return {}
    T = source.length
    ladders, _ = plan(methods, T)
    if not ladders:
        return {}
    folded = input_fold(model) if fold else None
    target = folded.model if folded is not None else model
    names, params, data, h0 = prepare(target, source, state)
    out: dict[Method, Gradient] = {}
    for ladder in ladders:
        log.debug("k-curve ladder %s (base %d) for %s", ladder.levels, ladder.base, [m.spec for m, _ in ladder.methods])
        out.update(_spans(target, data, loss_kind, h0, ladder, names, params))
    if folded is not None:
        out = {m: folded.pullback(g) for m, g in out.items()}
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
