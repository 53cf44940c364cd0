"""Online (forward-mode) gradient estimators as methods: ``rtrl``, ``snap:n``, ``uoro``, ``kfrtrl``, ``rflo:tau``.

They are not masks: each carries a stand-in for the influence matrix ``M_t = ∂s_t/∂θ`` forward in time
and reads ``∂ℓ_t/∂θ ≈ ρ_t + (∂ℓ_t/∂s_t) M̂_t`` off it at every loss (docs/design.md §7.3). The runner
and the recursions are in :mod:`tbptt_bench.core.forward_mode`; a family here declares its parameters,
the models it is defined for and the estimator it carries.

* ``rtrl`` — exact RTRL: ``M_t = D_t M_{t−1} + I_t``. At fixed θ, ``Σ_t`` of its estimates is the full
  BPTT gradient. Memory ``B·S·P`` (≈ B·H³ for a tanh RNN), time ≈ ``B·S²·P`` per step (≈ B·H⁴).
* ``snap:n=N[,storage=dense|sparse]`` — SnAp-N (Menick et al. 2021): RTRL with ``M_t`` masked after every
  step to the entries a parameter can reach within N steps (N = 1: the pattern of ``I_t``). ``dense`` (the
  default) computes the masked ``B·S·P`` recursion (RTRL's cost); ``sparse`` stores only the pattern's entries
  and updates them with gathers and scatter-adds (:mod:`tbptt_bench.core.sparse_snap`): the same estimate,
  memory ``B·|Π_N|``. On a sparse core (model parameter ``sparsity``) SnAp-2's pattern is a small part of ``S·P``.
* ``uoro`` — UORO (Tallec & Ollivier 2017): a rank-one, unbiased ``M̂_t = h̃_t θ̃_tᵀ`` per row. Memory
  ``B·(S + P)``, time a small multiple of a forward step. Signs come from a ``torch.Generator`` seeded
  with ``derive_seed("online-signs", seed, spec)``; it advances across sequences, so successive
  estimates (bias batches) use fresh draws.
* ``kfrtrl`` — KF-RTRL (Mujika, Meier & Steger 2018), one-layer tanh RNN: per weight matrix a
  Kronecker product ``û ⊗ Â`` with one random sign per step, unbiased (:mod:`tbptt_bench.core.kfrtrl`).
  Memory ``B·(2H² + E + H + 2 + V)``.
* ``rflo:tau=τ`` — RFLO's eligibility trace (Murray 2019) for the tanh RNN with the true read-out as
  feedback: ``M_t = (1 − 1/τ) M_{t−1} + (1/τ) I_t``, the recurrence ``D_t`` dropped. The project's RNN
  has no leak (τ = 1 in Murray's model), where the trace is the immediate Jacobian alone.

Every family updates online: one update every ``every`` steps (default 1); at fixed θ the schedule
does not change the estimate. In training (``OnlineEngine``) the optimiser steps at each of those
updates while the carried estimate runs on under the changed θ, across updates and stream segments. ``updates()`` gives that schedule with the mask of the gradient the
estimator approximates (every contribution kept), which is what ``explain`` shows; estimates never go
through the mask. Families holding a dense influence matrix refuse, before allocating, a matrix above
``max_mib`` MiB.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, ClassVar

import numpy as np
import torch

from tbptt_bench.core.kfrtrl import KroneckerFactors, generator_signs
from tbptt_bench.core.forward_mode import (
    CellFunction, DeclaredCell, Estimator, Influence, RankOne, check_influence_memory, itemsize, structural_pattern,
)
from tbptt_bench.core.mask import Update
from tbptt_bench.core.sparse_snap import SparseInfluence
from tbptt_bench.errors import UsageError
from tbptt_bench.methods.base import Method, Param, positive_int, register_method
from tbptt_bench.models.recurrent import CELL_TYPES
from tbptt_bench.seeding import derive_seed

#: Default limit on a dense influence matrix, in MiB.
DEFAULT_MAX_MIB = 1024


def max_mib() -> Param:
    return Param(int, DEFAULT_MAX_MIB, lambda v: v >= 1, "a memory limit in MiB, an integer ≥ 1", False)


class OnlineMethod(Method):
    """A method that computes its estimate by forward-mode accumulation instead of a mask."""

    forward_mode: ClassVar[bool] = True
    #: Cell types of the built-in models the estimator is defined for.
    cells: ClassVar[tuple[str, ...]] = CELL_TYPES
    #: Whether it also runs models that declare their own step (``DeclaredCell``, docs/online.md).
    declared: ClassVar[bool] = True

    def updates(self, length: int, first_update: int = 0, rng: np.random.Generator | None = None) -> list[Update]:
        every = self.params.get("every") or 1
        return [Update(a, min(a + every, length), 0) for a in range(0, length, every)]

    def estimator(self, cell: CellFunction, batch: int, generator: torch.Generator | None = None) -> Estimator:
        """The estimator for this model and batch size; refuses models and sizes it is not defined for.

        ``generator``: where a randomised estimator draws (training passes one seeded from the run's seed);
        None: the method's own."""
        if cell.cell not in self.cells and not (self.declared and isinstance(cell, DeclaredCell)):
            raise UsageError(f"{self.spec} is defined for {', '.join(self.cells)} models only, not {cell.cell}; "
                             f"use rtrl, snap or uoro for {cell.cell}")
        return self._estimator(cell, batch, generator)

    @abstractmethod
    def _estimator(self, cell: CellFunction, batch: int, generator: torch.Generator | None) -> Estimator: ...

    def _check_memory(self, cell: CellFunction, batch: int) -> None:
        dtype = next(cell.model.parameters()).dtype
        check_influence_memory(cell, batch, self.params["max_mib"], self.spec, itemsize(dtype))


@register_method
class RTRL(OnlineMethod):
    family = "rtrl"
    summary = "real-time recurrent learning: exact influence matrix carried forward (online, forward mode)"
    schema = {"every": positive_int(1, required=False), "max_mib": max_mib()}

    def _estimator(self, cell: CellFunction, batch: int, generator: torch.Generator | None) -> Estimator:
        self._check_memory(cell, batch)
        return Influence(cell, batch, "exact")


@register_method
class SnAp(OnlineMethod):
    family = "snap"
    summary = "SnAp-n: RTRL with the influence matrix kept to the entries reachable in n steps (Menick et al.)"
    schema = {"n": positive_int(1, required=False), "every": positive_int(1, required=False), "max_mib": max_mib(),
              "storage": Param(str, None, lambda v: v in ("dense", "sparse"), "dense or sparse (default dense)", False)}
    declared = False  # its pattern is read off the built-in cells' encoder

    def _estimator(self, cell: CellFunction, batch: int, generator: torch.Generator | None) -> Estimator:
        pattern_seed = torch.Generator().manual_seed(derive_seed("snap-pattern"))
        if self.params["storage"] == "sparse":
            sparse = SparseInfluence(cell, batch, self.params["n"], pattern_seed)
            dtype = next(cell.model.parameters()).dtype
            need = batch * sparse.entries * itemsize(dtype)
            if need > self.params["max_mib"] * 2**20:
                raise UsageError(f"{self.spec}: the stored influence needs {need / 2**20:.0f} MiB (batch {batch} × "
                                 f"{sparse.entries} pattern entries × {itemsize(dtype)} bytes), above "
                                 f"max_mib={self.params['max_mib']}; lower the batch or n, or raise max_mib")
            return sparse
        self._check_memory(cell, batch)
        pattern = structural_pattern(cell, self.params["n"], pattern_seed)
        return Influence(cell, batch, "exact", pattern=pattern.to(next(cell.model.parameters()).dtype))


@register_method
class UORO(OnlineMethod):
    family = "uoro"
    deterministic = False  # draws random signs: its estimate at frozen θ depends on them
    summary = "UORO: unbiased rank-one influence estimate with random signs (Tallec & Ollivier)"
    schema = {"every": positive_int(1, required=False), "seed": Param(int, 0, lambda v: v >= 0, "an integer ≥ 0", False)}

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self._generator = torch.Generator().manual_seed(derive_seed("online-signs", self.params["seed"], self.spec))

    def _estimator(self, cell: CellFunction, batch: int, generator: torch.Generator | None) -> Estimator:
        return RankOne(cell, batch, generator if generator is not None else self._generator)


@register_method
class KFRTRL(OnlineMethod):
    family = "kfrtrl"
    deterministic = False  # draws random signs: its estimate at frozen θ depends on them
    summary = "KF-RTRL: unbiased Kronecker-factored influence per weight matrix (Mujika, Meier & Steger 2018)"
    cells = ("rnn",)
    declared = False
    schema = {"every": positive_int(1, required=False), "seed": Param(int, 0, lambda v: v >= 0, "an integer ≥ 0", False)}

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self._generator = torch.Generator().manual_seed(derive_seed("online-signs", self.params["seed"], self.spec))

    def _estimator(self, cell: CellFunction, batch: int, generator: torch.Generator | None) -> Estimator:
        return KroneckerFactors(cell, batch, generator_signs(generator if generator is not None else self._generator))


@register_method
class RFLO(OnlineMethod):
    family = "rflo"
    summary = "RFLO eligibility trace (Murray 2019), tanh RNN, true read-out as feedback: leaky immediate Jacobian"
    cells = ("rnn",)
    declared = False
    schema = {
        "tau": Param(float, 1.0, lambda v: v >= 1.0, "a time constant ≥ 1", False),
        "every": positive_int(1, required=False),
        "max_mib": max_mib(),
    }

    def _estimator(self, cell: CellFunction, batch: int, generator: torch.Generator | None) -> Estimator:
        self._check_memory(cell, batch)
        return Influence(cell, batch, "leak", tau=self.params["tau"])
