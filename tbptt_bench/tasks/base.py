"""The task protocol: what every task declares, and the time-sliced data the engine consumes.

A task yields *sources*: objects with a time length and a ``slice(a, b)`` that returns the inputs,
targets and loss weights of steps ``a+1..b`` (0-based positions ``a..b-1``) for all batch rows. The
engine asks for one chunk at a time, so a long stream is never on the device whole.

Loss convention (used everywhere in the project, see docs/math.md): the per-step loss is
``ℓ_t = (1/B) Σ_b w[b, t] · loss(ŷ[b, t], y[b, t])`` and the total is ``L = Σ_t ℓ_t`` — summed over
time, averaged over the batch, with ``w = 0`` on unscored steps.

Baselines (docs/tasks.md, "Baselines"): each task declares, in closed form, what fixed predictors that
learn nothing about the past score — :meth:`Task.baselines` returns them as :class:`Baseline` values, and
:meth:`Task.baseline` is the best metric any of its memoryless ones reaches (the line a model must cross).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from tbptt_bench.registry import Registry

InputKind = Literal["tokens", "real"]
LossKind = Literal["cross_entropy", "mse"]

#: The name every task gives its best memoryless predictor under the task's loss.
MEMORYLESS_OPTIMUM = "memoryless optimum"


@dataclass(frozen=True)
class Baseline:
    """What one fixed reference predictor scores on a task, in closed form.

    name:        short label, e.g. ``"memoryless optimum"`` or ``"timing-aware (knows when to recall)"``.
    metric:      its expected task metric (the units of ``Task.metric_name``), as the evaluation measures it.
    loss:        its expected loss per scored step, in the evaluation's normalisation (``eval_loss``: the
                 loss summed over time and averaged over the batch, divided by the scored steps per
                 sequence; nats for cross-entropy); ``None`` where not known in closed form.
    description: the predictor and the formula, in one or two sentences.
    memoryless:  True when its output at step t depends on the input at step t alone (no state).
    """

    name: str
    metric: float
    loss: float | None
    description: str
    memoryless: bool = True


def best_memoryless_metric(task: "Task", baselines: tuple[Baseline, ...]) -> float:
    """The best metric among the memoryless ``baselines`` (largest when higher is better, else smallest)."""
    values = [b.metric for b in baselines if b.memoryless]
    if not values:
        raise ValueError(f"task {task.name!r} declares no memoryless baseline")
    return max(values) if task.metric_higher_is_better else min(values)


@dataclass
class Batch:
    """A batch of sequences held in memory, sliceable in time.

    inputs:  ``[B, T]`` int64 tokens or ``[B, T, C]`` float values.
    targets: ``[B, T]`` int64 classes or ``[B, T, D]`` float values.
    weights: ``[B, T]`` float loss weights (1 scored, 0 unscored).
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    weights: torch.Tensor

    @property
    def batch_size(self) -> int:
        return int(self.inputs.shape[0])

    @property
    def length(self) -> int:
        return int(self.inputs.shape[1])

    def slice(self, a: int, b: int) -> "Batch":
        """Steps at 0-based positions ``a..b-1``."""
        return Batch(self.inputs[:, a:b], self.targets[:, a:b], self.weights[:, a:b])

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None, non_blocking: bool = False) -> "Batch":
        """Move to a device; real-valued inputs/targets take ``dtype`` if given."""

        def move(x: torch.Tensor) -> torch.Tensor:
            if dtype is not None and x.is_floating_point():
                return x.to(device=device, dtype=dtype, non_blocking=non_blocking)
            return x.to(device=device, non_blocking=non_blocking)

        return Batch(move(self.inputs), move(self.targets), move(self.weights))


class Task(ABC):
    """A benchmark task. Subclasses set the class attributes and implement the methods.

    ``streaming`` tasks (language modelling) carry state across consecutive segments of B parallel
    streams; episodic tasks (copy, adding) start every sequence from the initial state.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    input_kind: ClassVar[InputKind]
    loss_kind: ClassVar[LossKind]
    metric_name: ClassVar[str]
    #: True when a larger metric is better (accuracy); False for MSE and bits per character.
    metric_higher_is_better: ClassVar[bool]
    streaming: ClassVar[bool] = False
    #: A small configuration for fast tests: seq_len, batch_size, hidden_size.
    tiny: ClassVar[dict[str, int]] = {"seq_len": 12, "batch_size": 4, "hidden_size": 8}

    @property
    @abstractmethod
    def input_size(self) -> int:
        """Vocabulary size for token inputs, channel count for real inputs."""

    @property
    @abstractmethod
    def output_size(self) -> int:
        """Number of classes (cross-entropy) or output channels (MSE)."""

    @abstractmethod
    def sample(self, batch_size: int, seq_len: int, generator: torch.Generator, split: str = "train") -> Batch:
        """A batch of independent sequences, drawn with ``generator`` only (seeded, reproducible)."""

    def stream(self, batch_size: int, split: str = "train") -> Batch:
        """B parallel streams over the split, for streaming tasks (state carried across segments)."""
        raise NotImplementedError(f"task {self.name!r} is episodic and has no stream")

    @abstractmethod
    def metric(self, outputs: torch.Tensor, batch: Batch) -> float:
        """The task metric (accuracy, MSE or bits per character) of model outputs on a batch."""

    @abstractmethod
    def baseline(self, seq_len: int) -> float:
        """The best metric any predictor without memory reaches (output at step t a function of the input
        at step t alone), to report beside results: a model must beat it to have used its past."""

    def baselines(self, seq_len: int) -> tuple[Baseline, ...]:
        """Closed-form reference predictors at sequence length ``seq_len``, the memoryless optimum first.

        The built-in tasks declare every baseline they derive (docs/tasks.md); this default, for tasks
        that declare only :meth:`baseline`, wraps that one value with an unknown loss.
        """
        return (Baseline(MEMORYLESS_OPTIMUM, float(self.baseline(seq_len)), None,
                         "the value the task's baseline() declares"),)


TASKS: Registry[type[Task]] = Registry("task")


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: register a :class:`Task` subclass under ``cls.name``."""
    TASKS.register(cls.name, cls)
    return cls
