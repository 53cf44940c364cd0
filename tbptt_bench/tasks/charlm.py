"""Character language modelling: predict the next character; bits per character.

Training runs on B parallel streams (the split cut into B contiguous pieces, state carried across
segments, as in char-rnn); :meth:`CharLMTask.sample` also offers independent random windows.

Baselines are functions of the data, computed from it (docs/tasks.md, "Baselines"). A memoryless predictor
sees the current character, so the best one is the bigram distribution p(next | current) of the evaluated
pairs (bits per character = the conditional entropy); the unigram predictors, which ignore the current
character as well, are weaker (the unigram entropy; the train split's unigram scored on valid).
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
import torch.nn.functional as F

from tbptt_bench.errors import UsageError
from tbptt_bench.tasks.base import MEMORYLESS_OPTIMUM, Baseline, Batch, Task, best_memoryless_metric, register_task
from tbptt_bench.tasks.corpora import Corpus, load_corpus

UNIGRAM = "input-blind optimum (unigram)"
TRAIN_UNIGRAM = "unigram fit to train"


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
        self._baselines: tuple[Baseline, ...] | None = None

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
        """Bits per character of the best memoryless (bigram) predictor on the valid split (:meth:`baselines`)."""
        return best_memoryless_metric(self, self.baselines(seq_len))

    def baselines(self, seq_len: int) -> tuple[Baseline, ...]:
        """Bigram and unigram predictors scored on the valid split's (input, target) pairs: every character and
        the next, as the valid stream scores them when read whole (one row). Bits per character, loss in nats;
        ``seq_len`` is unused. Entries of the train unigram are infinite if valid holds a character train lacks.
        """
        if self._baselines is None:
            v = self.corpus.vocab_size
            ids = self.corpus.split("valid").numpy().astype(np.int64)
            codes, pairs = np.unique(ids[:-1] * v + ids[1:], return_counts=True)  # the pairs that occur
            current, following = codes // v, codes % v
            given = np.bincount(current, weights=pairs, minlength=v)  # how often each character is the input
            total = float(pairs.sum())
            bigram = float(-(pairs * np.log2(pairs / given[current])).sum())
            scored = np.bincount(following, weights=pairs, minlength=v) / total  # the targets' frequencies
            train = self.corpus.counts("train").astype(np.float64)
            p_train = train / train.sum()
            hit = scored > 0
            unigram = float(-(scored[hit] * np.log2(scored[hit])).sum())
            cross = float(-(scored[hit] * np.log2(p_train[hit])).sum()) if (p_train[hit] > 0).all() else math.inf
            train_entropy = float(-(p_train[train > 0] * np.log2(p_train[train > 0])).sum())
            ln2 = math.log(2)
            self._baselines = (
                Baseline(MEMORYLESS_OPTIMUM, bigram / total, bigram / total * ln2,
                         "the bigram distribution p(next | current) of the scored valid pairs: bits per character = "
                         "the conditional entropy −Σ p(a, b) log₂ p(b | a) (computed from the data)"),
                Baseline(UNIGRAM, unigram, unigram * ln2,
                         "the unigram distribution of the scored valid characters, whatever the input: bits per "
                         "character = its entropy −Σ p(c) log₂ p(c) (computed from the data)"),
                Baseline(TRAIN_UNIGRAM, cross, cross * ln2,
                         "the unigram distribution of the train split, whatever the input, scored on valid: "
                         "−Σ p_valid(c) log₂ p_train(c) (computed from the data); on train it scores the train "
                         f"entropy, {train_entropy:.4f} bits"),
            )
        return self._baselines
