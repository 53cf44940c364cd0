"""Training: the optimiser steps at every update of the method's schedule, through the one engine.

Episodic tasks draw a fresh batch of sequences for each sequence of updates and start from the initial
state. Streaming tasks (char-lm) walk B parallel streams in segments of ``seq_len`` steps with the
state carried across segments; gradient never crosses a segment boundary, so choose ``seq_len`` ≥ k2.
Evaluation runs every ``eval_every`` updates on held-out data, outside any timed region.
Before each sequence or segment the method may observe the model at the current θ
(``Method.observe``: adaptive K re-estimates there); the K a method uses at each update
(``Method.k_used``) is recorded in ``TrainResult.k_used`` and in the ``k_used`` column of the curve.
A loss that becomes NaN or infinite ends the run; it is recorded as data (``TrainResult.diverged_at``),
the curve kept up to the last finite evaluation.
Online (forward-mode) methods train through the same loop: ``build_run`` gives them an
:class:`~tbptt_bench.core.forward_mode.OnlineEngine`, which steps one token at a time with the carried
influence and yields an update every ``every`` steps, its estimate already in ``.grad`` (docs/online.md,
"Online training"); the engine also says what an update costs in recurrent steps (``compute_steps``).
Training iterates the engine's steps (:meth:`~tbptt_bench.core.engine.Engine.steps`, the steps the
public :class:`~tbptt_bench.loop.TBPTT` yields): backward, optimiser step, accounting, evaluation.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from tbptt_bench.core.engine import step_loss_sum
from tbptt_bench.core.mask import Update
from tbptt_bench.errors import UsageError
from tbptt_bench.options import MAX_COUNT, option
from tbptt_bench.methods.base import Method
from tbptt_bench.models.protocol import State, detach_state
from tbptt_bench.seeding import derive_seed, generator, method_rng
from tbptt_bench.tasks.base import Batch, Task
from tbptt_bench.training.curriculum import CopyCurriculum
from tbptt_bench.training.run import NO_OPTIMIZER, ComposedConfig, Run, RunConfig, build_run

log = logging.getLogger(__name__)


@dataclass(init=False)
class TrainConfig(ComposedConfig):
    """A training run: a :class:`RunConfig` plus how long to train and how often to evaluate.

    Built from flat values as well (``TrainConfig(method="full", steps=10)``), run fields read directly.
    """

    run: RunConfig
    steps: int = option(200, flag="--steps", lo=1, hi=MAX_COUNT, help="number of optimiser updates")
    eval_every: int = option(50, flag="--eval-every", lo=1, hi=MAX_COUNT, help="evaluate every N updates")
    eval_batches: int = option(4, flag="--eval-batches", lo=1, hi=MAX_COUNT, help="held-out batches per evaluation")
    #: Also stop once this many loss positions (summed over the batch: the curve's ``tokens``) have been
    #: trained on: an equal data budget for methods whose updates cover different numbers of losses.
    max_tokens: int | None = option(None, flag="--max-tokens", lo=1, hi=2**62,
                                    help="also stop after this many trained loss positions (x batch): equal data "
                                         "budgets")
    #: A copy curriculum (``tbptt_bench.training.curriculum``), e.g. ``{start = 1, threshold = 0.15}``; None for none.
    curriculum: dict[str, Any] | None = option(None, help="a copy curriculum, e.g. {start = 1, threshold = 0.15}")

    def validate(self) -> None:
        if self.steps < 1 or self.seq_len < 1 or self.batch_size < 1 or self.eval_every < 1 or self.eval_batches < 1:
            raise UsageError("steps, seq_len, batch_size, eval_every and eval_batches must all be ≥ 1")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise UsageError(f"max_tokens must be ≥ 1 (or none), got {self.max_tokens}")
        if self.optimizer == NO_OPTIMIZER:
            raise UsageError("training needs an optimizer; name one of torch.optim's (e.g. adam, sgd, adamw)")
        self.run.validate()


@dataclass
class TrainResult:
    config: TrainConfig
    curve: list[dict[str, Any]]
    final: dict[str, Any]
    baseline: float
    metric_name: str
    #: The method's truncation length K at each update (``Method.k_used``; None where it has none).
    k_used: list[int | None] = field(default_factory=list)
    #: The evaluation at which the training loss was first non-finite (None: it never was).
    diverged_at: int | None = None
    #: The curriculum level of every update (empty without a curriculum).
    levels: list[int] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        out = {"config": self.config.flat(), "curve": self.curve, "final": self.final,
               "baseline": self.baseline, "metric_name": self.metric_name}
        if any(k is not None for k in self.k_used):
            out["k_used"] = self.k_used
        if self.diverged_at is not None:
            out["diverged_at"] = self.diverged_at
        if self.levels:
            out["levels"] = self.levels
        return out


def evaluate(model: nn.Module, task: Task, cfg: TrainConfig, device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    """Held-out loss per scored step and the task metric (no gradient, fixed evaluation seed)."""
    was_training = model.training
    model.eval()
    losses, metrics, weights = [], [], []
    with torch.no_grad():
        if task.streaming:
            stream = task.stream(cfg.batch_size, "valid")
            state = model.initial_state(cfg.batch_size)
            n = min(cfg.eval_batches, max(1, stream.length // cfg.seq_len))
            batches = [stream.slice(i * cfg.seq_len, (i + 1) * cfg.seq_len) for i in range(n)]
        else:
            gen = generator(derive_seed("eval", cfg.seed))
            batches = [task.sample(cfg.batch_size, cfg.seq_len, gen, "valid") for _ in range(cfg.eval_batches)]
            state = None
        for batch in batches:
            data = batch.to(device, dtype)
            h = model.initial_state(cfg.batch_size) if state is None else state
            out, h = model(data.inputs, h)
            if task.streaming:
                state = h
            total = step_loss_sum(out, data, task.loss_kind, cfg.batch_size)
            count = float(data.weights.sum()) / cfg.batch_size
            losses.append(float(total))
            weights.append(count)
            metrics.append(task.metric(out, data))
    model.train(was_training)
    return {"eval_loss": sum(losses) / max(sum(weights), 1e-12), "eval_metric": float(np.mean(metrics))}


def _segments(task: Task, cfg: TrainConfig) -> Iterator[tuple[Batch, bool]]:
    """(segment, carry state) pairs: fresh sequences for episodic tasks, consecutive stream pieces."""
    if task.streaming:
        stream = task.stream(cfg.batch_size, "train")
        n = stream.length // cfg.seq_len
        if n < 1:
            raise UsageError(f"the train stream ({stream.length} steps per row) is shorter than seq_len {cfg.seq_len}")
        while True:
            for i in range(n):
                yield stream.slice(i * cfg.seq_len, (i + 1) * cfg.seq_len), i > 0
    gen = generator(derive_seed("train", cfg.seed))
    while True:
        yield task.sample(cfg.batch_size, cfg.seq_len, gen, "train"), False


class _Trainer:
    """The state of a training run between updates; :meth:`after_update` follows each update's backward."""

    def __init__(self, cfg: TrainConfig, run: Run, on_eval: Callable[[int, nn.Module], dict[str, Any]] | None,
                 progress: Callable[[int, int], None] | None) -> None:
        self.cfg, self.run, self.on_eval, self.progress = cfg, run, on_eval, progress
        self.rng = method_rng(cfg.seed)
        self.curve: list[dict[str, Any]] = []
        self.k_used: list[int | None] = []
        self.updates = 0
        self.tokens = 0
        self.compute_steps = 0
        self.train_time = 0.0
        self.diverged_at: int | None = None
        self.finished = False
        self.segment: Batch | None = None
        self._open_window()

    def _open_window(self) -> None:
        self.window_loss = torch.zeros((), device=self.run.device, dtype=torch.float64)
        self.window_steps = 0.0
        self.t0 = time.perf_counter()

    def after_update(self, u: Update, loss: torch.Tensor) -> bool:
        """Step the optimiser, account for the update, evaluate when due; True ends the run."""
        cfg, segment = self.cfg, self.segment
        assert segment is not None
        self.run.step()
        self.k_used.append(self.run.method.k_used(self.updates))
        self.updates += 1
        self.window_loss = self.window_loss + loss.to(torch.float64)
        self.window_steps += float(segment.weights[:, u.loss_start : u.loss_end].sum()) / cfg.batch_size
        self.tokens += (u.loss_end - u.loss_start) * cfg.batch_size
        self.compute_steps += sum(self.run.engine.update_steps(u)) * cfg.batch_size
        if self.progress is not None:
            self.progress(self.updates, cfg.steps)
        done = self.updates >= cfg.steps or (cfg.max_tokens is not None and self.tokens >= cfg.max_tokens)
        if self.updates % cfg.eval_every == 0 or done:
            self.record(self.updates)
        self.finished = done or self.diverged_at is not None
        return self.finished

    def record(self, update: int) -> None:
        """Close the training-loss window and evaluate: one curve row, or the divergence noted."""
        self.train_time += time.perf_counter() - self.t0
        loss = float(self.window_loss) / self.window_steps if self.window_steps > 0 else None
        if loss is not None and not math.isfinite(loss):
            self.diverged_at = update
            return
        run = self.run
        row: dict[str, Any] = {"update": update, "train_loss": loss, "wall_time": self.train_time,
                               "tokens": self.tokens, "compute_steps": self.compute_steps}
        k = self.k_used[-1] if self.k_used else run.method.k_used(0)
        if k is not None:
            row["k_used"] = k
        row.update(evaluate(run.model, run.task, self.cfg, run.device, run.dtype))
        if self.on_eval is not None:
            row.update(self.on_eval(update, run.model))
        self.curve.append(row)
        log.info("update %d: train loss %s, eval loss %.4f, %s %.4f", update, "-" if loss is None else f"{loss:.4f}",
                 row["eval_loss"], run.task.metric_name, row["eval_metric"])
        self._open_window()

    def result(self) -> TrainResult:
        final = dict(self.curve[-1]) if self.diverged_at is None else {}
        task = self.run.task
        return TrainResult(self.cfg, self.curve, final, task.baseline(self.cfg.seq_len), task.metric_name,
                           self.k_used, self.diverged_at)


def train(
    cfg: TrainConfig,
    on_eval: Callable[[int, nn.Module], dict[str, Any]] | None = None,
    progress: Callable[[int, int], None] | None = None,
    method: Method | None = None,
) -> TrainResult:
    """Train for ``cfg.steps`` updates (or ``cfg.max_tokens`` tokens); evaluate every ``cfg.eval_every``
    updates and at the end.

    ``on_eval(update, model)`` may add columns to each learning-curve row (e.g. bias snapshots). A loss
    that becomes non-finite ends training: ``TrainResult.diverged_at`` says at which evaluation.
    """
    cfg.validate()
    run = build_run(cfg.run, method)
    curriculum = (None if cfg.curriculum is None else
                  CopyCurriculum.from_config(cfg.curriculum, run.task, cfg.batch_size, cfg.eval_batches, cfg.seed))
    trainer = _Trainer(cfg, run, on_eval if curriculum is None else curriculum.with_eval(on_eval), progress)
    trainer.record(0)
    state: State | None = None
    for segment, carry in (_segments(run.task, cfg) if curriculum is None else curriculum.segments(run.model)):
        if trainer.finished:
            break
        h0 = state if (carry and state is not None) else run.model.initial_state(cfg.batch_size)
        run.method.observe(trainer.updates, run.model, segment, h0, run.task.loss_kind)
        updates = run.method.updates(segment.length, first_update=trainer.updates, rng=trainer.rng)
        trainer.segment = segment
        before = trainer.updates
        for step in run.engine.steps(segment, updates, h0):
            step.backward()
            state = detach_state(step.state)
            if trainer.after_update(step.update, step.loss.detach()):
                break
        if curriculum is not None:
            curriculum.note_updates(segment, trainer.updates - before)
    result = trainer.result()
    result.levels = [] if curriculum is None else curriculum.levels
    return result
