"""The ``influence-linear`` model: the linear system of the influence-balancing task, with θ as its one parameter.

``s_t = A s_{t−1} + θ v`` from ``s_0 = (1, …, 1)`` (:mod:`tbptt_bench.tasks.influence` defines A, v and the
closed forms); the output is the first unit, ``s¹_t``. The state is one tensor ``[1, B, n]`` as in the
built-in models. The model declares its one-step function per row (:meth:`InfluenceLinear.row`), so the
forward-mode estimators (``rtrl``, ``snap``, ``uoro``, ``kfrtrl``) run on it as on the built-in cells.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from tbptt_bench.errors import UsageError
from tbptt_bench.models.protocol import State, register_model


class InfluenceLinear(nn.Module):
    """``s_t = A s_{t−1} + θ v``, output ``s¹_t``; A and v are fixed buffers, θ the only parameter."""

    def __init__(self, transition: np.ndarray, signs: np.ndarray, theta0: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("transition", torch.as_tensor(transition, dtype=torch.float32))
        self.register_buffer("signs", torch.as_tensor(signs, dtype=torch.float32))
        self.theta = nn.Parameter(torch.tensor([float(theta0)]))
        self.size = int(self.signs.numel())

    def initial_state(self, batch_size: int) -> State:
        return self.signs.new_ones(1, batch_size, self.size)

    def core(self, inputs: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """Every step's state ``[B, L, n]`` (the features) and the last ``[1, B, n]``."""
        assert isinstance(state, torch.Tensor)
        s, drive, states = state[0], self.theta * self.signs, []
        for _ in range(inputs.shape[1]):
            s = s @ self.transition.T + drive
            states.append(s)
        return torch.stack(states, dim=1), s[None]

    def readout(self, features: torch.Tensor) -> torch.Tensor:
        """The observed unit ``s¹``: ``[..., 1]``."""
        return features[..., :1]

    def forward(self, inputs: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        features, state = self.core(inputs, state)
        return self.readout(features), state

    def row(self, theta: tuple[torch.Tensor, ...], x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """One step of one row at parameters ``theta`` (``(θ,)``): the per-row recurrence forward mode differentiates."""
        return self.transition @ s + theta[0] * self.signs


@register_model("influence-linear")
def build_influence_linear(task, hidden_size: int, num_layers: int = 1, theta0: float = 0.0) -> InfluenceLinear:  # type: ignore[no-untyped-def]
    """The influence-balancing task's system; ``hidden_size`` must be the task's ``n`` and ``num_layers`` 1."""
    if not callable(getattr(task, "transition", None)) or not callable(getattr(task, "signs", None)):
        raise UsageError(f"influence-linear runs the influence-balancing task only, not {task.name!r}")
    if hidden_size != task.n or num_layers != 1:
        raise UsageError(f"influence-linear: the state size is the task's n = {task.n} with one layer; "
                         f"set hidden_size = {task.n} and num_layers = 1 (got {hidden_size}, {num_layers})")
    return InfluenceLinear(task.transition(), task.signs(), theta0)
