"""SnAp-n with sparse storage (Menick et al. 2021): the influence matrix kept only on its pattern.

SnAp-n carries ``M_t = Π_n ⊙ (D_t M_{t−1} + I_t)`` (docs/online.md), where ``Π_n`` keeps entry (i, p) iff
parameter p reaches state entry i within n steps. :class:`~tbptt_bench.core.forward_mode.Influence` computes
that densely (``B·S·P`` numbers, RTRL's cost). Here only the pattern's K entries are stored, per batch row,
and both terms are formed on them directly:

* **the immediate term.** In the built-in cells every core parameter enters through a pre-activation
  ``g = W a + b`` (``a`` the layer's input or its previous ``h``), so ``∂⁺s/∂W[r, c] = (∂⁺s/∂b[r]) · a[c]``:
  the immediate Jacobian is the Jacobian with respect to the biases (``S ×`` gates·H per layer) times one
  input entry. The encoder enters through the first layer's ``W_ih``, so its columns are
  ``(∂⁺s/∂b_ih⁰) W_ih⁰`` times the one-hot token or the input entry (1 for a bias). Each stored entry is
  therefore one product ``C[i, q] · a[f]`` of a small source matrix ``C`` (``[S, Q]``, Q ≈ 2·gates·H·L + H)
  and a factor vector ``a``; the indices (q, f) are fixed per parameter. No ``S × P`` Jacobian is formed.
* **the recursion.** ``(D M)[i, p] = Σ_j D[i, j] M[j, p]`` over the pairs with (i, p) and (j, p) both in the
  pattern and ``D[i, j]`` structurally nonzero; the pairs are listed once, and a step is a gather, a product and
  an ``index_add`` (no host-device synchronisation).

The pattern is read off Jacobians at random θ (a sparse core's pruned weights masked, so they have no entries
at all), random states and every token, as the dense pattern is, but assembled from index lists, never as an
``S × P`` matrix: the stored entries (:attr:`SparseInfluence.entries`) are exactly the pattern's size.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import jacrev, vmap

from tbptt_bench.core.forward_mode import GATES, CellFunction
from tbptt_bench.errors import UsageError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SparsePattern:
    """SnAp-n's pattern as index lists: ``rows[e]``, ``cols[e]`` the state entry and parameter of stored entry
    ``e`` (sorted by parameter, then state entry); ``pair_out``, ``pair_in``, ``pair_d`` the recursion's terms
    ``M'[pair_out] += D.flat[pair_d] · M[pair_in]``."""

    rows: torch.Tensor
    cols: torch.Tensor
    pair_out: torch.Tensor
    pair_in: torch.Tensor
    pair_d: torch.Tensor

    @property
    def size(self) -> int:
        """Stored entries per batch row."""
        return int(self.rows.numel())


class ImmediateFactors:
    """The built-in cells' immediate Jacobian as ``I[i, p] = C[i, source[p]] · a[factor[p]]`` (module docstring)."""

    def __init__(self, cell: CellFunction) -> None:
        if type(cell) is not CellFunction:
            raise UsageError("sparse SnAp steps the built-in rnn/lstm/gru cells only")
        self.cell = cell
        self.embedding = isinstance(cell.model.encoder, nn.Embedding)
        H, L, G = cell.hidden, cell.layers, GATES[cell.cell]
        self.bias_names = [f"rnn.bias_{k}_l{layer}" for layer in range(L) for k in ("ih", "hh")]
        self.bias_index = [cell.names.index(n) for n in self.bias_names]
        # factor vector a: [1, inp⁰ (H), h⁰_{t−1} (H), inp¹, h¹_{t−1}, …, encoder columns]
        enc = cell.model.encoder
        width = enc.num_embeddings if self.embedding else enc.in_features
        source, factor, keep = [], [], []
        for name, shape in zip(cell.names, cell.shapes):
            grid = torch.arange(shape.numel()).view(shape)
            if name.startswith("encoder."):
                enc_col = 2 * G * H * L  # J_enc = (∂⁺s/∂b_ih⁰) W_ih⁰ follows the bias columns
                if name == "encoder.weight" and self.embedding:  # [V, H]: token v, unit d
                    source.append(enc_col + grid % H)
                    factor.append(1 + 2 * H * L + grid // H)
                elif name == "encoder.weight":  # [H, in]: unit d, input c
                    source.append(enc_col + grid // width)
                    factor.append(1 + 2 * H * L + grid % width)
                else:  # encoder.bias [H]
                    source.append(enc_col + grid)
                    factor.append(torch.zeros_like(grid))
                keep.append(torch.ones(shape.numel(), dtype=torch.bool))
                continue
            kind, layer = name[len("rnn."):].rsplit("_l", 1)
            layer_i = int(layer)
            block = (2 * layer_i + (1 if kind.endswith("hh") else 0)) * G * H
            if kind.startswith("bias"):
                source.append(block + grid)
                factor.append(torch.zeros_like(grid))
            else:
                source.append(block + grid // H)
                factor.append(1 + (2 * layer_i + (1 if kind == "weight_hh" else 0)) * H + grid % H)
            mask = cell.model.recurrent_mask(layer_i) if kind == "weight_hh" else None
            keep.append(torch.ones(shape.numel(), dtype=torch.bool) if mask is None else mask.reshape(-1).cpu())
        self.source = torch.cat([t.reshape(-1) for t in source])
        self.factor = torch.cat([t.reshape(-1) for t in factor])
        self.kept = torch.cat(keep)  # False on a sparse core's pruned weights: never in the pattern
        self.Q = 2 * G * H * L + H

    def jacobians(self, theta: tuple[torch.Tensor, ...], x: torch.Tensor, s: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per row: the new state ``[B, S]``, ``D_t`` ``[B, S, S]``, the source matrix ``C`` ``[B, S, Q]`` and the
        factor vector ``a`` ``[B, F]``."""
        cell, H, L = self.cell, self.cell.hidden, self.cell.layers

        def step(biases: tuple[torch.Tensor, ...], xr: torch.Tensor, sr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            full = list(theta)
            for i, b in zip(self.bias_index, biases):
                full[i] = b
            out = cell.row(tuple(full), xr, sr)
            return out, out

        biases = tuple(theta[i] for i in self.bias_index)
        (d_bias, D), s_new = vmap(jacrev(step, argnums=(0, 2), has_aux=True), in_dims=(None, 0, 0))(biases, x, s)
        p = dict(zip(cell.names, theta))
        j_enc = torch.matmul(d_bias[0], p["rnn.weight_ih_l0"])  # [B, S, H]: ∂⁺s/∂(encoder output)
        C = torch.cat(list(d_bias) + [j_enc], dim=2)
        if self.embedding:
            inp, columns = F.embedding(x, p["encoder.weight"]), F.one_hot(x, p["encoder.weight"].shape[0]).to(s.dtype)
        else:
            inp, columns = F.linear(x, p["encoder.weight"], p.get("encoder.bias")), x
        parts = [s.new_ones(s.shape[0], 1)]
        for layer in range(L):
            parts += [inp, s[:, layer * H:(layer + 1) * H]]
            inp = s_new[:, layer * H:(layer + 1) * H]
        return s_new.detach(), D, C, torch.cat(parts + [columns], dim=1)

    def pattern(self, n: int, generator: torch.Generator) -> SparsePattern:
        """SnAp-n's pattern, read off the Jacobians at random θ and states and (tokens) every token."""
        cell = self.cell
        ref = cell.theta()[0]
        theta = tuple(torch.randn(t.shape, generator=generator, dtype=ref.dtype).to(ref.device) for t in cell.theta())
        enc = cell.model.encoder
        if self.embedding:
            x = torch.arange(enc.num_embeddings, device=ref.device)
        else:
            x = torch.randn(4, enc.in_features, generator=generator, dtype=ref.dtype).to(ref.device)
        s = torch.randn(x.shape[0], cell.S, generator=generator, dtype=ref.dtype).to(ref.device)
        _, D, C, _ = self.jacobians(theta, x, s)
        reach = _Adjacency((C != 0).any(0).cpu().T)  # source column q → the state entries it reaches
        children = _Adjacency((D != 0).any(0).cpu().T)  # state entry j → the i with D[i, j] structurally nonzero
        S = cell.S
        params = torch.nonzero(self.kept).squeeze(1)
        p1, i1 = reach.expand(params, self.source[params])
        first = p1 * S + i1
        keys = first
        for _ in range(n - 1):
            p2, i2 = children.expand(keys // S, keys % S)
            keys = torch.unique(torch.cat([first, p2 * S + i2]))
        keys = torch.unique(keys)  # sorted: by parameter, then state entry
        cols, rows = keys // S, keys % S
        # recursion pairs: entry (j, p) feeds (i, p) for every child i of j whose entry is in the pattern
        e_in, i_rep = children.expand(torch.arange(keys.numel()), rows)
        target = cols[e_in] * S + i_rep
        pos = torch.searchsorted(keys, target).clamp(max=max(keys.numel() - 1, 0))
        hit = keys[pos] == target
        device = ref.device
        return SparsePattern(rows.to(device), cols.to(device), pos[hit].to(device), e_in[hit].to(device),
                             (i_rep[hit] * S + rows[e_in[hit]]).to(device))


class _Adjacency:
    """A boolean matrix as adjacency lists (CSR): row k's True columns, without forming a dense product."""

    def __init__(self, table: torch.Tensor) -> None:
        nz = torch.nonzero(table)
        self.columns = nz[:, 1]
        counts = torch.bincount(nz[:, 0], minlength=table.shape[0])
        self.start = torch.cumsum(counts, 0) - counts
        self.counts = counts

    def expand(self, owners: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One pair ``(owners[k], c)`` per True entry ``(rows[k], c)``, in order of k then c."""
        counts = self.counts[rows]
        owner = torch.repeat_interleave(owners, counts)
        offset = torch.arange(int(counts.sum())) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        return owner, self.columns[torch.repeat_interleave(self.start[rows], counts) + offset]


@dataclass
class SparseInfluence:
    """SnAp-n's ``M_t`` stored on its pattern: ``[B, K]`` values (the :class:`Estimator` protocol)."""

    cell: CellFunction
    batch: int
    n: int
    generator: torch.Generator
    M: torch.Tensor | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.factors = ImmediateFactors(self.cell)
        self.pattern = self.factors.pattern(self.n, self.generator)
        device = self.pattern.rows.device
        self._source = self.pattern.rows * self.factors.Q + self.factors.source.to(device)[self.pattern.cols]
        self._factor = self.factors.factor.to(device)[self.pattern.cols]
        dense = self.cell.S * int(self.factors.kept.sum())
        if self.pattern.size > dense // 2:
            log.info("sparse SnAp-%d keeps %d of %d influence entries per row; on a pattern this dense the dense "
                     "storage (storage=dense) is faster", self.n, self.pattern.size, dense)

    @property
    def entries(self) -> int:
        """Stored influence entries per batch row (the pattern's size)."""
        return self.pattern.size

    def advance(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        s_new, D, C, a = self.factors.jacobians(self.cell.theta(), x, s)
        immediate = C.flatten(1)[:, self._source] * a[:, self._factor]
        if self.M is None:
            self.M = immediate
        else:
            pat = self.pattern
            self.M = immediate.index_add(1, pat.pair_out, D.flatten(1)[:, pat.pair_d] * self.M[:, pat.pair_in])
        return s_new

    def read(self, adjoint: torch.Tensor) -> torch.Tensor:
        assert self.M is not None
        per_entry = (adjoint[:, self.pattern.rows] * self.M).sum(0)
        return per_entry.new_zeros(self.cell.P).index_add(0, self.pattern.cols, per_entry)

    def reset(self) -> None:
        self.M = None
