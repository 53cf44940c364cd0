"""Forward-mode gradient estimation: run a built-in model one step at a time, carrying an influence
matrix (or an approximation of it) forward, and read the gradient estimate off it at every loss.

Definitions (docs/design.md §7.3). Per batch row, the state ``s_t`` is the flat vector of every layer's
``h`` (and, for the LSTM, every layer's ``c``), ``θ`` the parameters of encoder and recurrent core, and

    s_t = f(θ, x_t, s_{t−1}),   D_t = ∂s_t/∂s_{t−1},   I_t = ∂⁺s_t/∂θ (immediate, s_{t−1} fixed),
    M_t = ∂s_t/∂θ = D_t M_{t−1} + I_t,   M_0 = 0 (the initial state is a constant, §2.8),
    ∂ℓ_t/∂θ = ρ_t + Σ_b (∂ℓ_t/∂s_t[b]) M_t[b]   (ρ_t: the read-out's direct term, §2.2).

An :class:`Estimator` carries its own stand-in for ``M_t`` (exact, masked, leaky or rank one) and
turns the adjoint ``∂ℓ_t/∂s_t`` into a parameter-space estimate; :func:`run_forward_mode` sums those
estimates over a sequence at fixed θ, and :class:`OnlineEngine` trains with them online (an optimiser
step every few steps, the carried estimate kept across updates), under the contract of ``Engine.run``. The estimators themselves are declared by the online method
families in ``tbptt_bench.methods.online``; this module holds the computations they share.

Per-row Jacobians come from ``torch.func`` (``jacrev``, ``jvp``, ``vjp``, vmapped over the batch), so
the same code runs on CPU and CUDA and in float32 or float64.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Generator, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import jacrev, jvp, vjp, vmap

from tbptt_bench.core.engine import RunResult, Source, UpdateStep, drive, step_loss_sum, to_device
from tbptt_bench.core.mask import Update
from tbptt_bench.errors import UsageError
from tbptt_bench.models.protocol import State, check_state
from tbptt_bench.tasks.base import Batch
from tbptt_bench.models.recurrent import CELL_STEPS, RecurrentNet

log = logging.getLogger(__name__)

Gradient = dict[str, torch.Tensor]
#: Steps fetched from the source at a time (the sequence is never needed on the device whole).
FETCH_STEPS = 256
#: Gates per unit of each cell type (rows of ``weight_ih`` per hidden unit).
GATES = {"rnn": 1, "lstm": 4, "gru": 3}


class CellFunction:
    """A built-in model's recurrence as a per-row function ``s' = f(θ, x, s)`` on flat states.

    ``θ`` is the tuple of encoder and core parameters (every parameter except ``readout.*``) in
    ``named_parameters`` order; ``P`` their total size, ``S`` the flat state size per row.
    """

    def __init__(self, model: nn.Module, who: str = "a forward-mode method") -> None:
        if not isinstance(model, RecurrentNet):
            raise UsageError(f"{who} runs the built-in rnn/lstm/gru models only (it steps their cell "
                             f"equations); got {type(model).__name__}")
        if not isinstance(model.encoder, (nn.Embedding, nn.Linear)):
            raise UsageError(f"{who} needs an nn.Embedding or nn.Linear encoder; got {type(model.encoder).__name__}")
        self.model = model
        self.cell = model.cell
        self.hidden = model.hidden_size
        self.layers = model.num_layers
        named = [(n, p) for n, p in model.named_parameters() if not n.startswith("readout.")]
        self.names = [n for n, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.sizes = [p.numel() for _, p in named]
        self.P = sum(self.sizes)
        self.S = self.state_size(self.hidden)
        self._step = CELL_STEPS[self.cell]

    # -- sizes -----------------------------------------------------------------------------------
    def state_size(self, hidden: int) -> int:
        """Flat state size per row for a given hidden size."""
        return self.layers * hidden * (2 if self.cell == "lstm" else 1)

    def param_count(self, hidden: int) -> int:
        """Encoder and core parameter count for a given hidden size (same architecture otherwise)."""
        enc = self.model.encoder
        enc_n = enc.num_embeddings * hidden if isinstance(enc, nn.Embedding) else (enc.in_features + 1) * hidden
        return enc_n + self.layers * GATES[self.cell] * (2 * hidden * hidden + 2 * hidden)

    def theta(self) -> tuple[torch.Tensor, ...]:
        params = dict(self.model.named_parameters())
        return tuple(params[n].detach() for n in self.names)

    # -- states ----------------------------------------------------------------------------------
    def flatten_state(self, state: State) -> torch.Tensor:
        """``[L, B, H]`` (and ``c`` for the LSTM) to ``[B, S]``: layers' h first, then layers' c."""
        parts = state if isinstance(state, tuple) else (state,)
        B = parts[0].shape[1]
        return torch.cat([p.detach().transpose(0, 1).reshape(B, -1) for p in parts], dim=1)

    def unflatten_state(self, flat: torch.Tensor) -> State:
        B, L, H = flat.shape[0], self.layers, self.hidden
        pieces = [flat[:, i * L * H:(i + 1) * L * H].reshape(B, L, H).transpose(0, 1).contiguous()
                  for i in range(2 if self.cell == "lstm" else 1)]
        return (pieces[0], pieces[1]) if self.cell == "lstm" else pieces[0]

    def features(self, flat: torch.Tensor) -> torch.Tensor:
        """The top layer's h: ``[B, H]``."""
        L, H = self.layers, self.hidden
        return flat[:, (L - 1) * H:L * H]

    # -- the per-row step ------------------------------------------------------------------------
    def row(self, theta: tuple[torch.Tensor, ...], x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """One step of one row: ``x`` a token (0-dim) or an input vector, ``s`` the flat state."""
        p = dict(zip(self.names, theta))
        if isinstance(self.model.encoder, nn.Embedding):
            inp = F.embedding(x, p["encoder.weight"])
        else:
            inp = F.linear(x, p["encoder.weight"], p.get("encoder.bias"))
        L, H = self.layers, self.hidden
        new_h, new_c = [], []
        for layer in range(L):
            w = [p[f"rnn.{k}_l{layer}"] for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
            w[1] = self.model.masked_hh(layer, w[1])
            h = s[layer * H:(layer + 1) * H]
            if self.cell == "lstm":
                c = s[(L + layer) * H:(L + layer + 1) * H]
                h, c = self._step(inp, h, c, *w)
                new_c.append(c)
            else:
                h = self._step(inp, h, *w)
            new_h.append(h)
            inp = h
        return torch.cat(new_h + new_c)

    def flat_params(self, grads: tuple[torch.Tensor, ...], lead: int) -> torch.Tensor:
        """Concatenate per-parameter tensors with ``lead`` leading dims into ``[..., P]``."""
        return torch.cat([g.reshape(*g.shape[:lead], -1) for g in grads], dim=-1)

    def jacobians(self, x: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The new state ``[B, S]``, ``D_t`` ``[B, S, S]`` and ``I_t`` ``[B, S, P]``."""
        theta = self.theta()
        jac = vmap(jacrev(self.row, argnums=(0, 2)), in_dims=(None, 0, 0))(theta, x, s)
        with torch.no_grad():
            s_new = vmap(self.row, in_dims=(None, 0, 0))(theta, x, s)
        return s_new, jac[1], self.flat_params(jac[0], 2)

    def state_jvp(self, x: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The new state and ``D_t v`` per row (``v``: ``[B, S]``)."""
        theta = self.theta()

        def one(xr: torch.Tensor, sr: torch.Tensor, vr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return jvp(lambda z: self.row(theta, xr, z), (sr,), (vr,))

        return vmap(one)(x, s, v)

    def param_vjp(self, x: torch.Tensor, s: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """``u_bᵀ I_t[b]`` per row: ``[B, P]`` (``u``: ``[B, S]``)."""
        theta = self.theta()

        def one(xr: torch.Tensor, sr: torch.Tensor, ur: torch.Tensor) -> tuple[torch.Tensor, ...]:
            _, pull = vjp(lambda th: self.row(th, xr, sr), theta)
            return pull(ur)[0]

        return self.flat_params(vmap(one)(x, s, u), 1)


class DeclaredCell(CellFunction):
    """A :class:`CellFunction` whose step is the model's own ``row(theta, x, s) -> s'`` (docs/online.md, "Models
    that declare their step"): one batch row, ``theta`` its parameters in ``named_parameters`` order, a state of
    one tensor ``[1, B, S]`` and ``readout(features)`` taking that state. Every parameter is recurrent."""

    def __init__(self, model: nn.Module) -> None:  # noqa: super().__init__ checks for the built-in models
        if not callable(getattr(model, "readout", None)):
            raise UsageError(f"{type(model).__name__} declares row() but lacks readout(); "
                             "a declared cell needs both (docs/online.md)")
        state = model.initial_state(1)
        if not hasattr(state, "shape") or state.dim() != 3 or state.shape[0] != 1:
            raise UsageError(f"{type(model).__name__}: a declared cell needs a state of one tensor [1, B, S]")
        self.model = model
        self.cell = type(model).__name__
        self.layers, self.hidden = 1, int(state.shape[2])
        named = list(model.named_parameters())
        self.names = [n for n, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.sizes = [p.numel() for _, p in named]
        self.P = sum(self.sizes)
        self.S = self.hidden

    def state_size(self, hidden: int) -> int:
        return hidden

    def param_count(self, hidden: int) -> int:
        return self.P

    def row(self, theta, x, s):  # type: ignore[no-untyped-def]
        return self.model.row(theta, x, s)


def cell_function(model: nn.Module) -> CellFunction:
    """The per-row recurrence forward mode steps: :class:`DeclaredCell` for a model that declares its step
    (a ``row`` method), else the built-in models' :class:`CellFunction`."""
    return DeclaredCell(model) if callable(getattr(model, "row", None)) else CellFunction(model)


def structural_pattern(cell: CellFunction, n: int, generator: torch.Generator) -> torch.Tensor:
    """SnAp-n's pattern ``[S, P]``: entry (i, p) is kept iff parameter p can reach state entry i within n
    steps (Menick et al. 2021). n = 1 is the nonzero pattern of ``I_t``; n + 1 adds ``D_t``'s pattern
    applied to pattern n. Patterns are read off Jacobians at random θ, random states and, for token
    inputs, every token, so no zero of the current θ or data is taken for structure."""
    ref = cell.theta()[0]
    theta = tuple(torch.randn(t.shape, generator=generator, dtype=ref.dtype).to(ref.device) for t in cell.theta())
    enc = cell.model.encoder
    if isinstance(enc, nn.Embedding):
        x = torch.arange(enc.num_embeddings, device=ref.device)
    else:
        x = torch.randn(4, enc.in_features, generator=generator, dtype=ref.dtype).to(ref.device)
    s = torch.randn(x.shape[0], cell.S, generator=generator, dtype=ref.dtype).to(ref.device)
    jac = vmap(jacrev(cell.row, argnums=(0, 2)), in_dims=(None, 0, 0))(theta, x, s)
    immediate = (cell.flat_params(jac[0], 2) != 0).any(0)
    transition = (jac[1] != 0).any(0).to(ref.dtype)
    pattern = immediate
    for _ in range(n - 1):
        pattern = pattern | ((transition @ pattern.to(ref.dtype)) != 0)
    return pattern


class Estimator(Protocol):
    """What an online method carries through a sequence."""

    def advance(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """Step the state (``[B, S]`` → ``[B, S]``) and update the carried quantities to step t."""

    def read(self, adjoint: torch.Tensor) -> torch.Tensor:
        """The estimate ``Σ_b adjoint[b] · M̂_t[b]`` (``[P]``) of the recurrent part of ∂ℓ_t/∂θ."""

    def reset(self) -> None:
        """Forget the carried quantities: the next state is a constant (``M̂ = 0``, docs/design.md §2.8)."""


def check_influence_memory(cell: CellFunction, batch: int, max_mib: float, who: str, itemsize: int) -> None:
    """Refuse (UsageError) an influence matrix ``B·S·P·itemsize`` bytes above ``max_mib`` MiB, saying
    which batch size and hidden size would fit."""
    limit = max_mib * 2**20
    need = batch * cell.S * cell.P * itemsize
    if need <= limit:
        return
    fit_batch = int(limit // (cell.S * cell.P * itemsize))
    fit_hidden = next((h for h in range(cell.hidden, 0, -1)
                       if batch * cell.state_size(h) * cell.param_count(h) * itemsize <= limit), 0)
    raise UsageError(
        f"{who}: the influence matrix needs {need / 2**20:.0f} MiB (batch {batch} × state {cell.S} × "
        f"{cell.P} parameters × {itemsize} bytes), above max_mib={max_mib:g}; hidden ≤ {fit_hidden} or "
        f"batch ≤ {fit_batch} would fit, or raise max_mib"
    )


@dataclass
class Influence:
    """A dense ``[B, S, P]`` stand-in for ``M_t`` under one of three recursions:

    * ``"exact"``: ``M_t = D_t M_{t−1} + I_t`` (RTRL); with ``pattern``, the result is masked to it
      after every step (SnAp);
    * ``"leak"``: ``M_t = (1 − 1/τ) M_{t−1} + (1/τ) I_t`` (an eligibility trace that ignores ``D_t``).
    """

    cell: CellFunction
    batch: int
    recursion: str = "exact"
    pattern: torch.Tensor | None = None
    tau: float = 1.0
    M: torch.Tensor | None = field(default=None, init=False)

    def advance(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        s_new, D, I = self.cell.jacobians(x, s)
        if self.M is None:
            M = I if self.recursion == "exact" else I / self.tau
        elif self.recursion == "exact":
            M = torch.baddbmm(I, D, self.M)
        else:
            M = (1.0 - 1.0 / self.tau) * self.M + I / self.tau
        self.M = M * self.pattern if self.pattern is not None else M
        return s_new

    def read(self, adjoint: torch.Tensor) -> torch.Tensor:
        assert self.M is not None
        return torch.einsum("bs,bsp->p", adjoint, self.M)

    def reset(self) -> None:
        self.M = None


@dataclass
class RankOne:
    """UORO (Tallec & Ollivier 2017): per row, ``M_t ≈ h̃_t θ̃_tᵀ`` with

        h̃_t = ρ₀ D_t h̃_{t−1} + ρ₁ ν,   θ̃_t = θ̃_{t−1}/ρ₀ + νᵀ I_t / ρ₁,   ν uniform on {−1, +1}^S,

    ``ρ₀ = √(‖θ̃_{t−1}‖/‖D_t h̃_{t−1}‖)`` and ``ρ₁ = √(‖νᵀI_t‖/‖ν‖)`` (1 where a norm is zero), the
    θ̃ norms taken over the trained parameters only (``requires_grad``; frozen ones get no estimate, so
    their entries would only change the variance). Since ``E[ν] = 0``, ``E[ννᵀ] = 1`` and ρ₁ is even in
    ν, ``E[h̃_t θ̃_tᵀ | past] = D_t h̃_{t−1} θ̃_{t−1}ᵀ + I_t``, so the estimate is unbiased at fixed θ.
    Signs are ``2·randint(0, 2, [B, S]) − 1``, one draw per step, drawn where the state lives: from
    ``generator`` when it is on that device, else from a generator on the device seeded once from
    ``generator`` (no host-device copy per step).
    """

    cell: CellFunction
    batch: int
    generator: torch.Generator
    device_generator: torch.Generator | None = field(default=None, init=False)
    h: torch.Tensor | None = field(default=None, init=False)
    th: torch.Tensor | None = field(default=None, init=False)
    #: 1 on the entries of θ̃ that belong to trained parameters, 0 on frozen ones (None: all trained).
    trained: torch.Tensor | None = field(default=None, init=False)

    def advance(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        if self.h is None:
            self.h = torch.zeros_like(s)
            self.th = s.new_zeros(s.shape[0], self.cell.P)
            params = dict(self.cell.model.named_parameters())
            flags = [params[n].requires_grad for n in self.cell.names]
            if not all(flags):
                self.trained = torch.cat([s.new_full((k,), float(f)) for k, f in zip(self.cell.sizes, flags)])
        assert self.th is not None
        s_new, dh = self.cell.state_jvp(x, s, self.h)
        nu = (2 * torch.randint(0, 2, s.shape, generator=self._signs(s.device), device=s.device) - 1).to(s.dtype)
        nu_i = self.cell.param_vjp(x, s, nu)
        th, nu_i_trained = (self.th, nu_i) if self.trained is None else (self.th * self.trained, nu_i * self.trained)
        rho0 = _ratio_sqrt(th.norm(dim=1), dh.norm(dim=1))
        rho1 = _ratio_sqrt(nu_i_trained.norm(dim=1), nu.norm(dim=1))
        self.h = rho0[:, None] * dh + rho1[:, None] * nu
        self.th = self.th / rho0[:, None] + nu_i / rho1[:, None]
        return s_new

    def _signs(self, device: torch.device) -> torch.Generator:
        if self.generator.device.type == device.type:
            return self.generator
        if self.device_generator is None:
            seed = int(torch.randint(0, 2**62, (), generator=self.generator))
            self.device_generator = torch.Generator(device=device).manual_seed(seed)
        return self.device_generator

    def read(self, adjoint: torch.Tensor) -> torch.Tensor:
        assert self.h is not None and self.th is not None
        return ((adjoint * self.h).sum(1)[:, None] * self.th).sum(0)

    def reset(self) -> None:
        self.h = self.th = None


def _ratio_sqrt(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``√(a/b)`` where both are positive, else 1."""
    ok = (a > 0) & (b > 0)
    return torch.where(ok, torch.sqrt(a / torch.where(ok, b, torch.ones_like(b))), torch.ones_like(a))


@dataclass
class ForwardModeResult:
    """Σ_t of the estimates (by parameter name, read-out included), the final state and, on request,
    each step's estimate."""

    gradient: Gradient
    final_state: State
    per_step: list[Gradient] | None


def online_step(
    model: nn.Module, cell: CellFunction, est: Estimator, readout: list[torch.Tensor], chunk: Batch, t: int,
    s: torch.Tensor, loss_kind: str,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """Step ``t`` of ``chunk`` at the current θ: the new flat state, the estimator's recurrent part of
    ∂ℓ_t/∂θ (``[P]``), the read-out's direct term ρ_t (one tensor per ``readout`` parameter) and ℓ_t."""
    s = est.advance(chunk.inputs[:, t], s).detach()
    leaf = s.detach().requires_grad_(True)
    outputs = model.readout(cell.features(leaf)[:, None])
    loss = step_loss_sum(outputs, chunk.slice(t, t + 1), loss_kind, chunk.batch_size)
    grads = torch.autograd.grad(loss, [leaf] + readout, allow_unused=True)
    ro = [g if g is not None else torch.zeros_like(p) for g, p in zip(grads[1:], readout)]
    leaf_grad = grads[0] if grads[0] is not None else torch.zeros_like(leaf)
    return s, est.read(leaf_grad.detach()), ro, loss.detach()


def readout_parameters(model: nn.Module) -> list[torch.Tensor]:
    """The read-out's parameters (``readout.*``), in ``named_parameters`` order."""
    return [p for n, p in model.named_parameters() if n.startswith("readout.")]


def run_forward_mode(
    model: nn.Module,
    source: Source,
    loss_kind: str,
    state: State,
    make_estimator: Callable[[CellFunction, int], Estimator],
    *,
    per_step: bool = False,
) -> ForwardModeResult:
    """Step the model over ``source`` at fixed θ, accumulating ``ρ_t + estimator.read(∂ℓ_t/∂s_t)``."""
    cell = cell_function(model)
    B = source.batch_size
    est = make_estimator(cell, B)
    readout = readout_parameters(model)
    first = next(model.parameters())
    s = cell.flatten_state(state).to(first.device, first.dtype)
    total = torch.zeros(cell.P, dtype=first.dtype, device=first.device)
    ro_total = [torch.zeros_like(p) for p in readout]
    steps: list[Gradient] | None = [] if per_step else None
    for a in range(0, source.length, FETCH_STEPS):
        chunk = source.slice(a, min(a + FETCH_STEPS, source.length)).to(first.device, first.dtype)
        for t in range(chunk.length):
            s, g_rec, ro, _ = online_step(model, cell, est, readout, chunk, t, s, loss_kind)
            total += g_rec
            for acc, g in zip(ro_total, ro):
                acc += g
            if steps is not None:
                steps.append(_by_name(cell, model, g_rec, ro))
    return ForwardModeResult(_by_name(cell, model, total, ro_total), cell.unflatten_state(s), steps)


class OnlineEngine:
    """Online training with a forward-mode estimator, under the contract of ``Engine.run``
    (docs/online.md, "Online training").

    :meth:`run` steps the model one step at a time over ``source``, adds each step's estimate
    ``ρ_t + read(∂ℓ_t/∂s_t)`` into the parameters' ``.grad`` and calls ``on_update`` when an update's
    last loss has been added; the callback steps the optimiser. The estimator's carried quantities are
    *not* reset at an update: θ changes under them, which is the online approximation the algorithms
    make. They are reset exactly where the state is (docs/design.md §2.8): a run that starts from the
    state the previous run returned (the same tensors, detached or not) carries them on; any other state
    is a constant and starts them at zero. Updates must be consecutive loss ranges covering the source.
    """

    def __init__(self, model: nn.Module, loss_kind: str, make_estimator: Callable[[CellFunction, int], Estimator],
                 *, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        self.model, self.loss_kind, self.make_estimator = model, loss_kind, make_estimator
        self.cell = cell_function(model)
        first = next(model.parameters())
        self.device = torch.device(device) if device is not None else first.device
        self.dtype = dtype if dtype is not None else first.dtype
        params = dict(model.named_parameters())
        self._recurrent = [params[n] for n in self.cell.names]
        self._readout = readout_parameters(model)
        self._est: Estimator | None = None
        self._est_batch = 0
        self._returned: State | None = None

    def update_steps(self, u: Update) -> tuple[int, int]:
        """Recurrent steps (forward, backward) an update costs here: one forward step per loss, no
        adjoint through the recurrence (the influence work is not a recurrent step; docs/online.md)."""
        return u.loss_end - u.loss_start, 0

    def reset(self) -> None:
        """Forget the carried estimator: the next run starts it at zero whatever its state."""
        self._returned = None

    def run(
        self,
        source: Source,
        updates: Sequence[Update],
        state: State,
        on_update: Callable[[int, Update, torch.Tensor], bool | None] | None = None,
        *,
        fixed_params: bool | None = None,
    ) -> RunResult:
        """Run ``updates`` over ``source`` from ``state`` as :meth:`Engine.run` does (``fixed_params`` is
        accepted for the same signature: θ is read afresh at every step either way)."""
        return drive(self.steps(source, updates, state), len(updates), on_update, self.device, self.dtype)

    def steps(
        self, source: Source, updates: Sequence[Update], state: State, *, fixed_params: bool = False
    ) -> Generator[UpdateStep, None, State]:
        """Yield each update once its estimate is in ``.grad`` (its loss has no graph: ``backward()`` is a
        no-op); return the final state. The consumer may step an optimiser before the next update."""
        check_state(state)
        _check_consecutive(updates, source.length)
        est = self._estimator(source.batch_size, state)
        s = self.cell.flatten_state(state).to(self.device, self.dtype)
        index, acc = 0, torch.zeros((), device=self.device, dtype=self.dtype)
        for a in range(0, source.length, FETCH_STEPS):
            chunk = to_device(source.slice(a, min(a + FETCH_STEPS, source.length)), self.device, self.dtype)
            for t in range(chunk.length):
                s, g_rec, ro, loss = online_step(self.model, self.cell, est, self._readout, chunk, t, s, self.loss_kind)
                self._accumulate(g_rec, ro)
                acc = acc + loss
                if a + t + 1 < updates[index].loss_end:
                    continue
                self._returned = self.cell.unflatten_state(s)
                yield UpdateStep(index, updates[index], acc.detach(), self._returned)
                index, acc = index + 1, torch.zeros_like(acc)
        self._returned = self.cell.unflatten_state(s)
        return self._returned

    def _estimator(self, batch: int, state: State) -> Estimator:
        if self._est is None or self._est_batch != batch:
            self._est, self._est_batch = self.make_estimator(self.cell, batch), batch
        elif not _same_tensors(state, self._returned):
            self._est.reset()
        return self._est

    def _accumulate(self, flat: torch.Tensor, readout: list[torch.Tensor]) -> None:
        pieces = [g.view(p.shape) for g, p in zip(flat.split(self.cell.sizes), self._recurrent)]
        for p, g in zip(self._recurrent + self._readout, pieces + readout):
            if not p.requires_grad:
                continue
            if p.grad is None:
                p.grad = g.detach().clone()
            else:
                p.grad.add_(g)

def _same_tensors(a: State, b: State | None) -> bool:
    """Whether ``a`` is ``b`` or a detached view of it (same storage, shapes and devices, part by part)."""
    if b is None:
        return False
    pa, pb = (a if isinstance(a, tuple) else (a,)), (b if isinstance(b, tuple) else (b,))
    return len(pa) == len(pb) and all(x.data_ptr() == y.data_ptr() and x.shape == y.shape and x.device == y.device
                                      for x, y in zip(pa, pb))


def _check_consecutive(updates: Sequence[Update], length: int) -> None:
    """Refuse a schedule that is not consecutive loss ranges covering ``[0, length)``."""
    end = 0
    for u in updates:
        if u.loss_start != end or u.loss_end <= u.loss_start:
            raise UsageError(f"online training needs updates over consecutive losses from 0 to {length}; got an update "
                             f"over losses {u.loss_start}..{u.loss_end - 1} after one ending at {end}")
        end = u.loss_end
    if end != length:
        raise UsageError(f"online training needs updates covering all {length} losses of a sequence; they end at {end}")


def _by_name(cell: CellFunction, model: nn.Module, flat: torch.Tensor, ro: list[torch.Tensor]) -> Gradient:
    """``{name: tensor}`` for parameters that require grad, in ``named_parameters`` order."""
    pieces = dict(zip(cell.names, (g.reshape(shape) for g, shape in
                                   zip(flat.split(cell.sizes), cell.shapes))))
    pieces.update(zip([n for n, _ in model.named_parameters() if n.startswith("readout.")], ro))
    return {n: pieces[n].detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def itemsize(dtype: torch.dtype) -> int:
    """Bytes per element of a floating dtype."""
    return int(torch.finfo(dtype).bits // 8) if dtype.is_floating_point else int(math.ceil(torch.iinfo(dtype).bits / 8))
