"""Streaming copy (after Aicher, Foti & Fox 2019): reproduce each symbol a lag of m steps later.

Two layouts of the stream, both with ``n_symbols`` (default 6) token values and B parallel streams:

* ``delay`` (default): every input is drawn uniformly from the n symbols; the target at step t is the
  input at step t - m, scored for t ≥ m (weight 0 before). m is fixed (``lag``). Metric: accuracy on the
  scored steps. Baseline: the input at t - m is independent of everything a memoryless predictor sees,
  so any prediction is right with probability **1/n** (1/6); the best loss is ln n (the uniform
  distribution). Knowing the time does not help: every scored step looks the same.
* ``blocks`` (the generator of Aicher et al.'s public code): blocks of length L drawn uniformly from
  ``[min_lag, lag]``; a block writes a marker (token 1) and L - 1 data symbols (tokens 2..n-1) as input,
  then L blanks (token 0) while the target repeats the block — so every echoed token is the input L
  steps earlier; all other targets are blank. Streams start at a random phase. Every step is scored
  (as in their training) except echoes of inputs before the stream start. Metric: accuracy on the echo
  steps. Baseline: echo steps all see a blank input, so a memoryless predictor outputs one constant
  there; a fraction r = 1/E[L] of echoes are markers and (1 - r)/(n-2) are any one data symbol,
  so its accuracy is the larger of the two (0.225 for L = 10, n = 6). One bit of memory (the previous
  input was not blank, so this is the first echo step, a marker) lifts it to r + (1 - r)/(n-2) (0.325).
  Loss optima and their derivation: :meth:`CopyStreamTask.baselines` and docs/tasks.md, "Baselines".

The streams are fixed per (``seed``, split), ``length`` steps for train and ``valid_length`` for
valid/test, like a corpus; :meth:`CopyStreamTask.sample` draws fresh independent streams.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from tbptt_bench.errors import UsageError
from tbptt_bench.seeding import derive_seed, generator
from tbptt_bench.tasks.base import MEMORYLESS_OPTIMUM, Baseline, Batch, Task, best_memoryless_metric, register_task

BLANK, MARKER = 0, 1
TIMING_AWARE = "timing-aware (knows when an echo starts)"
LAYOUTS = ("delay", "blocks")
SPLITS = ("train", "valid", "test")


@register_task
class CopyStreamTask(Task):
    """Reproduce each symbol of a stream m steps later; state carried across stream segments."""

    name = "copy-stream"
    description = "streaming copy (Aicher et al. 2019): output the input from `lag` steps earlier"
    input_kind = "tokens"
    loss_kind = "cross_entropy"
    metric_name = "accuracy"
    metric_higher_is_better = True
    streaming = True
    tiny = {"seq_len": 16, "batch_size": 4, "hidden_size": 8}

    def __init__(
        self,
        lag: int = 10,
        min_lag: int | None = None,
        n_symbols: int = 6,
        layout: str = "delay",
        length: int = 4000,
        valid_length: int = 1000,
        seed: int = 0,
    ) -> None:
        if layout not in LAYOUTS:
            raise UsageError(f"copy-stream: unknown layout {layout!r}; accepted: {', '.join(LAYOUTS)}")
        min_lag = lag if min_lag is None else min_lag
        if not 1 <= min_lag <= lag:
            raise UsageError(f"copy-stream: expected 1 ≤ min_lag ≤ lag, found min_lag={min_lag}, lag={lag}")
        if layout == "delay" and min_lag != lag:
            raise UsageError(
                "copy-stream: a lag range needs layout=blocks (in the delay layout nothing in the input tells "
                f"the model the lag); found min_lag={min_lag}, lag={lag}"
            )
        if n_symbols < (3 if layout == "blocks" else 2):
            raise UsageError(f"copy-stream: n_symbols must be ≥ 2 (≥ 3 for blocks: blank, marker, data), "
                             f"found {n_symbols}")
        if length < 1 or valid_length < 1:
            raise UsageError(f"copy-stream: length and valid_length must be ≥ 1, found {length}, {valid_length}")
        self.lag, self.min_lag, self.n_symbols, self.layout = int(lag), int(min_lag), int(n_symbols), layout
        self.length, self.valid_length, self.seed = int(length), int(valid_length), int(seed)

    @property
    def input_size(self) -> int:
        return self.n_symbols

    @property
    def output_size(self) -> int:
        return self.n_symbols

    def sample(self, batch_size: int, seq_len: int, generator: torch.Generator, split: str = "train") -> Batch:
        """B fresh independent streams of ``seq_len`` steps drawn with ``generator``."""
        _check(batch_size, split)
        if seq_len < 1:
            raise UsageError(f"copy-stream: seq_len must be ≥ 1, found {seq_len}")
        if self.layout == "delay":
            return self._delay(batch_size, seq_len, generator)
        return self._blocks(batch_size, seq_len, generator)

    def stream(self, batch_size: int, split: str = "train") -> Batch:
        """The split's fixed B streams (``length`` steps for train, ``valid_length`` otherwise)."""
        _check(batch_size, split)
        n = self.length if split == "train" else self.valid_length
        return self.sample(batch_size, n, generator(derive_seed("copy-stream", self.seed, split)), split)

    def metric(self, outputs: torch.Tensor, batch: Batch) -> float:
        """Accuracy of the arg-max on scored steps (delay) or scored echo steps (blocks); NaN if none."""
        scored = batch.weights > 0
        if self.layout == "blocks":
            scored = scored & (batch.targets != BLANK)
        if not bool(scored.any()):
            return float("nan")
        correct = outputs.argmax(dim=-1) == batch.targets
        return float(correct[scored].double().mean())

    def baseline(self, seq_len: int) -> float:
        """Accuracy of the best memoryless predictor (see the module docstring and :meth:`baselines`)."""
        return best_memoryless_metric(self, self.baselines(seq_len))

    def baselines(self, seq_len: int) -> tuple[Baseline, ...]:
        """Long-run accuracy and loss per scored step (nats) of the reference predictors; ``seq_len`` is unused.

        delay: the memoryless optimum only (timing is no help). blocks: with r = 1/E[L] and d = n - 2 data
        symbols, the memoryless optimum and the one-bit timing-aware predictor; half the scored steps are
        echoes (the other half, block inputs, have blank targets and cost nothing).
        """
        n = self.n_symbols
        if self.layout == "delay":
            return (Baseline(MEMORYLESS_OPTIMUM, 1.0 / n, math.log(n),
                             "the uniform distribution whatever the input (the target is independent of it): "
                             "loss ln n, accuracy 1/n"),)
        r, d = 2.0 / (self.min_lag + self.lag), n - 2
        data = (1.0 - r) / d  # the chance that an echo step is one given data symbol
        echo_entropy = -r * math.log(r) - (d * data * math.log(data) if data > 0 else 0.0)
        return (
            Baseline(MEMORYLESS_OPTIMUM, max(r, data), echo_entropy / 2,
                     "non-blank input → blank; blank input (an echo) → marker r = 1/E[L], each data symbol "
                     "(1 − r)/(n − 2): accuracy max(r, (1 − r)/(n − 2)), loss H/2 with "
                     "H = −r ln r − (1 − r) ln((1 − r)/(n − 2))"),
            Baseline(TIMING_AWARE, r + data, (1.0 - r) * math.log(d) / 2,
                     "one bit of memory (the previous input was not blank): the first echo step is the marker, "
                     "the others uniform over the data symbols: accuracy r + (1 − r)/(n − 2), "
                     "loss (1 − r)·ln(n − 2)/2",
                     memoryless=False),
        )

    # -- generators --------------------------------------------------------------------------------
    def _delay(self, b: int, n: int, gen: torch.Generator) -> Batch:
        m = self.lag
        inputs = torch.randint(0, self.n_symbols, (b, n), generator=gen)
        targets = torch.zeros(b, n, dtype=torch.int64)
        weights = torch.zeros(b, n)
        if n > m:
            targets[:, m:] = inputs[:, :-m]
            weights[:, m:] = 1.0
        return Batch(inputs, targets, weights)

    def _blocks(self, b: int, n: int, gen: torch.Generator) -> Batch:
        inputs = np.zeros((b, n), dtype=np.int64)
        targets = np.zeros((b, n), dtype=np.int64)
        weights = np.ones((b, n), dtype=np.float32)
        shifts = torch.randint(0, 2 * self.lag, (b,), generator=gen).tolist()
        for row, shift in enumerate(shifts):
            pos = -shift
            while pos < n:
                size = int(torch.randint(self.min_lag, self.lag + 1, (1,), generator=gen))
                block = torch.randint(2, self.n_symbols, (size,), generator=gen).numpy()
                block[0] = MARKER
                _place(inputs[row], pos, block)
                _place(targets[row], pos + size, block)
                if pos < 0:  # echoes of inputs before the stream start cannot be learned: unscored
                    weights[row, max(pos + size, 0) : max(min(size, pos + 2 * size, n), 0)] = 0.0
                pos += 2 * size
        return Batch(torch.from_numpy(inputs), torch.from_numpy(targets), torch.from_numpy(weights))


def _place(row: np.ndarray, pos: int, values: np.ndarray) -> None:
    """``row[pos : pos + len(values)] = values``, clipped to the row."""
    lo, hi = max(pos, 0), min(pos + len(values), len(row))
    if lo < hi:
        row[lo:hi] = values[lo - pos : hi - pos]


def _check(batch_size: int, split: str) -> None:
    if batch_size < 1:
        raise UsageError(f"copy-stream: batch_size must be ≥ 1, found {batch_size}")
    if split not in SPLITS:
        raise UsageError(f"copy-stream: unknown split {split!r}; accepted: {', '.join(SPLITS)}")
