"""KF-RTRL (Mujika, Meier & Steger 2018): the influence matrix of a tanh RNN carried as Kronecker products.

For a one-layer tanh RNN ``h_t = tanh(W_ih e_t + b_ih + W_hh h_{t−1} + b_hh)`` with ``e_t`` the encoder's
output, the parameters fall into two matrices whose immediate Jacobians are single Kronecker products
(docs/online.md, "KF-RTRL"), per batch row, with ``σ'_t = 1 − h_t²`` and ``D_t = diag(σ'_t) W_hh``:

* the core ``W = [W_ih | W_hh | b_ih | b_hh]`` (``H × (E + H + 2)``): ``∂⁺h_t/∂W = a_tᵀ ⊗ diag(σ'_t)``
  with ``a_t = (e_t, h_{t−1}, 1, 1)``;
* the encoder, as the matrix ``Wᵉ`` of ``e_t = Wᵉ u_t`` (the embedding table transposed with ``u_t`` the
  one-hot token, or ``[weight | bias]`` with ``u_t = (x_t, 1)``): ``∂⁺h_t/∂Wᵉ = u_tᵀ ⊗ diag(σ'_t) W_ih``.

Each group carries ``Ĝ = ûᵀ ⊗ Â`` (``û`` a row vector over the matrix's columns, ``Â`` ``H × H``) with

    û_t = ρ₁ û_{t−1} + c ρ₂ a_t,     Â_t = D_t Â_{t−1} / ρ₁ + c B_t / ρ₂,     c uniform on {−1, +1},

``B_t`` the immediate factor above, ``ρ₁ = √(‖D_t Â_{t−1}‖/‖û_{t−1}‖)`` and ``ρ₂ = √(‖B_t‖/‖a_t‖)`` (1 where a norm
is zero). The paper draws two signs ``c₁, c₂``; only their product enters ``û_t ⊗ Â_t``, so one sign
per group, row and step gives the same distribution. Since ``E[c] = 0``, ``E[Ĝ_t | past] = D_t Ĝ_{t−1} + I_t``:
unbiased at fixed θ, by the tower rule. Memory per row ``H² + (E + H + 2) + H² + V`` numbers instead of
RTRL's ``H·P``. The estimate of the recurrent part of ``∂ℓ_t/∂W`` is ``(Âᵀ λ) û`` (an outer product) for
the adjoint ``λ = ∂ℓ_t/∂h_t``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from tbptt_bench.core.forward_mode import CellFunction
from tbptt_bench.errors import UsageError

#: ``signs(shape, device) -> tensor of ±1 on device``: where the estimator draws its signs (a seeded generator
#: by default).
SignSource = Callable[[tuple[int, ...], torch.device], torch.Tensor]


def generator_signs(generator: torch.Generator) -> SignSource:
    """Signs ``2·randint(0, 2) − 1`` drawn where the state lives: from ``generator`` on its own device, else from
    a generator on the state's device seeded once from it (no host-device copy per step, as UORO's)."""
    on_device: dict[str, torch.Generator] = {}

    def signs(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        source = generator
        if generator.device.type != device.type:
            if str(device) not in on_device:
                seed = int(torch.randint(0, 2**62, (), generator=generator))
                on_device[str(device)] = torch.Generator(device=device).manual_seed(seed)
            source = on_device[str(device)]
        return 2 * torch.randint(0, 2, shape, generator=source, device=device) - 1

    return signs


def _ratio_sqrt(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    ok = (a > 0) & (b > 0)
    return torch.where(ok, torch.sqrt(a / torch.where(ok, b, torch.ones_like(b))), torch.ones_like(a))


@dataclass
class KroneckerFactors:
    """KF-RTRL's estimator for a one-layer ``rnn`` built-in model (the :class:`Estimator` protocol)."""

    cell: CellFunction
    batch: int
    signs: SignSource
    u: list[torch.Tensor] | None = field(default=None, init=False)
    A: list[torch.Tensor] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.cell.cell != "rnn" or self.cell.layers != 1:
            raise UsageError(f"kfrtrl is defined for one-layer rnn models; got {self.cell.layers}-layer {self.cell.cell}")
        if self.cell.model.recurrent_mask(0) is not None:
            raise UsageError("kfrtrl is defined for dense cores (a masked W_hh's immediate Jacobian is not one Kronecker "
                             "product); use rtrl or snap:storage=sparse on a sparse core")
        self._embedding = isinstance(self.cell.model.encoder, nn.Embedding)

    def _params(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.cell.names, self.cell.theta()))

    def _encoder_columns(self, p: dict[str, torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder output ``e`` ``[B, E]`` and its column vector ``u`` ``[B, m]``."""
        if self._embedding:
            table = p["encoder.weight"]
            return F.embedding(x, table), F.one_hot(x, table.shape[0]).to(table.dtype)
        weight, bias = p["encoder.weight"], p["encoder.bias"]
        return F.linear(x, weight, bias), torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)

    def advance(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        p = self._params()
        w_ih, w_hh, b_ih, b_hh = (p[f"rnn.{k}_l0"] for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
        e, u_enc = self._encoder_columns(p, x)
        h = torch.tanh(F.linear(e, w_ih, b_ih) + F.linear(s, w_hh, b_hh))
        slope = 1 - h * h
        ones = s.new_ones(s.shape[0], 1)
        columns = [u_enc, torch.cat([e, s, ones, ones], dim=1)]
        immediate = [slope[:, :, None] * w_ih[None], torch.diag_embed(slope)]
        if self.u is None or self.A is None:
            self.u = [torch.zeros_like(a) for a in columns]
            self.A = [torch.zeros_like(b) for b in immediate]
        c = self.signs((s.shape[0], len(columns)), s.device).to(s.dtype)
        new_u, new_A = [], []
        for g, (a, B) in enumerate(zip(columns, immediate)):
            DA = slope[:, :, None] * torch.matmul(w_hh, self.A[g])
            rho1 = _ratio_sqrt(DA.flatten(1).norm(dim=1), self.u[g].norm(dim=1))
            rho2 = _ratio_sqrt(B.flatten(1).norm(dim=1), a.norm(dim=1))
            new_u.append(rho1[:, None] * self.u[g] + (c[:, g] * rho2)[:, None] * a)
            new_A.append(DA / rho1[:, None, None] + (c[:, g] / rho2)[:, None, None] * B)
        self.u, self.A = new_u, new_A
        return h

    def read(self, adjoint: torch.Tensor) -> torch.Tensor:
        assert self.u is not None and self.A is not None
        enc, core = (torch.einsum("bhk,bh,bm->km", A, adjoint, u) for A, u in zip(self.A, self.u))
        H = self.cell.hidden
        E = core.shape[1] - H - 2
        pieces = {"rnn.weight_ih_l0": core[:, :E], "rnn.weight_hh_l0": core[:, E:E + H],
                  "rnn.bias_ih_l0": core[:, E + H], "rnn.bias_hh_l0": core[:, E + H + 1]}
        if self._embedding:
            pieces["encoder.weight"] = enc.T
        else:
            pieces["encoder.weight"], pieces["encoder.bias"] = enc[:, :-1], enc[:, -1]
        return torch.cat([pieces[n].reshape(-1) for n in self.cell.names])

    def reset(self) -> None:
        self.u = self.A = None
