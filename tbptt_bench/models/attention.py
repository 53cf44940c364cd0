"""Memory-augmented models: segment-recurrent attention ``xl`` and attention-augmented LSTMs ``sab``, ``sab-cut``.

``xl`` (docs/design.md §7.2): a small pre-norm causal Transformer. Every layer keeps the last ``M`` of its
inputs as recurrent state, and position ``t`` attends to its own input and the previous ``M`` inputs
of the layer (a per-position sliding window, with a learned bias per head and offset 0..M). The memory
crosses chunk boundaries through the state, so outputs do not depend on how a sequence is chunked; a
cut detaches the memory (Transformer-XL's stop-gradient), full BPTT backpropagates through all of it.

``sab`` (Sparse Attentive Backtracking, Ke et al. 2018; docs/design.md §7.1): an LSTM whose hidden state
is stored every ``katt`` steps in a memory of at most ``mem`` slots (the oldest dropped). After each
LSTM step the new hidden state ``h`` queries the stored slots, keeps the ``ktop`` best-scoring ones,
and adds the softmax-weighted sum of their values to ``h``; that sum-augmented ``h`` is the feature,
the carried hidden state and what a store writes. The memory is declared differentiable across a cut
(``cross_cut_parts``): a truncation detaches ``(h, c)`` while gradients keep flowing into stored
slots and, through them, into the steps that wrote them. ``sab-cut`` is the same model with the
memory detached too (plain truncation), the ablation.

State of ``sab``: ``(h [1,B,H], c [1,B,H], memory [mem,B,H], valid [mem,B], position [1,B])``; slot 0 is
the oldest. ``position`` counts steps per row, so stores happen at absolute positions
``katt-1, 2·katt-1, …`` however the sequence is chunked or rows are stacked.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tbptt_bench.errors import UsageError
from tbptt_bench.models.protocol import State, register_model
from tbptt_bench.models.recurrent import lstm_step

#: Longest stretch ``xl`` attends in one piece: its forward runs pieces of at most this many steps,
#: each from the memory the previous piece left (the same numbers; attention cost ~ piece·(piece + M)).
XL_PIECE = 64


def _encoder(input_kind: str, input_size: int, hidden_size: int) -> nn.Module:
    if input_kind == "tokens":
        return nn.Embedding(input_size, hidden_size)
    if input_kind == "real":
        return nn.Linear(input_size, hidden_size)
    raise UsageError(f"unknown input kind {input_kind!r}; accepted: tokens, real")


def _positive(**sizes: int) -> None:
    for name, value in sizes.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UsageError(f"model parameter {name} must be an integer ≥ 1, got {value!r}")


class XLLayer(nn.Module):
    """One pre-norm layer: band attention over (memory, inputs), then a feed-forward block."""

    def __init__(self, hidden_size: int, heads: int, memory: int) -> None:
        super().__init__()
        self.heads, self.memory = heads, memory
        self.norm_attn = nn.LayerNorm(hidden_size)
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.out = nn.Linear(hidden_size, hidden_size)
        self.offset_bias = nn.Parameter(torch.zeros(heads, memory + 1))
        self.norm_ff = nn.LayerNorm(hidden_size)
        self.ff = nn.Sequential(nn.Linear(hidden_size, 2 * hidden_size), nn.GELU(), nn.Linear(2 * hidden_size, hidden_size))

    def forward(self, x: torch.Tensor, mem: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [B, L, H]``, ``mem [B, M, H]`` (this layer's last M inputs) → output, new memory."""
        B, L, H = x.shape
        M, nh = self.memory, self.heads
        seq = torch.cat([mem, x], dim=1)
        q, k, v = self.qkv(self.norm_attn(seq)).split(H, dim=-1)
        q = q[:, M:].reshape(B, L, nh, H // nh).transpose(1, 2)
        k = k.reshape(B, M + L, nh, H // nh).transpose(1, 2)
        v = v.reshape(B, M + L, nh, H // nh).transpose(1, 2)
        scores = q @ k.transpose(-1, -2) / math.sqrt(H // nh)  # [B, nh, L, M+L]
        offset = (torch.arange(L, device=x.device)[:, None] + M) - torch.arange(M + L, device=x.device)[None, :]
        band = (offset >= 0) & (offset <= M)
        bias = self.offset_bias[:, offset.clamp(0, M)]  # [nh, L, M+L]
        scores = (scores + bias).masked_fill(~band, float("-inf"))
        attended = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, L, H)
        y = x + self.out(attended)
        y = y + self.ff(self.norm_ff(y))
        return y, seq[:, L:]


class SegmentAttention(nn.Module):
    """``xl``: encoder → layers of sliding-window attention with memory → linear read-out."""

    def __init__(self, input_kind: str, input_size: int, output_size: int, hidden_size: int, num_layers: int = 1,
                 heads: int = 2, memory: int = 16) -> None:
        super().__init__()
        _positive(hidden_size=hidden_size, num_layers=num_layers, heads=heads, memory=memory)
        if hidden_size % heads:
            raise UsageError(f"xl: the width {hidden_size} must be a multiple of heads={heads}; choose heads dividing it")
        self.hidden_size, self.num_layers, self.memory = hidden_size, num_layers, memory
        self.encoder = _encoder(input_kind, input_size, hidden_size)
        self.layers = nn.ModuleList(XLLayer(hidden_size, heads, memory) for _ in range(num_layers))
        self.norm_out = nn.LayerNorm(hidden_size)
        self.readout = nn.Linear(hidden_size, output_size)

    def initial_state(self, batch_size: int) -> State:
        """Zero memory ``[layers·M, B, H]`` (attended like any other entry)."""
        p = self.readout.weight
        return torch.zeros(self.num_layers * self.memory, batch_size, self.hidden_size, dtype=p.dtype, device=p.device)

    def forward(self, inputs: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        features, state = self.core(inputs, state)
        return self.readout(features), state

    def core(self, inputs: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """Features ``[B, L, H]`` and the new memory, in pieces of at most :data:`XL_PIECE` steps."""
        assert isinstance(state, torch.Tensor)
        x = self.encoder(inputs)
        mems = list(state.transpose(0, 1).split(self.memory, dim=1))  # per layer [B, M, H]
        pieces = []
        for a in range(0, x.shape[1], XL_PIECE):
            h = x[:, a : a + XL_PIECE]
            for i, layer in enumerate(self.layers):
                h, mems[i] = layer(h, mems[i])
            pieces.append(h)
        features = self.norm_out(torch.cat(pieces, dim=1)) if pieces else x
        return features, torch.cat(mems, dim=1).transpose(0, 1)


class SparseAttentiveLSTM(nn.Module):
    """``sab`` / ``sab-cut``: an LSTM with a bounded memory of stored states read by top-k attention."""

    def __init__(self, input_kind: str, input_size: int, output_size: int, hidden_size: int, *, mem: int = 8,
                 katt: int = 4, ktop: int = 2, cut_memory: bool = False) -> None:
        super().__init__()
        _positive(hidden_size=hidden_size, mem=mem, katt=katt, ktop=ktop)
        if ktop > mem:
            raise UsageError(f"sab: ktop={ktop} exceeds the memory's {mem} slots; choose ktop ≤ mem")
        self.hidden_size, self.mem, self.katt, self.ktop = hidden_size, mem, katt, ktop
        self.cut_memory = bool(cut_memory)
        #: docs/design.md §7.1: the memory (part 2) stays differentiable across a cut, unless cut_memory.
        self.cross_cut_parts: tuple[int, ...] = () if self.cut_memory else (2,)
        self.encoder = _encoder(input_kind, input_size, hidden_size)
        self.cell = nn.LSTMCell(hidden_size, hidden_size)
        self.query = nn.Linear(hidden_size, hidden_size, bias=False)
        self.key = nn.Linear(hidden_size, hidden_size, bias=False)
        self.value = nn.Linear(hidden_size, hidden_size, bias=False)
        self.readout = nn.Linear(hidden_size, output_size)

    def initial_state(self, batch_size: int) -> State:
        p = self.readout.weight
        kw: dict[str, Any] = {"dtype": p.dtype, "device": p.device}
        h = torch.zeros(1, batch_size, self.hidden_size, **kw)
        memory = torch.zeros(self.mem, batch_size, self.hidden_size, **kw)
        return (h, torch.zeros_like(h), memory, torch.zeros(self.mem, batch_size, **kw), torch.zeros(1, batch_size, **kw))

    def forward(self, inputs: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        features, state = self.core(inputs, state)
        return self.readout(features), state

    def attend(self, h: torch.Tensor, memory: torch.Tensor, valid: torch.Tensor, weights: dict[str, torch.Tensor]
               ) -> torch.Tensor:
        """Summary of the ``ktop`` best-scoring valid slots for query ``h [B, H]`` (0 with none valid)."""
        q = F.linear(h, weights["query"])
        keys = F.linear(memory, weights["key"])  # [B, S, H]
        scores = (keys @ q.unsqueeze(-1)).squeeze(-1) / math.sqrt(self.hidden_size)
        scores = scores.masked_fill(valid == 0, -1e9)
        top, idx = scores.topk(self.ktop, dim=1)
        alpha = top.softmax(-1) * valid.gather(1, idx)
        chosen = memory.gather(1, idx.unsqueeze(-1).expand(-1, -1, memory.shape[-1]))
        return F.linear((alpha.unsqueeze(-1) * chosen).sum(1), weights["value"])

    def core(self, inputs: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """Features (the attention-augmented hidden states ``[B, L, H]``) and the new state."""
        assert isinstance(state, tuple) and len(state) == 5
        # Copies of θ for this call: a graph kept across cuts stays valid after an optimiser step
        # changes the parameters in place (it then holds the θ of the call that built it).
        w = {n: p.clone() for n, p in (("w_ih", self.cell.weight_ih), ("w_hh", self.cell.weight_hh),
                                         ("b_ih", self.cell.bias_ih), ("b_hh", self.cell.bias_hh),
                                         ("query", self.query.weight), ("key", self.key.weight),
                                         ("value", self.value.weight))}
        x = self.encoder(inputs)
        h, c = state[0][0], state[1][0]
        memory, valid, pos = state[2].transpose(0, 1), state[3].transpose(0, 1), state[4][0]
        outs = []
        for t in range(x.shape[1]):
            h, c = lstm_step(x[:, t], h, c, w["w_ih"], w["w_hh"], w["b_ih"], w["b_hh"])
            h = h + self.attend(h, memory, valid, w)
            outs.append(h)
            pos = pos + 1
            store = (torch.remainder(pos, self.katt) == 0).unsqueeze(-1)  # [B, 1]
            memory = torch.where(store.unsqueeze(-1), torch.cat([memory[:, 1:], h.unsqueeze(1)], 1), memory)
            valid = torch.where(store, torch.cat([valid[:, 1:], torch.ones_like(valid[:, :1])], 1), valid)
        features = torch.stack(outs, 1) if outs else x
        new = (h.unsqueeze(0), c.unsqueeze(0), memory.transpose(0, 1), valid.transpose(0, 1), pos.unsqueeze(0))
        return features, new


@register_model("xl")
def build_xl(task, hidden_size: int, num_layers: int = 1, heads: int = 2, memory: int = 16) -> SegmentAttention:  # type: ignore[no-untyped-def]
    """Segment-recurrent attention: every layer attends over its last ``memory`` inputs (docs/design.md §7.2)."""
    return SegmentAttention(task.input_kind, task.input_size, task.output_size, hidden_size, num_layers, heads, memory)


def _sab(task, hidden_size: int, num_layers: int, mem: int, katt: int, ktop: int, cut_memory: bool) -> SparseAttentiveLSTM:  # type: ignore[no-untyped-def]
    if num_layers != 1:
        raise UsageError(f"sab has one LSTM layer; got num_layers={num_layers}, use 1")
    return SparseAttentiveLSTM(task.input_kind, task.input_size, task.output_size, hidden_size, mem=mem, katt=katt,
                               ktop=ktop, cut_memory=cut_memory)


@register_model("sab")
def build_sab(task, hidden_size: int, num_layers: int = 1, mem: int = 8, katt: int = 4, ktop: int = 2,  # type: ignore[no-untyped-def]
              cut_memory: bool = False) -> SparseAttentiveLSTM:
    """LSTM + sparse attention over stored states; the memory stays differentiable across cuts (§7.1)."""
    return _sab(task, hidden_size, num_layers, mem, katt, ktop, cut_memory)


@register_model("sab-cut")
def build_sab_cut(task, hidden_size: int, num_layers: int = 1, mem: int = 8, katt: int = 4, ktop: int = 2  # type: ignore[no-untyped-def]
                  ) -> SparseAttentiveLSTM:
    """The ablation of ``sab``: a cut detaches the memory as well (plain truncation)."""
    return _sab(task, hidden_size, num_layers, mem, katt, ktop, True)
