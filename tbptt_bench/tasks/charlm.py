"""Character language modelling: predict the next character; bits per character.

Training runs on B parallel streams (the split cut into B contiguous pieces, state carried across
segments, as in char-rnn); :meth:`CharLMTask.sample` also offers independent random windows.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
import torch.nn.functional as F

from tbptt_bench.errors import UsageError
from tbptt_bench.tasks.base import Batch, Task, register_task
from tbptt_bench.tasks.corpora import Corpus, load_corpus


@register_task
class CharLMTask(Task):
    """Next-character prediction on a corpus (built in: Tiny Shakespeare; or a local file, see corpora)."""

    name = "char-lm"
    description = "character language model; metric bits per character"
    input_kind = "tokens"
    loss_kind = "cross_entropy"
    metric_name = "bpc"
    metric_higher_is_better = False
    streaming = True
    tiny = {"seq_len": 16, "batch_size": 4, "hidden_size": 8}

    def __init__(self, corpus: str = "tinyshakespeare", path: str | os.PathLike[str] | None = None) -> None:
        self.corpus: Corpus = load_corpus(corpus, path)
        self._baseline: float | None = None

    @property
    def vocab(self) -> tuple[str, ...]:
        return self.corpus.vocab

    @property
    def input_size(self) -> int:
        return self.corpus.vocab_size

    @property
    def output_size(self) -> int:
        return self.corpus.vocab_size

    def sample(self, batch_size: int, seq_len: int, generator: torch.Generator, split: str = "train") -> Batch:
        """B windows of ``seq_len + 1`` characters at uniformly random offsets in the split.

        Inputs are the first ``seq_len`` characters of each window, targets the last ``seq_len``.
        """
        tokens = self.corpus.split(split)
        if batch_size < 1 or seq_len < 1:
            raise UsageError(f"char-lm: batch_size and seq_len must be at least 1, found {batch_size}, {seq_len}")
        n = len(tokens)
        if n < seq_len + 1:
            raise UsageError(
                f"char-lm: split {split!r} of {self.corpus.name} has {n} characters, "
                f"expected at least seq_len + 1 = {seq_len + 1}"
            )
        starts = torch.randint(0, n - seq_len, (batch_size,), generator=generator)
        window = tokens[starts[:, None] + torch.arange(seq_len + 1)].long()
        inputs = window[:, :-1].contiguous()
        targets = window[:, 1:].contiguous()
        return Batch(inputs, targets, torch.ones(batch_size, seq_len))

    def stream(self, batch_size: int, split: str = "train") -> Batch:
        """B parallel streams: the split cut into B contiguous pieces of N = ⌊(n-1)/B⌋ characters.

        Row b holds characters ``b·N .. (b+1)·N - 1`` as inputs and the next characters as targets; the
        remainder is dropped. Inputs and targets are int64 views of one tensor; weights are a read-only
        broadcast view of ones. Slice it in time (``Batch.slice``) and move chunks to the device.
        """
        if batch_size < 1:
            raise UsageError(f"char-lm: batch_size must be at least 1, found {batch_size}")
        tokens = self.corpus.split(split)
        n = len(tokens)
        length = (n - 1) // batch_size
        if length < 1:
            raise UsageError(
                f"char-lm: split {split!r} of {self.corpus.name} has {n} characters, "
                f"expected at least batch_size + 1 = {batch_size + 1}"
            )
        data = tokens[: batch_size * length + 1].to(torch.int64)
        inputs = data[: batch_size * length].view(batch_size, length)
        targets = data[1:].view(batch_size, length)
        weights = torch.ones(1, 1).expand(batch_size, length)
        return Batch(inputs, targets, weights)

    def metric(self, outputs: torch.Tensor, batch: Batch) -> float:
        """Bits per character: weighted mean cross-entropy of logits ``[B, L, V]`` over scored steps / ln 2."""
        logits = outputs.reshape(-1, outputs.shape[-1])
        loss = F.cross_entropy(logits, batch.targets.reshape(-1), reduction="none").double()
        w = batch.weights.reshape(-1).double()
        return float((w * loss).sum() / w.sum()) / math.log(2)

    def baseline(self, seq_len: int) -> float:
        """Unigram entropy of the train split in bits per character: the best memoryless predictor."""
        if self._baseline is None:
            counts = self.corpus.counts("train")
            p = counts[counts > 0] / counts.sum()
            self._baseline = float(-(p * np.log2(p)).sum())
        return self._baseline
