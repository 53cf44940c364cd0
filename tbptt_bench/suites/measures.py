"""Each measure declared once: the options it accepts and the tables, columns and metrics it writes.

The store (:mod:`tbptt_bench.suites.schema`: which tables exist), the jobs (:mod:`tbptt_bench.suites.jobs`:
what a cell accepts and writes) and the report (:mod:`tbptt_bench.report.load` and
:mod:`tbptt_bench.report.common`: which columns a section needs, whether higher is better) read these
declarations; the ``bias`` command builds its flags from :func:`bias_options`. Light: no pandas, pyarrow
or scipy (the command line builds its parser from here).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from tbptt_bench.analysis.bias_options import BiasOptions
from tbptt_bench.errors import UsageError
from tbptt_bench.options import REQUIRED, Flag, Option, declared
from tbptt_bench.training.run import RunConfig

#: ``Metric.better``: larger values are better, smaller ones, or as the row's task says (the column
#: :data:`TASK_DIRECTION`, written by the measurement from the task's ``metric_higher_is_better``).
HIGHER, LOWER, TASK = "higher", "lower", "task"
#: The column of a row that says whether its task's metric is better when higher.
TASK_DIRECTION = "metric_higher_is_better"


@dataclass(frozen=True)
class Metric:
    """A column that rates a method: which direction is better, and what it is."""

    name: str
    better: str
    what: str


@dataclass(frozen=True)
class Table:
    """One table of the store: the measure that writes it, the columns the report needs in its ``ok`` rows,
    and the metrics among its columns."""

    name: str
    measure: str
    required: tuple[str, ...] = ()
    metrics: tuple[Metric, ...] = ()

    @property
    def side(self) -> bool:
        """Whether this is a side table (not the measure's own one-row-per-result table)."""
        return self.name != self.measure

    def metric(self, name: str) -> Metric:
        """The declared metric ``name``; UsageError lists the declared ones."""
        for m in self.metrics:
            if m.name == name:
                return m
        raise UsageError(f"table {self.name!r} declares no metric {name!r}; declared: "
                         f"{', '.join(m.name for m in self.metrics) or 'none'}")


_EVAL = (Metric("eval_metric", TASK, "the task's held-out metric (accuracy, bits per character, MSE …)"),
         Metric("eval_loss", LOWER, "held-out loss per scored step"),
         Metric("train_loss", LOWER, "training loss per scored step"))
_BIAS = Metric("relative_bias", LOWER, "‖E(ĝ − g)‖ / ‖E g‖, noise-corrected")

#: Every table of the store, by name; the measure tables first, in the order the store lists them.
TABLES: dict[str, Table] = {t.name: t for t in (
    Table("train", "train", ("task", "model", "method", "seed", "eval_metric"), _EVAL),
    Table("bias", "bias", ("task", "model", "spec", "relative_bias"),
          (_BIAS, Metric("relative_error_mean", LOWER, "mean over batches of ‖ĝ − g‖ / ‖g‖"),
           Metric("cosine_mean", HIGHER, "mean over batches of cos(ĝ, g)"),
           Metric("snr", HIGHER, "‖mean ĝ‖ / √tr Cov(ĝ)"),
           Metric("exact_relative_bias", LOWER, "‖Σ(E ĝ − g)‖ / ‖Σ g‖ over the measured batches, draw-free"))),
    Table("context", "context", ("task", "model", "method", "n_updates", "k", "relative_bias"), (_BIAS,)),
    Table("perf", "perf", ("task", "model", "method", "seq_len", "tokens_per_s", "ms_per_update"),
          (Metric("tokens_per_s", HIGHER, "trained loss positions per second"),
           Metric("ms_per_update", LOWER, "milliseconds per update (median over repeats)"),
           Metric("mem_delta_bytes", LOWER, "peak memory the run added"))),
    Table("curves", "train", metrics=_EVAL),
    Table("lags", "bias"),
    Table("alignment", "bias", metrics=(Metric("cosine_mean", HIGHER, "mean cosine between two estimators"),)),
    Table("effective_context", "context"),
    Table("context_lags", "context"),
)}
#: The measures, each with its own table of the same name.
MEASURE_NAMES = tuple(t.name for t in TABLES.values() if not t.side)


def tables_of(measure: str) -> tuple[str, ...]:
    """The tables a measure writes: its own, then its side tables."""
    return tuple(name for name, t in TABLES.items() if t.measure == measure)


def higher_is_better(table: str, metric: str, row: Mapping[str, Any]) -> bool:
    """Whether a larger ``metric`` of ``table`` is better for ``row`` (its task decides where declared so:
    the row's :data:`TASK_DIRECTION`, else the registered task's ``metric_higher_is_better``)."""
    declared_metric = TABLES[table].metric(metric)
    if declared_metric.better != TASK:
        return declared_metric.better == HIGHER
    stored = row.get(TASK_DIRECTION)
    if stored is not None and not (isinstance(stored, float) and math.isnan(stored)):
        return bool(stored)
    from tbptt_bench.tasks import TASKS

    task = row.get("task")
    try:
        return bool(TASKS.get(str(task)).metric_higher_is_better)
    except UsageError:
        raise UsageError(f"the rows of task {task!r} do not say whether their {metric} is better higher or lower "
                         f"(no {TASK_DIRECTION} column) and no such task is registered; register the task "
                         "(a plugin) or rerun its cells") from None


# --------------------------------------------------------------------------- options of a bias cell

#: What a bias cell builds (at its seed, before it calls :func:`tbptt_bench.analysis.bias.analyse_bias`):
#: the run fields it reads.
BIAS_BUILD = ("task", "task_params", "model", "model_params", "hidden_size", "num_layers", "path", "seq_len",
              "batch_size", "device", "dtype", "seed")
#: Where a bias cell's defaults differ from a training run's (the ``bias`` command's and a suite's).
BIAS_DEFAULTS: dict[str, Any] = {"dtype": "float64", "n_batches": 8}
#: The methods of a bias cell (the ``bias`` command builds them from ``--method`` and ``--k``).
METHODS = Option("methods", list[str], REQUIRED, Flag(help="method specs measured against the true gradient"))


def bias_options() -> dict[str, Option]:
    """Every option of a bias cell: what it builds (:class:`~tbptt_bench.training.run.RunConfig`'s
    declarations) and how it measures (:class:`~tbptt_bench.analysis.bias_options.BiasOptions`'s), with
    :data:`BIAS_DEFAULTS`."""
    build = declared(RunConfig, only=BIAS_BUILD, defaults=BIAS_DEFAULTS)
    return {**build, **measured_options(), "methods": METHODS}


def measured_options() -> dict[str, Option]:
    """The options of a bias cell that only the measurement reads (not the model it builds)."""
    return declared(BiasOptions, skip={*BIAS_BUILD, "with_provenance", "labels"}, defaults=BIAS_DEFAULTS)
