"""The copy task (Arjovsky, Shah & Bengio 2016): remember a few symbols over a long delay of blanks.

Tokens: 0 blank, 1..n_symbols data symbols, n_symbols + 1 marker. A sequence of length T holds
``n_remember`` random symbols, ``T - 2·n_remember - 1`` blanks, the marker, then ``n_remember`` blanks;
the target is blank for the first ``T - n_remember`` steps, then the remembered symbols. Every step is
scored, as in the paper; the metric is accuracy on the recall steps only.
"""

from __future__ import annotations

import math

import torch

from tbptt_bench.errors import UsageError
from tbptt_bench.tasks.base import Batch, Task, register_task

BLANK = 0


@register_task
class CopyTask(Task):
    """Copy ``n_remember`` symbols from an alphabet of ``n_symbols`` after a delay of ``T - 2·n_remember``."""

    name = "copy"
    description = "copy memory task (Arjovsky et al. 2016): recall 10 symbols after a delay of blanks"
    input_kind = "tokens"
    loss_kind = "cross_entropy"
    metric_name = "accuracy"
    metric_higher_is_better = True
    tiny = {"seq_len": 24, "batch_size": 4, "hidden_size": 8}

    def __init__(self, n_symbols: int = 8, n_remember: int = 10) -> None:
        if n_symbols < 1 or n_remember < 1:
            raise UsageError(f"copy: expected n_symbols >= 1 and n_remember >= 1, found {n_symbols}, {n_remember}")
        self.n_symbols = int(n_symbols)
        self.n_remember = int(n_remember)

    @property
    def marker(self) -> int:
        return self.n_symbols + 1

    @property
    def input_size(self) -> int:
        return self.n_symbols + 2

    @property
    def output_size(self) -> int:
        return self.n_symbols + 1

    @property
    def min_seq_len(self) -> int:
        """Shortest sequence: the symbols, a delay of one (just the marker), the recall blanks."""
        return 2 * self.n_remember + 1

    def delay(self, seq_len: int) -> int:
        """The delay ``T - 2·n_remember`` (Arjovsky's T), at least 1."""
        if seq_len < self.min_seq_len:
            raise UsageError(f"copy: seq_len must be at least {self.min_seq_len} (delay >= 1), found {seq_len}")
        return seq_len - 2 * self.n_remember

    def sample(self, batch_size: int, seq_len: int, generator: torch.Generator, split: str = "train") -> Batch:
        """Fresh random sequences; the split name is checked but all splits draw from the same distribution."""
        _check_args(self.name, batch_size, split)
        self.delay(seq_len)
        k = self.n_remember
        symbols = torch.randint(1, self.n_symbols + 1, (batch_size, k), generator=generator)
        inputs = torch.full((batch_size, seq_len), BLANK, dtype=torch.int64)
        inputs[:, :k] = symbols
        inputs[:, seq_len - k - 1] = self.marker
        targets = torch.full((batch_size, seq_len), BLANK, dtype=torch.int64)
        targets[:, seq_len - k :] = symbols
        weights = torch.ones(batch_size, seq_len)
        return Batch(inputs, targets, weights)

    def metric(self, outputs: torch.Tensor, batch: Batch) -> float:
        """Accuracy of the arg-max class over the ``n_remember`` recall steps of whole sequences."""
        k = self.n_remember
        predicted = outputs[:, -k:].argmax(dim=-1)
        return float((predicted == batch.targets[:, -k:]).double().mean())

    def baseline(self, seq_len: int) -> float:
        """Recall accuracy of the memoryless strategy (blanks, then symbols guessed uniformly): 1/n_symbols."""
        self.delay(seq_len)
        return 1.0 / self.n_symbols

    def baseline_cross_entropy(self, seq_len: int) -> float:
        """Mean cross-entropy per step (nats) of the memoryless strategy: ``n_remember·ln(n_symbols)/T``.

        It predicts blank with certainty for ``T - n_remember`` steps (loss 0), then the uniform
        distribution over the data symbols (loss ``ln n_symbols`` per step); Arjovsky et al.'s baseline.
        """
        self.delay(seq_len)
        return self.n_remember * math.log(self.n_symbols) / seq_len


def _check_args(task: str, batch_size: int, split: str) -> None:
    if batch_size < 1:
        raise UsageError(f"{task}: batch_size must be at least 1, found {batch_size}")
    if split not in ("train", "valid", "test"):
        raise UsageError(f"{task}: unknown split {split!r}; accepted: train, valid, test")
