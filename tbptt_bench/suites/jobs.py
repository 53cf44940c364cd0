"""One cell of a suite = one measurement (train, bias, context or perf), turned into tidy table rows.

A *measure* says which parameters a cell of its kind accepts (with defaults and types), checks them
before anything runs, and runs one cell. :func:`run_cell` wraps every measure the same way: it stamps
each row with the cell's key, parameters, provenance, status and timing, and turns failures into data:

* ``ok``        the measurement finished;
* ``diverged``  training loss became NaN/inf (``diverged_at`` = the update that showed it);
* ``oom``       out of memory (CPU allocator, ``MemoryError`` or CUDA);
* ``timeout``   the cell ran past its time limit and was stopped (``duration_s`` = the time it had run);
* ``failed``    any other exception (``error`` = its type and message), or a worker process that died.

Rows are returned per table: ``cells`` (exactly one row per cell), the measurement's own table
(``train``, ``bias``, ``context`` or ``perf``: at least one row per cell, without metrics when it did not
end ok) and side tables (``curves``: train learning curves, ``lags``: bias lag profiles, ``alignment``: bias
cosines between estimators, ``effective_context``: the effective context per checkpoint and level,
``context_lags``: the lag profile per checkpoint and lag, when a context cell sets ``max_lag``). Columns:
:mod:`tbptt_bench.suites.schema` and docs/suites.md.
"""

from __future__ import annotations

import datetime as dt
import importlib
import json
import logging
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Mapping

import pandas as pd
import torch

from tbptt_bench.errors import UsageError
from tbptt_bench.methods.base import parse_method
from tbptt_bench.provenance import provenance
from tbptt_bench.models import MODELS
from tbptt_bench.seeding import generator
from tbptt_bench.core.build import make_task
from tbptt_bench.options import REQUIRED, Option, schema
from tbptt_bench.suites.measures import TASK_DIRECTION, bias_options, tables_of
from tbptt_bench.suites.schema import CELLS, RENAMED, SHARED, flatten_params, utc_now
from tbptt_bench.perf.failures import is_out_of_memory
from tbptt_bench.training.loop import TrainConfig, train

log = logging.getLogger(__name__)

CELL_STATUSES = ("ok", "diverged", "oom", "timeout", "failed")
#: Marks a parameter without a default in a measure's schema.
NO_DEFAULT = REQUIRED

#: Parameters from which a cell's seed is derived (besides the suite seed and the replicate index).
#: Cells that differ only in other parameters (method, optimiser, steps, measurement) share a seed and
#: hence initial parameters and data: they are paired. See :func:`tbptt_bench.suites.suite.cell_seed`.
SEED_KEYS = ("task", "task_params", "model", "hidden_size", "num_layers", "seq_len", "batch_size")

Rows = list[dict[str, Any]]
Tables = dict[str, Rows]


@dataclass(frozen=True)
class GridPoint:
    """One point of a suite's grid: a measurement kind and its fully resolved parameters."""

    suite: str
    measure: str
    params: Mapping[str, Any]
    key: str
    replicate: int
    #: Seconds after which the cell is stopped and recorded as ``timeout`` (None: no limit); not in the key.
    time_limit: float | None = None

    @property
    def timing(self) -> bool:
        """Whether the cell times something (and so must run alone)."""
        return MEASURES[self.measure].timing

    @property
    def device(self) -> str:
        return str(self.params.get("device", "cpu"))

    @property
    def label(self) -> str:
        """A short human-readable description: measure, task/model, method(s), replicate."""
        p = self.params
        method = p.get("method") or ",".join(p.get("methods") or ())
        return f"{self.measure} {p.get('task', '?')}/{p.get('model', '?')} {method} r{self.replicate}".strip()


@dataclass
class JobResult:
    """What running a cell produced: its status and its rows per table (``results`` always present)."""

    key: str
    status: str
    error: str
    tables: Tables
    duration_s: float
    diverged_at: int | None = None
    label: str = ""


@dataclass(frozen=True)
class Measure:
    """A kind of measurement that a suite can ask for."""

    name: str
    #: Bumped when what the measurement means changes; part of every cell key of this kind.
    version: int
    #: Timing measurements run one at a time, never beside another cell.
    timing: bool
    #: The module that must be importable for this measure (its function lives there).
    module: str
    #: The accepted parameters, declared once (:mod:`tbptt_bench.options`): name → option (type hint,
    #: default or :data:`NO_DEFAULT`, bounds and accepted values); ``seed`` is set by the suite.
    options: Callable[[], dict[str, Option]]
    #: Raises UsageError for parameters that cannot be measured (called before anything runs).
    check: Callable[[dict[str, Any]], None]
    #: Measures one cell from its parameters (the seed included): rows per table.
    run: Callable[[dict[str, Any]], Tables]
    #: Parameter names whose value is itself a list (a list of lists is then a grid axis).
    list_keys: frozenset[str] = frozenset()

    def schema(self) -> dict[str, tuple[Any, Any]]:
        """The accepted parameters besides ``seed``: name → (type hint, default)."""
        return schema(self.options(), skip={"seed"})

    @property
    def tables(self) -> tuple[str, ...]:
        """The tables this measure writes: its own, then its side tables (:mod:`tbptt_bench.suites.measures`)."""
        return tables_of(self.name)

    def available(self) -> str | None:
        """``None`` when usable, else why not."""
        try:
            importlib.import_module(self.module)
        except ModuleNotFoundError as exc:
            if exc.name == self.module:
                return f"measure {self.name!r} needs {self.module}, which this installation lacks"
            raise
        return None


# --------------------------------------------------------------------------- shared checks

@lru_cache(maxsize=64)
def _task_cached(name: str, params_json: str) -> Any:
    return make_task(name, **json.loads(params_json))


def check_task_and_model(params: Mapping[str, Any]) -> None:
    """The task exists, accepts its parameters and the sequence length; the model exists."""
    task = _task_cached(params["task"], json.dumps(params.get("task_params") or {}, sort_keys=True))
    MODELS.get(params["model"])
    seq_len = params.get("seq_len")
    if seq_len is not None and not task.streaming:
        task.sample(1, int(seq_len), generator(0), "train")


# --------------------------------------------------------------------------- train

def _train_options() -> dict[str, Option]:
    return TrainConfig.options()


def _train_check(params: dict[str, Any]) -> None:
    TrainConfig(**params).validate()
    check_task_and_model(params)


def _train_run(params: dict[str, Any]) -> Tables:
    cfg = TrainConfig(**params)
    result = train(cfg)
    task = _task_cached(cfg.task, json.dumps(cfg.task_params or {}, sort_keys=True))
    extra = {"metric_name": result.metric_name, "baseline": result.baseline,
             TASK_DIRECTION: bool(task.metric_higher_is_better)}
    curves = [{**row, **extra} for row in result.curve]
    if result.diverged_at is not None:
        message = f"loss became non-finite by update {result.diverged_at}"
        return {"train": [{"status": "diverged", "error": message, "diverged_at": result.diverged_at}],
                "curves": curves}
    return {"train": [{**result.final, **extra}], "curves": curves}


# --------------------------------------------------------------------------- bias



def _bias_check(params: dict[str, Any]) -> None:
    """What the declarations cannot say (sizes, dtype and bounds are checked against them as the suite is read)."""
    if not params["methods"]:
        raise UsageError("methods = [] measures nothing; list at least one method spec")
    for spec in params["methods"]:
        parse_method(spec)
    check_task_and_model(params)
    if params.get("model_params"):
        from tbptt_bench.core.build import make_model

        make_model(params["model"], _task_cached(params["task"], json.dumps(params.get("task_params") or {},
                   sort_keys=True)), params["hidden_size"], params["num_layers"], model_params=params["model_params"])


def _bias_run(params: dict[str, Any]) -> Tables:
    from tbptt_bench.analysis import bias
    from tbptt_bench.core.build import make_model

    build = {k: params.pop(k) for k in ("task", "task_params", "model", "hidden_size", "num_layers", "path", "methods")}
    model_params = params.pop("model_params", None) or {}
    task = make_task(build["task"], **build["task_params"])
    model = make_model(build["model"], task, build["hidden_size"], build["num_layers"], seed=params["seed"],
                       dtype=params["dtype"], device=params["device"], path=build["path"], model_params=model_params)
    labels = {"model": build["model"], **{f"model.{k}": v for k, v in sorted(model_params.items())}}
    report = bias.analyse_bias(task, model, build["methods"], with_provenance=False, labels=labels, **params)
    return {"bias": _records(report.table), "lags": _records(report.lags), "alignment": _records(report.alignment)}


# --------------------------------------------------------------------------- context

def _context_options() -> dict[str, Option]:
    from tbptt_bench.training.context import ContextConfig

    return ContextConfig.options()


def _context_check(params: dict[str, Any]) -> None:
    from tbptt_bench.training.context import ContextConfig

    ContextConfig(**params).validate()
    check_task_and_model(params)


def _context_run(params: dict[str, Any]) -> Tables:
    from tbptt_bench.training.context import ContextConfig, train_context

    result = train_context(ContextConfig(**params))
    tables: Tables = {"context": result.curve, "effective_context": result.levels}
    if result.lags:
        tables["context_lags"] = result.lags
    if result.training.diverged_at is not None:
        message = f"loss became non-finite by update {result.training.diverged_at}"
        mark = {"status": "diverged", "error": message, "diverged_at": result.training.diverged_at}
        tables["context"] = [{**row, **mark} for row in result.curve] or [mark]  # checkpoints before it stay
    return tables


# --------------------------------------------------------------------------- perf

def _perf_options() -> dict[str, Option]:
    from tbptt_bench.perf.config import PerfConfig

    return PerfConfig.options()


def _perf_config(params: dict[str, Any]) -> Any:
    """The PerfConfig of a cell."""
    from tbptt_bench.perf.config import PerfConfig

    return PerfConfig(**params)


def _perf_check(params: dict[str, Any]) -> None:
    if str(params.get("device", "cpu")).startswith("cuda") and not torch.cuda.is_available():
        params = {**params, "device": "cpu"}  # the device is checked where the cell runs
    _perf_config(params).validate()


def _perf_run(params: dict[str, Any]) -> Tables:
    from tbptt_bench.perf import child as perf

    row = perf.measure_in_fresh_process(_perf_config(params))
    return {"perf": [dict(row)]}


# --------------------------------------------------------------------------- helpers

def _records(frame: Any) -> Rows:
    if isinstance(frame, pd.DataFrame):
        return frame.to_dict("records")
    return [dict(r) for r in frame]


MEASURES: dict[str, Measure] = {
    "train": Measure("train", 1, timing=False, module="tbptt_bench.training.loop",
                     options=_train_options, check=_train_check, run=_train_run),
    "bias": Measure("bias", 1, timing=False, module="tbptt_bench.analysis.bias", list_keys=frozenset({"methods"}),
                    options=bias_options, check=_bias_check, run=_bias_run),
    "context": Measure("context", 1, timing=False, module="tbptt_bench.training.context", list_keys=frozenset({"levels"}),
                       options=_context_options, check=_context_check, run=_context_run),
    "perf": Measure("perf", 1, timing=True, module="tbptt_bench.perf.child",
                    options=_perf_options, check=_perf_check, run=_perf_run),
}


# --------------------------------------------------------------------------- running a cell

def reported_status(rows: Rows) -> tuple[str, str]:
    """The cell status when a measurement reports its own (perf rows carry ``status``/``error``).

    The worst status over the rows wins; a status this module does not know is ``failed`` with the
    status named in the error.
    """
    worst, error = "ok", ""
    rank = {s: i for i, s in enumerate(CELL_STATUSES)}
    for row in rows:
        status = row.get("status") or "ok"
        message = str(row.get("error") or "")
        if status not in rank:
            status, message = "failed", f"{row['status']}: {message}".rstrip(": ")
        if rank[status] > rank[worst]:
            worst, error = status, message
    return worst, error


def stamp(cell: GridPoint, tables: Tables, *, status: str, error: str, diverged_at: int | None,
          started: dt.datetime, finished: dt.datetime, duration_s: float, executor: str,
          concurrency: int) -> Tables:
    """Add the cell's bookkeeping, parameter and provenance columns to every row of every table.

    The result has one ``cells`` row and at least one row in the measurement's own table.
    """
    common = {
        "key": cell.key, "suite": cell.suite, "measure": cell.measure, "replicate": cell.replicate,
        "status": status, "error": error, "diverged_at": diverged_at,
        "started": started, "finished": finished, "duration_s": duration_s,
        "executor": executor, "concurrency": concurrency,
    }
    where = provenance(cell.device)  # a parameter left at None (threads) does not hide what the cell ran with
    base = {**where, **{k: v for k, v in flatten_params(cell.params).items() if v is not None or k not in where}}
    stamped: Tables = {CELLS: [{**{k: v for k, v in base.items() if k in SHARED}, **common}]}
    tables = {cell.measure: [], **tables}
    for name, rows in tables.items():
        if name == cell.measure and not rows:
            rows = [{}]
        stamped[name] = [{**base, **{RENAMED.get(k, k): v for k, v in row.items()}, **common} for row in rows]
    return stamped


def run_cell(cell: GridPoint, *, executor: str = "local", concurrency: int = 1) -> JobResult:
    """Run one cell and return its rows; every outcome but KeyboardInterrupt becomes a status."""
    measure = MEASURES[cell.measure]
    started, t0 = utc_now(), time.perf_counter()
    diverged_at: int | None = None
    try:
        tables = measure.run(dict(cell.params))
        undeclared = sorted(set(tables) - set(measure.tables))
        if undeclared:
            raise RuntimeError(f"measure {measure.name!r} wrote undeclared table(s) {', '.join(undeclared)}; declare "
                               "them in tbptt_bench/suites/measures.py")
        rows = tables.get(cell.measure, [])
        status, error = reported_status(rows)
        diverged_at = next((r["diverged_at"] for r in rows if r.get("diverged_at") is not None), None)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # failures are data: the sweep goes on
        tables = {}
        status = "oom" if is_out_of_memory(exc) else "failed"
        error = f"{type(exc).__name__}: {exc}".strip()
        log.debug("cell %s failed", cell.key, exc_info=True)
        if status == "oom" and torch.cuda.is_available():
            torch.cuda.empty_cache()
    duration = time.perf_counter() - t0
    stamped = stamp(cell, tables, status=status, error=error, diverged_at=diverged_at, started=started,
                    finished=utc_now(), duration_s=duration, executor=executor, concurrency=concurrency)
    return JobResult(cell.key, status, error, stamped, duration, diverged_at, cell.label)


def crashed_result(cell: GridPoint, message: str, *, executor: str, concurrency: int,
                   status: str = "failed", started: dt.datetime | None = None,
                   duration_s: float = 0.0) -> JobResult:
    """The result of a cell whose worker process died, that Ray could not run, or that was stopped
    at its time limit (``status="timeout"``, with the time it had run)."""
    now = utc_now()
    stamped = stamp(cell, {}, status=status, error=message, diverged_at=None, started=started or now,
                    finished=now, duration_s=duration_s, executor=executor, concurrency=concurrency)
    return JobResult(cell.key, status, message, stamped, duration_s, None, cell.label)


def measure_of(name: str) -> Measure:
    """The measure called ``name``; a UsageError lists the accepted ones."""
    try:
        return MEASURES[name]
    except KeyError:
        raise UsageError(f"unknown measurement {name!r}; accepted: {', '.join(MEASURES)}") from None
