"""Influence balancing (Tallec & Ollivier 2017, "Unbiasing Truncated Backpropagation Through Time"; and
ICLR 2018, "Unbiased Online Recurrent Optimization", §6): a linear system in which one scalar parameter
pushes the observed unit up in the short term and down in the long term.

The dynamics (run by the ``influence-linear`` model, :mod:`tbptt_bench.models.influence`) are

    s_t = A s_{t−1} + θ v,    A = a·I + b·N (N the upper shift),    v = (+1 × n_positive, −1 × (n − n_positive)),

from ``s_0 = (1, …, 1)``, with the loss ``(s¹_t − target)²`` at every step of one endless stream (the
project's MSE: the squared error, without the ½). θ reaches unit 1 through unit j after ``j − 1`` steps,
so the first ``n_positive`` lags see ``+θ`` and the later ones ``−θ``. Defaults as in the reproductions
of the UORO experiment: n = 23, n_positive = 10, a = b = ½.

Closed forms (derived in docs/reproductions.md), used by the tests and the report:

* the lag-d influence of θ on s¹ is ``a_d = (A^d v)₁``; the truncated influence ``Σ_{d<K} a_d`` starts
  at +1 per lag and turns negative only at the **balance horizon** ``K*`` (41 for the defaults);
* at the fixed point ``s* = θ (I − A)⁻¹ v`` the full influence is ``Σ_d a_d = ((I − A)⁻¹ v)₁``
  (−6 for the defaults), so the loss is minimal at ``θ* = target / ((I − A)⁻¹ v)₁`` (−1/6).

The input is one zero channel (the system is driven by θ alone); the streams are deterministic, so
every split is the same stream. The metric is the MSE of s¹ over the scored steps.
"""

from __future__ import annotations

import numpy as np
import torch

from tbptt_bench.errors import UsageError
from tbptt_bench.tasks.base import MEMORYLESS_OPTIMUM, Baseline, Batch, Task, register_task

SPLITS = ("train", "valid", "test")


@register_task
class InfluenceBalancingTask(Task):
    """Track a constant target with a linear system whose parameter's short- and long-term influences differ in sign."""

    name = "influence-balancing"
    description = "influence balancing (Tallec & Ollivier 2017): short-term and long-term influence of θ of opposite sign"
    input_kind = "real"
    loss_kind = "mse"
    metric_name = "mse"
    metric_higher_is_better = False
    streaming = True
    tiny = {"seq_len": 12, "batch_size": 1, "hidden_size": 23}

    def __init__(self, n: int = 23, n_positive: int = 10, diagonal: float = 0.5, superdiagonal: float = 0.5,
                 target: float = 1.0, length: int = 20000, valid_length: int = 400) -> None:
        if n < 2 or not 0 < n_positive < n:
            raise UsageError(f"influence-balancing: expected n ≥ 2 and 0 < n_positive < n, found n={n}, "
                             f"n_positive={n_positive}")
        if not abs(diagonal) < 1:
            raise UsageError(f"influence-balancing: the system must be stable (A's eigenvalues are the diagonal), "
                             f"|diagonal| < 1; found {diagonal}")
        if length < 1 or valid_length < 1:
            raise UsageError(f"influence-balancing: length and valid_length must be ≥ 1, found {length}, {valid_length}")
        self.n, self.n_positive = int(n), int(n_positive)
        self.diagonal, self.superdiagonal, self.target = float(diagonal), float(superdiagonal), float(target)
        self.length, self.valid_length = int(length), int(valid_length)

    @property
    def input_size(self) -> int:
        return 1

    @property
    def output_size(self) -> int:
        return 1

    # -- the system -------------------------------------------------------------------------------
    def transition(self) -> np.ndarray:
        """``A``: ``diagonal`` on the diagonal, ``superdiagonal`` above it, float64 ``[n, n]``."""
        return self.diagonal * np.eye(self.n) + self.superdiagonal * np.eye(self.n, k=1)

    def signs(self) -> np.ndarray:
        """``v``: +1 on the first ``n_positive`` units, −1 on the rest."""
        return np.where(np.arange(self.n) < self.n_positive, 1.0, -1.0)

    def lag_influences(self, max_lag: int) -> np.ndarray:
        """``a_d = (A^d v)₁`` for ``d = 0 … max_lag − 1``: what θ applied d steps back adds to s¹."""
        A, x, out = self.transition(), self.signs(), []
        for _ in range(max_lag):
            out.append(x[0])
            x = A @ x
        return np.array(out)

    def full_influence(self) -> float:
        """``Σ_d a_d = ((I − A)⁻¹ v)₁``: the influence of θ on s¹ at the fixed point."""
        return float(np.linalg.solve(np.eye(self.n) - self.transition(), self.signs())[0])

    def optimum(self) -> float:
        """``θ*``: the parameter whose fixed point puts s¹ on the target."""
        return self.target / self.full_influence()

    def balance_horizon(self, max_lag: int = 10000) -> int:
        """``K*``: the smallest K whose truncated influence ``Σ_{d<K} a_d`` has the sign of the full one."""
        sums = np.cumsum(self.lag_influences(max_lag))
        agree = np.nonzero(np.sign(sums) == np.sign(self.full_influence()))[0]
        if agree.size == 0:
            raise UsageError(f"influence-balancing: the truncated influence keeps the wrong sign up to {max_lag} lags")
        return int(agree[0]) + 1

    def segment_influence(self, mask: np.ndarray) -> float:
        """Σ over the losses of a segment of the influence each keeps: ``Σ_t Σ_{s ≤ t} m(t, s)·a_{t−s}``.

        ``mask`` is the segment's ``T × T`` mask m(t, s) (docs/design.md §2.3; ``tbptt_bench.method_mask(spec, T)``,
        ones on and below the diagonal for full BPTT). Where ``s¹ − target`` is the same constant e at every step
        (the fixed point of θ = 0 started from the zero state: e = −target), the truncated gradient is
        ``2·e·segment_influence`` (the loss is the squared error) and its sign is this number's times e's.
        """
        m = np.asarray(mask, dtype=float)
        if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] < 1:
            raise UsageError(f"segment_influence: expected a square T × T mask, got shape {m.shape}")
        t, s = np.tril_indices(m.shape[0])
        return float((m[t, s] * self.lag_influences(m.shape[0])[t - s]).sum())

    # -- data --------------------------------------------------------------------------------------
    def sample(self, batch_size: int, seq_len: int, generator: torch.Generator, split: str = "train") -> Batch:
        """``seq_len`` steps of the (deterministic) stream for every row: zero input, the target, all scored."""
        if batch_size < 1 or seq_len < 1:
            raise UsageError(f"influence-balancing: batch_size and seq_len must be ≥ 1, found {batch_size}, {seq_len}")
        if split not in SPLITS:
            raise UsageError(f"influence-balancing: unknown split {split!r}; accepted: {', '.join(SPLITS)}")
        inputs = torch.zeros(batch_size, seq_len, 1)
        targets = torch.full((batch_size, seq_len, 1), self.target)
        return Batch(inputs, targets, torch.ones(batch_size, seq_len))

    def stream(self, batch_size: int, split: str = "train") -> Batch:
        """The stream: ``length`` steps for train, ``valid_length`` otherwise."""
        return self.sample(batch_size, self.length if split == "train" else self.valid_length, torch.Generator(), split)

    def metric(self, outputs: torch.Tensor, batch: Batch) -> float:
        """Mean squared error of s¹ over the scored steps."""
        squared = (outputs.double() - batch.targets.double()).pow(2).sum(dim=-1)
        w = batch.weights.double()
        return float((w * squared).sum() / w.sum())

    def baseline(self, seq_len: int) -> float:
        """0: the target is a constant, which a predictor without memory outputs exactly."""
        return 0.0

    def baselines(self, seq_len: int) -> tuple[Baseline, ...]:
        """The constant target (MSE 0): the task tests the optimiser, not memory."""
        return (Baseline(MEMORYLESS_OPTIMUM, 0.0, 0.0, "the constant target; MSE 0 (the task tests optimisation)"),)
