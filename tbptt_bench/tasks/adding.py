"""The adding problem (Hochreiter & Schmidhuber 1997, in the form of Le, Jaitly & Hinton 2015).

Two input channels: values drawn uniformly from [0, 1), and markers, exactly one 1 among the first
``⌊T/2⌋`` steps and one among the rest. The target is the sum of the two marked values, scored only at
the last step with the squared error.

Baselines (derived in docs/tasks.md, "Baselines"): the classic constant prediction E[U₁ + U₂] = 1 has
mean squared error Var(U₁ + U₂) = 1/12 + 1/12 = 1/6. It is not the memoryless optimum: the second marker
falls on the scored last step with probability p = 1/⌈T/2⌉, and then the input there shows one of the two
summands. The best memoryless prediction, E[S | value v, marker m] = 1 + m·(v − 1/2), has mean squared
error p/12 + (1 − p)/6 = 1/6 − 1/(12⌈T/2⌉).
"""

from __future__ import annotations

import torch

from tbptt_bench.errors import UsageError
from tbptt_bench.tasks.base import MEMORYLESS_OPTIMUM, Baseline, Batch, Task, best_memoryless_metric, register_task

CONSTANT = "constant (predicts E[sum] = 1)"


@register_task
class AddingTask(Task):
    """Sum the two marked values of a sequence; MSE at the last step."""

    name = "adding"
    description = "adding problem (Hochreiter & Schmidhuber 1997): sum of two marked uniform values"
    input_kind = "real"
    loss_kind = "mse"
    metric_name = "mse"
    metric_higher_is_better = False
    tiny = {"seq_len": 12, "batch_size": 4, "hidden_size": 8}

    @property
    def input_size(self) -> int:
        return 2

    @property
    def output_size(self) -> int:
        return 1

    def sample(self, batch_size: int, seq_len: int, generator: torch.Generator, split: str = "train") -> Batch:
        """Fresh random sequences; the split name is checked but all splits draw from the same distribution.

        ``inputs[..., 0]`` are the values, ``inputs[..., 1]`` the markers; the target (the sum) is placed at
        every step but weighted only at the last.
        """
        if batch_size < 1:
            raise UsageError(f"adding: batch_size must be at least 1, found {batch_size}")
        if split not in ("train", "valid", "test"):
            raise UsageError(f"adding: unknown split {split!r}; accepted: train, valid, test")
        if seq_len < 2:
            raise UsageError(f"adding: seq_len must be at least 2 (one marker in each half), found {seq_len}")
        half = seq_len // 2
        values = torch.rand(batch_size, seq_len, generator=generator, dtype=torch.float32)  # not the default dtype
        first = torch.randint(0, half, (batch_size,), generator=generator)
        second = torch.randint(half, seq_len, (batch_size,), generator=generator)
        rows = torch.arange(batch_size)
        markers = torch.zeros(batch_size, seq_len, dtype=torch.float32)
        markers[rows, first] = 1.0
        markers[rows, second] = 1.0
        total = values[rows, first] + values[rows, second]
        inputs = torch.stack([values, markers], dim=-1)
        targets = total[:, None, None].expand(batch_size, seq_len, 1).contiguous()
        weights = torch.zeros(batch_size, seq_len, dtype=torch.float32)
        weights[:, -1] = 1.0
        return Batch(inputs, targets, weights)

    def metric(self, outputs: torch.Tensor, batch: Batch) -> float:
        """Mean squared error over the scored steps (the last step), summed over output channels."""
        squared = (outputs.double() - batch.targets.double()).pow(2).sum(dim=-1)
        w = batch.weights.double()
        return float((w * squared).sum() / w.sum())

    def baseline(self, seq_len: int) -> float:
        """MSE of the memoryless optimum, ``1/6 − 1/(12⌈T/2⌉)`` (:meth:`baselines`, docs/tasks.md)."""
        return best_memoryless_metric(self, self.baselines(seq_len))

    def baselines(self, seq_len: int) -> tuple[Baseline, ...]:
        """The memoryless optimum and the constant 1; the loss per scored step is the metric (one scored step)."""
        if seq_len < 2:
            raise UsageError(f"adding: seq_len must be at least 2 (one marker in each half), found {seq_len}")
        p = 1.0 / (seq_len - seq_len // 2)  # the second marker falls on the last step: 1/⌈T/2⌉
        optimum = p / 12.0 + (1.0 - p) / 6.0
        return (
            Baseline(MEMORYLESS_OPTIMUM, optimum, optimum,
                     "E[sum | value v, marker m] = 1 + m·(v − 1/2) at the last step: MSE p/12 + (1 − p)/6 = "
                     "1/6 − p/12 with p = 1/⌈T/2⌉ the chance that the second marker is on the last step"),
            Baseline(CONSTANT, 1.0 / 6.0, 1.0 / 6.0,
                     "the constant E[U₁ + U₂] = 1, ignoring the inputs: MSE Var(U₁ + U₂) = 1/12 + 1/12 = 1/6"),
        )
