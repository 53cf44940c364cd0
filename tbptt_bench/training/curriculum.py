"""A copy curriculum (after Mujika, Meier & Steger 2018 and Menick et al. 2021): the string to copy grows
by one symbol each time the model has mastered the current length.

Level ``L`` is the copy task with ``n_remember = L`` and a sequence of ``2L + delay`` steps (the string,
``delay − 1`` blanks, the marker, the recall; ``delay = 1``: the recall follows the string at once). Before
every ``check_every``-th training sequence (the same number of sequences for every method, whatever its
update schedule) the curriculum draws ``eval_batches`` fresh sequences at the current level, measures the
cross-entropy of the recall steps in **bits per recalled symbol**, and moves to ``L + 1`` when it is below
``threshold`` (0.15 bits in Mujika et al.). Training draws its sequences at the level in force, so the
level of every update is recorded (``TrainResult.levels``), and every curve row carries
``curriculum_level`` (the level in force) and ``curriculum_bits`` (the last measurement).

Set in a run with ``curriculum = {start = 1, threshold = 0.15, delay = 1, max_level = 64, check_every = 8}``
(any subset); the run's task must be ``copy`` (its ``n_symbols`` is kept; its ``n_remember`` and
``seq_len`` are the curriculum's).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from tbptt_bench.errors import UsageError
from tbptt_bench.seeding import derive_seed, generator
from tbptt_bench.tasks.base import Batch, Task
from tbptt_bench.tasks.copy import CopyTask

DEFAULTS: dict[str, Any] = {"start": 1, "threshold": 0.15, "delay": 1, "max_level": 64, "check_every": 8}


@dataclass
class CopyCurriculum:
    """The curriculum's state: the current level, the level of every update so far, the last measurement."""

    n_symbols: int
    batch_size: int
    eval_batches: int
    seed: int
    start: int = 1
    threshold: float = 0.15
    delay: int = 1
    max_level: int = 64
    check_every: int = 8
    level: int = field(init=False)
    bits: float = field(default=float("nan"), init=False)
    levels: list[int] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        if not 1 <= self.start <= self.max_level or self.delay < 1 or not self.threshold > 0 or self.check_every < 1:
            raise UsageError(f"curriculum: expected 1 ≤ start ≤ max_level, delay ≥ 1, threshold > 0 and "
                             f"check_every ≥ 1; got start={self.start}, max_level={self.max_level}, "
                             f"delay={self.delay}, threshold={self.threshold}, check_every={self.check_every}")
        self.level = self.start

    @classmethod
    def from_config(cls, spec: dict[str, Any], task: Task, batch_size: int, eval_batches: int,
                    seed: int) -> "CopyCurriculum":
        """The curriculum a run's ``curriculum`` table declares, for its task (which must be ``copy``)."""
        if not isinstance(task, CopyTask):
            raise UsageError(f"a curriculum runs on the copy task; got task {task.name!r}")
        unknown = set(spec) - set(DEFAULTS)
        if unknown:
            raise UsageError(f"curriculum: unknown keys {sorted(unknown)}; accepted: {', '.join(DEFAULTS)}")
        values = {**DEFAULTS, **spec}
        return cls(task.n_symbols, batch_size, eval_batches, seed, int(values["start"]), float(values["threshold"]),
                   int(values["delay"]), int(values["max_level"]), int(values["check_every"]))

    def task(self, level: int) -> CopyTask:
        """The copy task of ``level``: ``n_remember = level``, the alphabet of the run's task."""
        return CopyTask(n_symbols=self.n_symbols, n_remember=level)

    def seq_len(self, level: int) -> int:
        """``2·level + delay`` steps."""
        return 2 * level + self.delay

    def segments(self, model: nn.Module) -> Iterator[tuple[Batch, bool]]:
        """Fresh training sequences at the level in force (episodic: no state carried); ``model`` is measured
        before every ``check_every``-th one, and the level advances when it has mastered the current one."""
        gen = generator(derive_seed("train", self.seed))
        for drawn in itertools.count():
            if drawn % self.check_every == 0:
                self.bits = self.recall_bits(model, self.level, drawn)
                if self.bits < self.threshold and self.level < self.max_level:
                    self.level += 1
            yield self.task(self.level).sample(self.batch_size, self.seq_len(self.level), gen, "train"), False

    def note_updates(self, segment: Batch, count: int) -> None:
        """Record the level of the ``count`` updates just made on ``segment``."""
        self.levels.extend([(segment.length - self.delay) // 2] * count)

    def recall_bits(self, model: nn.Module, level: int, drawn: int) -> float:
        """Cross-entropy of the recall steps in bits per symbol on fresh sequences at ``level``."""
        task, first = self.task(level), next(model.parameters())
        gen = generator(derive_seed("curriculum-eval", self.seed, drawn))
        total, count = 0.0, 0
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for _ in range(self.eval_batches):
                data = task.sample(self.batch_size, self.seq_len(level), gen, "valid").to(first.device, first.dtype)
                out, _ = model(data.inputs, model.initial_state(self.batch_size))
                logits, targets = out[:, -level:], data.targets[:, -level:]
                total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"))
                count += targets.numel()
        model.train(was_training)
        return total / count / math.log(2)

    def with_eval(self, other: Callable[[int, nn.Module], dict[str, Any]] | None
                  ) -> Callable[[int, nn.Module], dict[str, Any]]:
        """An evaluation callback that runs ``other`` (if any) and adds the level in force and the last measurement."""
        def both(update: int, model: nn.Module) -> dict[str, Any]:
            extra = other(update, model) if other is not None else {}
            return {**extra, "curriculum_level": self.level, "curriculum_bits": self.bits}
        return both
