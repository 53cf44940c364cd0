"""The built-in recurrent models ``rnn`` (tanh), ``lstm`` and ``gru``.

An input encoder (``encoder``: ``nn.Embedding`` for token inputs, ``nn.Linear`` for real-valued inputs),
a stacked recurrent core (``core``: ``nn.RNN`` with tanh, ``nn.LSTM`` or ``nn.GRU``, batch-first) and a
linear read-out (``readout``); math in docs/models.md. Two execution paths share the same parameters:
``fused`` (one ``nn.RNN/LSTM/GRU`` call per chunk: cuDNN/oneDNN kernels) and ``cell`` (an explicit
per-step loop written from the equations, used as an independent check and by methods that need every
step's state).

A **sparse core** (``sparsity > 0``): each layer's recurrent matrix ``weight_hh`` gets a fixed random mask that
keeps ``round((1 − sparsity)·numel)`` entries, drawn from ``mask_seed`` (the same mask for every model seed).
Both paths compute with ``weight_hh ⊙ mask``, so the pruned entries are zero in the recurrence and receive
zero gradient from every method; they are also set to zero at construction, so an optimiser never moves
them (docs/online.md, "Sparse cores").
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from tbptt_bench.errors import UsageError
from tbptt_bench.models.protocol import ExecutionPath, InputFold, State, register_model
from tbptt_bench.seeding import derive_seed

CELL_TYPES = ("rnn", "lstm", "gru")


def rnn_step(x: torch.Tensor, h: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor, b_ih: torch.Tensor,
             b_hh: torch.Tensor) -> torch.Tensor:
    """One tanh-RNN step of one layer (docs/models.md)."""
    return torch.tanh(F.linear(x, w_ih, b_ih) + F.linear(h, w_hh, b_hh))


def lstm_step(x: torch.Tensor, h: torch.Tensor, c: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor,
              b_ih: torch.Tensor, b_hh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One LSTM step of one layer, gate order i, f, g, o: the new ``(h, c)``."""
    gates = F.linear(x, w_ih, b_ih) + F.linear(h, w_hh, b_hh)
    i, f, g, o = gates.chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def gru_step(x: torch.Tensor, h: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor, b_ih: torch.Tensor,
             b_hh: torch.Tensor) -> torch.Tensor:
    """One GRU step of one layer, gate order r, z, n."""
    gi = F.linear(x, w_ih, b_ih).chunk(3, dim=-1)
    gh = F.linear(h, w_hh, b_hh).chunk(3, dim=-1)
    r = torch.sigmoid(gi[0] + gh[0])
    z = torch.sigmoid(gi[1] + gh[1])
    n = torch.tanh(gi[2] + r * gh[2])
    return (1 - z) * n + z * h


#: The one-step function of each cell type, used by the cell path (and compiled by ``compile_cell``).
CELL_STEPS: dict[str, Callable[..., Any]] = {"rnn": rnn_step, "lstm": lstm_step, "gru": gru_step}


class RecurrentNet(nn.Module):
    """Encoder → stacked rnn/lstm/gru → linear read-out, with fused and per-step cell paths."""

    def __init__(
        self,
        cell: str,
        input_kind: str,
        input_size: int,
        output_size: int,
        hidden_size: int,
        num_layers: int = 1,
        path: ExecutionPath = "fused",
        sparsity: float = 0.0,
        mask_seed: int = 0,
    ) -> None:
        super().__init__()
        if cell not in CELL_TYPES:
            raise UsageError(f"unknown cell {cell!r}; accepted: {', '.join(CELL_TYPES)}")
        if hidden_size < 1 or num_layers < 1:
            raise UsageError(f"hidden size and layers must be ≥ 1, got {hidden_size} and {num_layers}")
        self.cell = cell
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.path: ExecutionPath = path
        self.encoder: nn.Module
        if input_kind == "tokens":
            self.encoder = nn.Embedding(input_size, hidden_size)
        elif input_kind == "real":
            self.encoder = nn.Linear(input_size, hidden_size)
        else:
            raise UsageError(f"unknown input kind {input_kind!r}; accepted: tokens, real")
        rnn_cls = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}[cell]
        self.rnn = rnn_cls(hidden_size, hidden_size, num_layers=num_layers, batch_first=True)
        self.readout = nn.Linear(hidden_size, output_size)
        self._compiled_step: Callable[..., Any] | None = None
        self.sparsity = float(sparsity)
        if not 0.0 <= self.sparsity < 1.0:
            raise UsageError(f"sparsity is the pruned fraction of each recurrent matrix, in [0, 1); got {sparsity}")
        if self.sparsity > 0:
            self._prune(int(mask_seed))

    # -- sparse core ----------------------------------------------------------------------------
    def _prune(self, mask_seed: int) -> None:
        """Draw each layer's fixed ``weight_hh`` mask (buffer ``mask_hh_l{k}``) and zero the pruned entries."""
        generator = torch.Generator().manual_seed(derive_seed("recurrent-mask", mask_seed))
        for layer in range(self.num_layers):
            weight = getattr(self.rnn, f"weight_hh_l{layer}")
            keep = round((1.0 - self.sparsity) * weight.numel())
            mask = torch.zeros(weight.numel(), dtype=torch.bool)
            mask[torch.randperm(weight.numel(), generator=generator)[:keep]] = True
            self.register_buffer(f"mask_hh_l{layer}", mask.view(weight.shape))
            with torch.no_grad():
                weight.mul_(mask.view(weight.shape))

    def recurrent_mask(self, layer: int) -> torch.Tensor | None:
        """Layer ``layer``'s fixed ``weight_hh`` mask (bool, the weight's shape), or None for a dense core."""
        return getattr(self, f"mask_hh_l{layer}", None)

    def masked_hh(self, layer: int, weight: torch.Tensor) -> torch.Tensor:
        """Layer ``layer``'s recurrent matrix ``weight`` as the recurrence uses it: times the mask of a sparse core."""
        mask = self.recurrent_mask(layer)
        return weight if mask is None else weight * mask

    # -- protocol -------------------------------------------------------------------------------
    def initial_state(self, batch_size: int) -> State:
        p = self.readout.weight
        h = torch.zeros(self.num_layers, batch_size, self.hidden_size, dtype=p.dtype, device=p.device)
        return (h, torch.zeros_like(h)) if self.cell == "lstm" else h

    def forward(self, inputs: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        features, state = self.core(inputs, state)
        return self.readout(features), state

    def core(self, inputs: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """Encoder and recurrence: top-layer hidden states ``[B, L, H]`` and the new state."""
        x = self.encoder(inputs)
        if self.path == "fused" and self.sparsity > 0:
            masked = {f"weight_hh_l{k}": self.masked_hh(k, getattr(self.rnn, f"weight_hh_l{k}"))
                      for k in range(self.num_layers)}
            return torch.func.functional_call(self.rnn, masked, (x, state))
        if self.path == "fused":
            return self.rnn(x, state)
        if self.path == "cell":
            return self._cell_forward(x, state)
        raise UsageError(f"unknown execution path {self.path!r}; accepted: fused, cell")

    # -- analysis fold --------------------------------------------------------------------------
    def input_fold(self) -> InputFold | None:
        """This net with its encoder folded into the first layer's input weights (docs/design.md §3.9).

        Worth it when the raw input is no wider than the hidden state (one-hot tokens of a small
        vocabulary, low-dimensional real inputs): the first layer's input products shrink from H to
        that width and the encoder's input adjoint disappears. None on the cell path, for wider inputs,
        for a sparse core, or when the encoder or the first layer's input weights are frozen.
        """
        enc = self.encoder
        width = enc.num_embeddings if isinstance(enc, nn.Embedding) else enc.in_features
        first = (*enc.parameters(), self.rnn.weight_ih_l0, self.rnn.bias_ih_l0)
        if self.path != "fused" or self.sparsity > 0 or width > self.hidden_size or not all(p.requires_grad for p in first):
            return None
        folded = FoldedNet(self)
        return InputFold(folded, folded.pullback)

    # -- per-step cell path ---------------------------------------------------------------------
    def compile_cell(self, **options: Any) -> None:
        """Use ``torch.compile`` for the one-step function of the cell path (``options`` go to it).

        Compilation happens at the first call; time that call to see its cost. The fused path is
        unaffected.
        """
        self._compiled_step = torch.compile(CELL_STEPS[self.cell], dynamic=False, **options)

    def _cell_forward(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """The equations of docs/models.md, one step at a time, with the fused module's parameters."""
        if self.cell == "lstm":
            assert isinstance(state, tuple)
            hs, cs = list(state[0].unbind(0)), list(state[1].unbind(0))
        else:
            assert isinstance(state, torch.Tensor)
            hs, cs = list(state.unbind(0)), []
        step = self._compiled_step or CELL_STEPS[self.cell]
        outputs = []
        for t in range(x.shape[1]):
            inp = x[:, t]
            for layer in range(self.num_layers):
                w_ih = getattr(self.rnn, f"weight_ih_l{layer}")
                w_hh = self.masked_hh(layer, getattr(self.rnn, f"weight_hh_l{layer}"))
                b_ih = getattr(self.rnn, f"bias_ih_l{layer}")
                b_hh = getattr(self.rnn, f"bias_hh_l{layer}")
                if self.cell == "lstm":
                    h, cs[layer] = step(inp, hs[layer], cs[layer], w_ih, w_hh, b_ih, b_hh)
                else:
                    h = step(inp, hs[layer], w_ih, w_hh, b_ih, b_hh)
                hs[layer] = h
                inp = h
            outputs.append(inp)
        out = torch.stack(outputs, dim=1)
        h_new = torch.stack(hs, 0)
        return out, ((h_new, torch.stack(cs, 0)) if self.cell == "lstm" else h_new)


class FoldedNet(nn.Module):
    """A :class:`RecurrentNet` whose first layer reads the raw inputs (docs/design.md §3.9).

    Tokens enter one-hot with input weights ``W' = W_ih·Eᵀ`` (E the embedding table); real inputs
    enter as they are with ``W' = W_ih·A`` and ``b' = b_ih + W_ih·c`` (A, c the encoder's weight and
    bias). Every other parameter is the original's own tensor, so gradients of those need no mapping;
    :meth:`pullback` maps the gradient of ``W'`` (and ``b'``) back to the encoder and ``W_ih``.
    """

    def __init__(self, net: RecurrentNet) -> None:
        super().__init__()
        enc, rnn = net.encoder, net.rnn
        self.tokens = isinstance(enc, nn.Embedding)
        self.width = enc.num_embeddings if self.tokens else enc.in_features
        self.cell, self.hidden_size, self.num_layers = net.cell, net.hidden_size, net.num_layers
        self._trainable = [n for n, p in net.named_parameters() if p.requires_grad]
        w = rnn.weight_ih_l0
        self.rnn = type(rnn)(self.width, net.hidden_size, num_layers=net.num_layers, batch_first=True,
                             device=w.device, dtype=w.dtype)
        for name, p in rnn.named_parameters():
            if name not in ("weight_ih_l0", "bias_ih_l0") or (self.tokens and name == "bias_ih_l0"):
                setattr(self.rnn, name, p)
        self._w_ih = w.detach()
        self._encoder = {n: p.detach() for n, p in enc.named_parameters()}
        with torch.no_grad():
            if self.tokens:
                self.rnn.weight_ih_l0.copy_(w @ enc.weight.T)
            else:
                self.rnn.weight_ih_l0.copy_(w @ enc.weight)
                self.rnn.bias_ih_l0.copy_(rnn.bias_ih_l0 + w @ enc.bias)
        self.readout = net.readout

    initial_state = RecurrentNet.initial_state
    forward = RecurrentNet.forward

    def core(self, inputs: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """The original net's features and state, computed from the raw inputs."""
        dtype = self.rnn.weight_hh_l0.dtype
        x = F.one_hot(inputs.long(), self.width).to(dtype) if self.tokens else inputs
        return self.rnn(x, state)

    def pullback(self, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A gradient of this net's parameters as one of the original net's (chain rule through the fold)."""
        d_w = grads["rnn.weight_ih_l0"]
        w, enc = self._w_ih, self._encoder
        out: dict[str, torch.Tensor] = {}
        for name in self._trainable:
            if name == "encoder.weight":
                out[name] = d_w.T @ w if self.tokens else w.T @ d_w
            elif name == "encoder.bias":
                out[name] = w.T @ grads["rnn.bias_ih_l0"]
            elif name == "rnn.weight_ih_l0":
                if self.tokens:
                    out[name] = d_w @ enc["weight"]
                else:
                    out[name] = d_w @ enc["weight"].T + torch.outer(grads["rnn.bias_ih_l0"], enc["bias"])
            else:
                out[name] = grads[name]
        return out


def _factory(cell: str):  # type: ignore[no-untyped-def]
    def build(task, hidden_size: int, num_layers: int = 1, path: ExecutionPath = "fused",  # type: ignore[no-untyped-def]
              sparsity: float = 0.0, mask_seed: int = 0) -> RecurrentNet:
        return RecurrentNet(cell, task.input_kind, task.input_size, task.output_size, hidden_size, num_layers, path,
                            sparsity, mask_seed)

    build.__doc__ = (f"Built-in {cell} model: encoder → {cell} core → linear read-out; ``sparsity`` prunes that "
                     "fraction of each recurrent matrix with a fixed mask drawn from ``mask_seed``.")
    return build


for _cell in CELL_TYPES:
    register_model(_cell)(_factory(_cell))
