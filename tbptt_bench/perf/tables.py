"""Grids of perf configurations and their result tables as CSV, Parquet or JSON files (docs/perf.md)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from tbptt_bench.atomic import atomic_path, write_text
from tbptt_bench.errors import UsageError
from tbptt_bench.perf.config import COLUMNS, PerfConfig


def expand_grid(base: PerfConfig | None = None, **axes: Iterable[Any]) -> list[PerfConfig]:
    """Every combination of the values in ``axes`` (field name → values) over ``base``, in order."""
    base = base or PerfConfig()
    names = set(PerfConfig.schema()) | {"seed"}
    unknown = sorted(set(axes) - names)
    if unknown:
        raise UsageError(f"perf: unknown configuration field {unknown[0]!r}; accepted: {', '.join(sorted(names))}")
    grid = {name: list(values) for name, values in axes.items()}
    for name, values in grid.items():
        if not values:
            raise UsageError(f"perf: no values given for {name}")
    return [dataclasses.replace(base, **dict(zip(grid, combo))) for combo in itertools.product(*grid.values())]


def to_frame(rows: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Rows as a table with the documented columns first (extra columns kept after them)."""
    frame = pd.DataFrame(list(rows))
    for c in COLUMNS:
        if c not in frame.columns:
            frame[c] = None
    return frame[COLUMNS + [c for c in frame.columns if c not in COLUMNS]]


TABLE_SUFFIXES = (".csv", ".parquet", ".json")


def check_output_path(path: Path) -> None:
    """UsageError unless ``path`` can take a table: a known suffix in an existing folder."""
    if path.suffix not in TABLE_SUFFIXES:
        raise UsageError(f"cannot save {path}: unknown suffix {path.suffix!r}; accepted: {', '.join(TABLE_SUFFIXES)}")
    if not path.parent.exists():
        raise UsageError(f"cannot write {path}: folder {path.parent} does not exist")


def save_table(frame: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Write a result table as CSV, Parquet or JSON records, atomically (temp file, then rename)."""
    path = Path(path)
    check_output_path(path)
    out = frame.copy()
    if "repeat_seconds" in out.columns and path.suffix != ".json":
        out["repeat_seconds"] = out["repeat_seconds"].map(lambda v: json.dumps(v) if isinstance(v, list) else v)
    with atomic_path(path) as tmp:
        if path.suffix == ".csv":
            out.to_csv(tmp, index=False)
        elif path.suffix == ".parquet":
            out.to_parquet(tmp, index=False)
        else:
            tmp.write_text(json.dumps(out.to_dict("records"), indent=2, default=_json_default))
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def write_json_atomic(path: Path, obj: Any) -> None:
    """JSON to ``path`` through a temporary file in the same folder."""
    write_text(path, json.dumps(obj, default=_json_default))
