"""Training: the optimiser steps at every update of the method's schedule, through the one engine.

Episodic tasks draw a fresh batch of sequences for each sequence of updates and start from the initial
state. Streaming tasks (char-lm) walk B parallel streams in segments of ``seq_len`` steps with the
state carried across segments; gradient never crosses a segment boundary, so choose ``seq_len`` ≥ k2.
Evaluation runs every ``eval_every`` updates on held-out data, outside any timed region.
Before each sequence or segment the method may observe the model at the current θ
(``Method.observe``: adaptive K re-estimates there); the K a method uses at each update
(``Method.k_used``) is recorded in ``TrainResult.k_used`` and in the ``k_used`` column of the curve.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from tbptt_bench.core.engine import Engine, step_loss_sum
from tbptt_bench.errors import UsageError
from tbptt_bench.core.mask import Update
from tbptt_bench.methods.base import Method, parse_method
from tbptt_bench.models.protocol import State, detach_state
from tbptt_bench.seeding import derive_seed, generator
from tbptt_bench.core.build import make_model, make_task, resolve_device, resolve_dtype
from tbptt_bench.tasks.base import Batch, Task

log = logging.getLogger(__name__)

OPTIMIZERS = ("adam", "sgd")


@dataclass
class TrainConfig:
    """Everything that defines a training run (plain values, so it can be hashed and stored)."""

    task: str = "copy"
    model: str = "lstm"
    method: str = "chunked:k=16"
    steps: int = 200
    seq_len: int = 64
    batch_size: int = 16
    hidden_size: int = 32
    num_layers: int = 1
    optimizer: str = "adam"
    lr: float = 1e-3
    clip: float | None = 1.0
    eval_every: int = 50
    eval_batches: int = 4
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    path: str = "fused"
    task_params: dict[str, Any] = field(default_factory=dict)
    #: Also stop once this many loss positions (summed over the batch: the curve's ``tokens``) have been
    #: trained on: an equal data budget for methods whose updates cover different numbers of losses.
    max_tokens: int | None = None

    def validate(self) -> None:
        if self.steps < 1 or self.seq_len < 1 or self.batch_size < 1 or self.eval_every < 1 or self.eval_batches < 1:
            raise UsageError("steps, seq_len, batch_size, eval_every and eval_batches must all be ≥ 1")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise UsageError(f"max_tokens must be ≥ 1 (or none), got {self.max_tokens}")
        if self.optimizer not in OPTIMIZERS:
            raise UsageError(f"unknown optimizer {self.optimizer!r}; accepted: {', '.join(OPTIMIZERS)}")
        if not self.lr > 0:
            raise UsageError(f"learning rate must be > 0, got {self.lr}")
        if self.clip is not None and not self.clip > 0:
            raise UsageError(f"gradient clip must be > 0 (or none), got {self.clip}")
        if parse_method(self.method).forward_mode:  # online training: docs/online.md, not done yet
            raise UsageError(f"train: {self.method} is an online (forward-mode) method, measured by grad and bias "
                             "only so far; train it with a mask method such as tbptt:k1=1,k2=K")


class Diverged(RuntimeError):
    """The training loss became NaN or infinite."""

    def __init__(self, update: int, curve: list[dict[str, Any]] | None = None) -> None:
        super().__init__(f"loss became non-finite by update {update}")
        self.update = update
        #: The learning curve up to the last finite evaluation.
        self.curve = list(curve or [])


@dataclass
class TrainResult:
    config: TrainConfig
    curve: list[dict[str, Any]]
    final: dict[str, Any]
    baseline: float
    metric_name: str
    #: The method's truncation length K at each update (``Method.k_used``; None where it has none).
    k_used: list[int | None] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        out = {"config": asdict(self.config), "curve": self.curve, "final": self.final,
               "baseline": self.baseline, "metric_name": self.metric_name}
        if any(k is not None for k in self.k_used):
            out["k_used"] = self.k_used
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


class _Done(Exception):
    pass


def train(
    cfg: TrainConfig,
    on_eval: Callable[[int, nn.Module], dict[str, Any]] | None = None,
    progress: Callable[[int, int], None] | None = None,
    method: Method | None = None,
) -> TrainResult:
    """Train for ``cfg.steps`` updates (or ``cfg.max_tokens`` tokens); evaluate every ``cfg.eval_every``
    updates and at the end.

    ``on_eval(update, model)`` may add columns to each learning-curve row (e.g. bias snapshots).
    Raises :class:`Diverged` when the loss becomes non-finite.
    """
    cfg.validate()
    method = method or parse_method(cfg.method)
    device, dtype = resolve_device(cfg.device), resolve_dtype(cfg.dtype)
    task = make_task(cfg.task, **cfg.task_params)
    model = make_model(cfg.model, task, cfg.hidden_size, cfg.num_layers, seed=cfg.seed, dtype=dtype, device=device, path=cfg.path)
    params = [p for p in model.parameters() if p.requires_grad]
    opt: torch.optim.Optimizer = (
        torch.optim.Adam(params, lr=cfg.lr) if cfg.optimizer == "adam" else torch.optim.SGD(params, lr=cfg.lr)
    )
    engine = Engine(model, task.loss_kind, device=device, dtype=dtype, checkpoint=method.checkpoint,
                    non_blocking=device.type == "cuda")
    rng = np.random.default_rng(derive_seed("method", cfg.seed))
    curve: list[dict[str, Any]] = []
    window_loss = torch.zeros((), device=device, dtype=torch.float64)
    window_steps = 0.0
    count = 0
    t0 = time.perf_counter()
    train_time = 0.0
    tokens = 0
    k_used: list[int | None] = []

    def record(update: int) -> None:
        nonlocal window_loss, window_steps, t0, train_time
        train_time += time.perf_counter() - t0
        loss = float(window_loss) / window_steps if window_steps > 0 else None
        if loss is not None and not math.isfinite(loss):
            raise Diverged(update, curve)
        row: dict[str, Any] = {"update": update, "train_loss": loss, "wall_time": train_time, "tokens": tokens}
        k = k_used[-1] if k_used else method.k_used(0)
        if k is not None:
            row["k_used"] = k
        row.update(evaluate(model, task, cfg, device, dtype))
        if on_eval is not None:
            row.update(on_eval(update, model))
        curve.append(row)
        log.info("update %d: train loss %s, eval loss %.4f, %s %.4f", update,
                 "-" if loss is None else f"{loss:.4f}", row["eval_loss"], task.metric_name, row["eval_metric"])
        window_loss = torch.zeros((), device=device, dtype=torch.float64)
        window_steps = 0.0
        t0 = time.perf_counter()

    def on_update(i: int, u: Update, loss: torch.Tensor) -> None:
        nonlocal count, window_loss, window_steps, tokens
        if cfg.clip is not None:
            torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        k_used.append(method.k_used(count))
        count += 1
        window_loss = window_loss + loss.to(torch.float64)
        window_steps += float(segment.weights[:, u.loss_start : u.loss_end].sum()) / cfg.batch_size
        tokens += (u.loss_end - u.loss_start) * cfg.batch_size
        if progress is not None:
            progress(count, cfg.steps)
        done = count >= cfg.steps or (cfg.max_tokens is not None and tokens >= cfg.max_tokens)
        if count % cfg.eval_every == 0 or done:
            record(count)
        if done:
            raise _Done

    record(0)
    state: State | None = None
    try:
        for segment, carry in _segments(task, cfg):
            h0 = state if (carry and state is not None) else model.initial_state(cfg.batch_size)
            method.observe(count, model, segment, h0, task.loss_kind)
            updates = method.updates(segment.length, first_update=count, rng=rng)
            result = engine.run(segment, updates, h0, on_update)
            state = detach_state(result.final_state)
    except _Done:
        pass
    final = dict(curve[-1])
    return TrainResult(cfg, curve, final, task.baseline(cfg.seq_len), task.metric_name, k_used)
