"""Forward mode for models that declare their own one-step function (docs/online.md, "Models that declare their step").

A model offers ``row(theta, x, s) -> s'`` (one batch row; ``theta`` its parameters in ``named_parameters``
order, ``s`` the flat state), a state that is one tensor ``[1, B, S]`` and ``readout(features)`` taking that
state as its features; ``cell_function()`` returns ``DeclaredCell(self)``. The Jacobians, products and
estimators are then those of :class:`~tbptt_bench.core.forward_mode.CellFunction`, unchanged.
"""

from __future__ import annotations

from torch import nn

from tbptt_bench.core.forward_mode import CellFunction
from tbptt_bench.errors import UsageError


class DeclaredCell(CellFunction):
    """A :class:`CellFunction` whose step is the model's declared ``row``; every parameter is recurrent."""

    def __init__(self, model: nn.Module) -> None:  # noqa: super().__init__ checks for the built-in models
        if not callable(getattr(model, "row", None)) or not callable(getattr(model, "readout", None)):
            raise UsageError(f"{type(model).__name__} declares cell_function() but lacks row() or readout(); "
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
