"""Effective context over training: train with the project's loop and measure the chunked K curve at checkpoints.

A :class:`ContextConfig` is a :class:`~tbptt_bench.training.loop.TrainConfig` (task, model, method,
segment length, optimiser, updates, seed) plus the curve's own fields. :func:`train_context` runs
:func:`~tbptt_bench.training.loop.train` and, at every evaluation (update 0, every ``eval_every`` updates
and the last), measures :func:`tbptt_bench.analysis.context.context_curve` at the current θ: the relative
bias of chunked(K) against g for K = 1, 2, …, ``kmax`` on ``n_batches`` held-out segments of
``curve_seq_len`` steps, and the effective context at each of ``levels`` (docs/bias.md, "Long horizons").

The segments are the last ``n_batches · curve_seq_len`` steps of each stream of ``curve_split``. When that
is the training split (``train``), training must not reach them: ``steps · seq_len`` steps per row (an
upper bound, each update lies in one segment) must end before the first warm-up starts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from tbptt_bench.analysis.context import CurveOptions, context_curve, describe_contexts, held_out_positions, LEVELS
from tbptt_bench.core.build import make_task
from tbptt_bench.errors import UsageError
from tbptt_bench.options import option
from tbptt_bench.training.loop import TrainConfig, TrainResult, train

log = logging.getLogger(__name__)

#: The split training reads (:func:`tbptt_bench.training.loop.train` walks its streams from the start).
TRAIN_SPLIT = "train"
#: Learning-curve columns copied into the rows of each checkpoint.
CURVE_FIELDS = ("tokens", "train_loss", "eval_loss", "eval_metric")


@dataclass(init=False)
class ContextConfig(TrainConfig):
    """Training (every :class:`TrainConfig` field; checkpoints at its evaluations) plus the K curve measured there."""

    curve_seq_len: int = option(1024, lo=1, help="steps T of each held-out segment the curve is measured on")
    kmax: int = option(256, lo=1, help="the largest chunk length of the dyadic grid K = 1, 2, 4, …, kmax (a power of "
                                       "two ≤ curve_seq_len)")
    n_batches: int = option(4, lo=1, help="held-out segments per checkpoint (the interval of the relative bias needs ≥ 4)")
    curve_split: str = option("valid", choices=("train", "valid", "test"),
                              help="the split the segments come from (its last n_batches · curve_seq_len steps per "
                                   "stream)")
    curve_warmup: int = option(512, lo=0, help="steps run without gradient before each segment, from the zero state")
    levels: list[float] = option(factory=lambda: list(LEVELS),
                                 help="levels L of relative bias at which the effective context is read")
    ci_level: float = option(0.95, help="confidence level of the relative bias's interval")
    max_lag: int = option(0, lo=0, help="the lag profile out to this lag on the same segments, in float64 (0: none)")
    lag_positions: int = option(8, lo=1, help="loss positions sampled per segment for the lag profile")

    def curve_options(self) -> CurveOptions:
        """The curve measurement's options."""
        return CurveOptions(seq_len=self.curve_seq_len, kmax=self.kmax, n_batches=self.n_batches,
                            split=self.curve_split, warmup=self.curve_warmup, levels=tuple(self.levels),
                            ci_level=self.ci_level, max_lag=self.max_lag, lag_positions=self.lag_positions)

    def validate(self) -> None:
        """TrainConfig's checks, the curve's, and that the held-out segments fit the split and miss training."""
        super().validate()
        options = self.curve_options()
        options.check()
        task = make_task(self.task, **self.task_params)
        if not task.streaming:
            raise UsageError(f"the effective context is measured on long streams; task {self.task!r} is episodic "
                             "(use char-lm or another streaming task)")
        length = task.stream(self.batch_size, self.curve_split).length
        first = held_out_positions(length, self.curve_seq_len, self.n_batches, self.curve_warmup, self.curve_split,
                                   self.batch_size)[0]
        if self.curve_split == TRAIN_SPLIT and self.steps * self.seq_len > first - self.curve_warmup:
            raise UsageError(f"the curve's segments (from step {first - self.curve_warmup} of each train stream, "
                             f"warm-up included) are not held out: {self.steps} updates may read up to "
                             f"{self.steps * self.seq_len} steps per stream; use fewer steps, fewer batches or "
                             "curve_split = \"valid\"")


@dataclass
class ContextResult:
    """The training run and, per checkpoint, its curve rows (one per K), level rows (one per level) and lag
    profile rows (one per lag; none without ``max_lag``)."""

    training: TrainResult
    curve: list[dict[str, Any]]
    levels: list[dict[str, Any]]
    lags: list[dict[str, Any]] = field(default_factory=list)


def train_context(cfg: ContextConfig, progress: Callable[[int, int], None] | None = None) -> ContextResult:
    """Train ``cfg`` and measure the effective context at every evaluation (see the module doc).

    Rows carry ``n_updates``, ``tokens`` (loss positions × batch trained on so far), the learning-curve
    columns of :data:`CURVE_FIELDS`, and ``seconds`` / ``span`` / ``curve_checkpoint`` of the measurement.
    """
    cfg.validate()
    options = cfg.curve_options()
    task = make_task(cfg.task, **cfg.task_params)
    measured: dict[int, Any] = {}

    def on_eval(update: int, model: nn.Module) -> dict[str, Any]:
        result = context_curve(task, model, options, batch_size=cfg.batch_size, seed=cfg.seed)
        measured[update] = result
        log.info("context at update %d: %s (%.1f s)", update, describe_contexts(result.levels), result.seconds)
        return {}

    training = train(cfg, on_eval=on_eval, progress=progress)
    curve: list[dict[str, Any]] = []
    levels: list[dict[str, Any]] = []
    lags: list[dict[str, Any]] = []
    for point in training.curve:
        result = measured.get(point["update"])
        if result is None:
            continue
        common = {"n_updates": point["update"], **{c: point.get(c) for c in CURVE_FIELDS},
                  "seconds": result.seconds, "span": result.span, "curve_checkpoint": result.checkpoint}
        curve.extend({**common, **row} for row in result.curve)
        levels.extend({**common, **row} for row in result.levels)
        lags.extend({**common, **row} for row in result.lags)
    return ContextResult(training, curve, levels, lags)
