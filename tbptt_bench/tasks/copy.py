"""The copy task (Arjovsky, Shah & Bengio 2016): remember a few symbols over a long delay of blanks.

Tokens: 0 blank, 1..n_symbols data symbols, n_symbols + 1 marker. A sequence of length T holds
``n_remember`` random symbols, ``T - 2·n_remember - 1`` blanks, the marker, then ``n_remember`` blanks;
the target is blank for the first ``T - n_remember`` steps, then the remembered symbols. Every step is
scored, as in the paper; the metric is accuracy on the recall steps only.

Baselines (derived in docs/tasks.md, "Baselines"): the recall steps see a blank input exactly like the
delay steps, so a memoryless predictor outputs one distribution on both. Its loss optimum mixes the two
targets (accuracy 0 once blank dominates); the accuracy 1/n_symbols of guessing a symbol needs either a
worse loss (memoryless) or one bit of timing memory (the marker has been seen): Arjovsky et al.'s
``n_remember·ln(n_symbols)`` per sequence.
"""

from __future__ import annotations

import math

import torch

from tbptt_bench.errors import UsageError
from tbptt_bench.tasks.base import MEMORYLESS_OPTIMUM, Baseline, Batch, Task, best_memoryless_metric, register_task

BLANK = 0
MEMORYLESS_BEST_ACCURACY = "memoryless, best accuracy"
TIMING_AWARE = "timing-aware (knows when to recall)"


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
        """The best recall accuracy without memory, ``1/n_symbols`` (:meth:`baselines`, docs/tasks.md)."""
        return best_memoryless_metric(self, self.baselines(seq_len))

    def baselines(self, seq_len: int) -> tuple[Baseline, ...]:
        """Memoryless optimum, memoryless best accuracy, timing-aware; losses in nats per step (all T scored).

        With n symbols, k recalled, delay d = T - 2k: the blank input is seen on ``q = d - 1`` delay steps
        (target blank) and k recall steps (target uniform over the symbols), ``q + k = T - k - 1`` steps.
        """
        d = self.delay(seq_len)
        n, k, t = self.n_symbols, self.n_remember, seq_len
        quiet, pool = d - 1, d - 1 + k
        # Loss optimum on a blank input: the target mixture, blank q/(q+k), each symbol k/(n(q+k)).
        optimum_loss = (_xlogx(pool) - _xlogx(quiet) - _xlogx(k) + k * math.log(n)) / t
        optimum_accuracy = 0.0 if quiet * n >= k else 1.0 / n  # arg-max ties go to the first class, blank
        if quiet * n < k:
            best_loss = optimum_loss
        else:  # a symbol must tie blank at the top: both a = (q + k/n)/(2(q+k)), the others k/(n(q+k))
            alpha, beta = quiet + k / n, k * (n - 1) / n
            others = beta * math.log(k / (n * pool)) if n > 1 else 0.0
            best_loss = -(alpha * math.log(alpha / (2 * pool)) + others) / t
        return (
            Baseline(MEMORYLESS_OPTIMUM, optimum_accuracy, optimum_loss,
                     "blank input → blank with p = q/(q+k), each symbol k/(n(q+k)); symbol or marker input → "
                     "blank; loss [(q+k)ln(q+k) − q ln q − k ln k + k ln n]/T, accuracy 0 if q·n ≥ k else 1/n"),
            Baseline(MEMORYLESS_BEST_ACCURACY, 1.0 / n, best_loss,
                     "as the optimum, but a symbol ties blank at the top on a blank input (an infimum: it must "
                     "exceed it by a hair); accuracy 1/n at loss −[α ln(α/(2(q+k))) + β ln(k/(n(q+k)))]/T, "
                     "α = q + k/n, β = k(n−1)/n, when q·n ≥ k (else the optimum)"),
            Baseline(TIMING_AWARE, 1.0 / n, k * math.log(n) / t,
                     "one bit of memory (the marker has passed): blank with certainty before the recall, the "
                     "uniform distribution over the symbols on it; loss k·ln n / T, accuracy 1/n",
                     memoryless=False),
        )

    def baseline_cross_entropy(self, seq_len: int) -> float:
        """Loss per step (nats) of the timing-aware baseline, ``n_remember·ln(n_symbols)/T``: Arjovsky et al.'s.

        It predicts blank with certainty for ``T - n_remember`` steps (loss 0), then the uniform
        distribution over the data symbols (loss ``ln n_symbols`` per step). It needs to know when the recall
        starts, which a memoryless predictor cannot (see :meth:`baselines`).
        """
        self.delay(seq_len)
        return self.n_remember * math.log(self.n_symbols) / seq_len


def _xlogx(x: float) -> float:
    return x * math.log(x) if x > 0 else 0.0


def _check_args(task: str, batch_size: int, split: str) -> None:
    if batch_size < 1:
        raise UsageError(f"{task}: batch_size must be at least 1, found {batch_size}")
    if split not in ("train", "valid", "test"):
        raise UsageError(f"{task}: unknown split {split!r}; accepted: train, valid, test")
