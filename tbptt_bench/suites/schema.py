"""The columns of the result store (schema version 2) and the conversion of version-1 stores.

A store holds one table per kind of row (docs/suites.md, "The result store"):

* ``cells``  one row per cell, whatever its outcome: the shared columns below;
* ``train``  one row per training run (final metrics), ``curves`` one row per learning-curve point;
* ``bias``   one row per (method spec, parameter group), ``lags`` one row per lag of the profile,
  ``alignment`` one row per ordered pair of estimators (mean cosine over batches);
* ``context`` one row per (checkpoint, K) of an effective-context cell: ``n_updates``, ``tokens``, ``k`` and
  the relative bias of chunked(K) (:data:`tbptt_bench.analysis.context.CURVE_COLUMNS`);
  ``effective_context`` one row per (checkpoint, level): ``level``, ``k_effective``,
  ``k_effective_point``, ``k_effective_error`` (docs/suites.md); ``context_lags`` one row per (checkpoint,
  lag) of the lag profile when the cell sets ``max_lag``: ``lag``, ``phi_mean``, ``phi_se``, ``underflow``,
  ``n_positions``;
* ``perf``   one row per cost measurement.

Every row of every table starts with the same :data:`SHARED` columns, with the same Arrow types.
Parameters are one typed column each; dict parameters are flattened to ``<name>.<key>`` columns
(``task_params`` to ``task.<key>``), list parameters (``methods``) are list columns. Integer columns
stay integers: :data:`INT_COLUMNS` are integers even where a measurement produced them as floats,
and they read back as pandas ``Int64`` when they have empty values (``k`` of ``full``).
"""

from __future__ import annotations

import datetime as dt
import json
import math
from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd
import pyarrow as pa

from tbptt_bench.suites.measures import TABLES

SCHEMA_VERSION = 2
SCHEMA_META = b"tbptt_bench.schema_version"
CELLS = "cells"
#: The table of each measurement kind and its side tables (each table declared once, in
#: :data:`tbptt_bench.suites.measures.TABLES`).
MEASURE_TABLES = {t.measure: t.name for t in TABLES.values() if not t.side}
SIDE_TABLES = {t.name: t.measure for t in TABLES.values() if t.side}

_TIME = pa.timestamp("us", tz="UTC")
#: Columns that every row of every table has, in this order and with these types.
SHARED: dict[str, pa.DataType] = {
    "key": pa.string(), "suite": pa.string(), "measure": pa.string(), "replicate": pa.int64(),
    "seed": pa.int64(), "status": pa.string(), "error": pa.string(), "diverged_at": pa.int64(),
    "started": _TIME, "finished": _TIME, "duration_s": pa.float64(), "executor": pa.string(),
    "concurrency": pa.int64(), "schema_version": pa.int64(),
    "device": pa.string(), "cpu_model": pa.string(), "gpu_model": pa.string(), "hostname": pa.string(),
    "platform": pa.string(), "python": pa.string(), "torch_version": pa.string(), "cuda_version": pa.string(),
    "cudnn_version": pa.string(), "numpy_version": pa.string(), "tbptt_bench_version": pa.string(),
    "threads": pa.int64(), "git_commit": pa.string(),
}
#: Columns that are integers even when a measurement hands them over as floats (NaN for none).
INT_COLUMNS = frozenset({
    "k", "k1", "k2", "k_used", "n_updates", "diverged_at", "tokens", "compute_steps", "lag", "n_pairs",
    "horizon", "fit_to", "n_params", "pid", "updates_per_sequence", "tokens_per_sequence", "mem_baseline_bytes",
    "mem_peak_bytes", "mem_delta_bytes", "mem_sequence_bytes", "mem_reserved_peak_bytes", "threads",
    "replicate", "seed", "concurrency", "schema_version", "k_effective", "k_effective_point", "k_effective_error",
    "span", "curve_checkpoint",
})
#: Integer columns that read back as pandas ``Int64`` even when none of their values is empty.
NULLABLE_INT = frozenset({"k", "k1", "k2", "k_used", "diverged_at", "k_effective", "k_effective_point",
                          "k_effective_error"})
#: Old column names and their new ones (``update`` collided with ``DataFrame.update``).
RENAMED = {"update": "n_updates"}
#: Dict parameters and the prefix of their flattened columns.
DICT_PREFIX = {"task_params": "task", "model_params": "model"}


def flatten_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """A cell's parameters as flat typed columns: dicts to ``prefix.key`` columns, lists kept as lists."""
    out: dict[str, Any] = {}
    for name, value in params.items():
        if isinstance(value, Mapping):
            out.update(_flatten(DICT_PREFIX.get(name, name), value))
        else:
            out[name] = list(value) if isinstance(value, tuple) else value
    return out


def _flatten(prefix: str, value: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, item in value.items():
        if isinstance(item, Mapping):
            out.update(_flatten(f"{prefix}.{name}", item))
        else:
            out[f"{prefix}.{name}"] = item
    return out


def unflatten(row: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """The dict that :func:`flatten_params` spread over ``prefix.*`` columns (empty values left out)."""
    out: dict[str, Any] = {}
    for name, value in row.items():
        if name.startswith(prefix + ".") and not _missing(value):
            node = out
            *path, last = name[len(prefix) + 1:].split(".")
            for part in path:
                node = node.setdefault(part, {})
            node[last] = value.item() if isinstance(value, np.generic) else value
    return out


def _missing(value: Any) -> bool:
    if value is None or value is pd.NA or value is pd.NaT:
        return True
    return isinstance(value, float) and math.isnan(value)


def _plain(name: str, value: Any) -> Any:
    """One cell value as a plain Python value of its column's type (NaN of an integer column: None)."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    elif isinstance(value, np.generic):
        value = value.item()
    if _missing(value):
        return None
    if name in INT_COLUMNS and isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, pd.Timestamp):
        return value.to_pydatetime()
    return value


def _column(name: str, values: list[Any]) -> pa.Array:
    wanted = SHARED.get(name)
    try:
        array = pa.array(values, type=wanted) if wanted is not None else pa.array(values)
    except (pa.ArrowTypeError, pa.ArrowInvalid, OverflowError):
        array = pa.array([None if v is None else (json.dumps(v, sort_keys=True) if isinstance(v, (dict, list))
                                                  else str(v)) for v in values], type=pa.string())
    if wanted is None and name in INT_COLUMNS and pa.types.is_null(array.type):
        array = array.cast(pa.int64())
    return array


def to_arrow(rows: Iterable[Mapping[str, Any]]) -> pa.Table:
    """Rows (dicts) as an Arrow table: the shared columns first with their types, then the rest."""
    rows = [{**r, "schema_version": SCHEMA_VERSION} for r in rows]
    names = list(SHARED)
    seen = set(names)
    for row in rows:
        names.extend(n for n in row if n not in seen and not seen.add(n))  # type: ignore[func-returns-value]
    table = pa.table({n: _column(n, [_plain(n, r.get(n)) for r in rows]) for n in names})
    return table.replace_schema_metadata({SCHEMA_META: str(SCHEMA_VERSION).encode()})


def to_frame(table: pa.Table) -> pd.DataFrame:
    """An Arrow table as pandas: integer columns stay integers (``Int64`` where some value is empty);
    a column without any value is float NaN."""
    frame = table.to_pandas(types_mapper={pa.int64(): pd.Int64Dtype()}.get)
    for field in table.schema:
        if pa.types.is_null(field.type):  # a column no row has a value in: NaN, as pandas reads a missing number
            frame[field.name] = frame[field.name].astype("float64")
    for name in frame.columns:
        if isinstance(frame[name].dtype, pd.Int64Dtype) and name not in NULLABLE_INT and not frame[name].isna().any():
            frame[name] = frame[name].astype("int64")
    return frame


# --------------------------------------------------------------------------- schema version 1

def _v1_rows(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows of a version-1 frame in version-2 form: JSON text parameters parsed, columns renamed."""
    frame = frame.dropna(axis=1, how="all").rename(columns=RENAMED)
    rows = []
    for record in frame.to_dict("records"):
        row: dict[str, Any] = {}
        for name, value in record.items():
            if name in ("task_params", "optimizer_args", "lr_schedule_args", "methods") and isinstance(value, str):
                value = json.loads(value)
            if isinstance(value, dict):
                row.update(_flatten(DICT_PREFIX.get(name, name), value))
            else:
                row[name] = value
        rows.append(row)
    return rows


def convert_v1(results: pd.DataFrame, curves: pd.DataFrame, lags: pd.DataFrame) -> dict[str, pa.Table]:
    """A version-1 store (one ``results`` table with a ``measure`` column) as version-2 tables."""
    out: dict[str, pa.Table] = {}
    if results.empty:
        return out
    shared = [c for c in SHARED if c in results.columns]
    out[CELLS] = to_arrow(_v1_rows(results.drop_duplicates("key")[shared]))
    for measure, group in results.groupby("measure", sort=True):
        out[MEASURE_TABLES.get(str(measure), str(measure))] = to_arrow(_v1_rows(group))
    for name, frame in (("curves", curves), ("lags", lags)):
        if not frame.empty:
            out[name] = to_arrow(_v1_rows(frame))
    return out


def v1_frame(table: pa.Table) -> pd.DataFrame:
    """A version-1 Arrow table as pandas with integer columns kept as (nullable) integers."""
    return table.to_pandas(types_mapper={pa.int64(): pd.Int64Dtype()}.get)


def utc_now() -> dt.datetime:
    """The current time in UTC (the type of ``started`` and ``finished``)."""
    return dt.datetime.now(dt.timezone.utc)
