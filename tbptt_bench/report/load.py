"""Result stores for the report: find a store, load its tables and check they are tbptt-bench result tables."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd

from tbptt_bench.errors import UsageError
from tbptt_bench.suites.measures import MEASURE_NAMES, TABLES

log = logging.getLogger(__name__)


#: Columns every row of a tbptt-bench result table has.
BOOKKEEPING = ("key", "measure", "status")


def find_store(path: str | Path) -> Path:
    """The store directory of ``path``: a store itself, or a results root holding exactly one store."""
    root = Path(path)
    if not root.exists():
        raise UsageError(f"results path {root} does not exist; pass a store directory such as results/quick")
    if root.is_file():
        return root
    if _is_store(root):
        return root
    stores = sorted(p for p in root.iterdir() if p.is_dir() and _is_store(p))
    if len(stores) == 1:
        return stores[0]
    if stores:
        names = ", ".join(str(p) for p in stores)
        raise UsageError(f"{root} holds several result stores ({names}); pass one of them")
    raise UsageError(f"{root} holds no results (no .parquet table); run a suite first, e.g. tbptt-bench run quick")


def _is_store(path: Path) -> bool:
    return (path / "manifest.json").is_file() or any(path.glob("*.parquet")) or (path / "parts").is_dir()


def readable(frame: pd.DataFrame) -> pd.DataFrame:
    """A stored table as the report sections read it: integer columns with gaps as floats with NaN (not
    ``pd.NA``) and the task parameters also as JSON text in ``task_params`` (panel labels)."""
    from tbptt_bench.suites.schema import unflatten

    frame = frame.copy()
    for name in frame.columns:
        if isinstance(frame[name].dtype, pd.Int64Dtype):
            frame[name] = frame[name].astype("float64") if frame[name].isna().any() else frame[name].astype("int64")
    task_columns = [c for c in frame.columns if c.startswith("task.")]
    if "task_params" not in frame.columns and "task" in frame.columns:
        frame["task_params"] = [json.dumps(unflatten(row, "task"), sort_keys=True)
                                for row in frame[task_columns].to_dict("records")]
    return frame


def as_tables(tables: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """The store's tables by name (docs/suites.md), each :func:`readable`. Tables in the version-1 form —
    one ``results`` frame of every measure's rows with a ``measure`` column, ``update`` for ``n_updates`` —
    are split into the measures' tables first."""
    tables = dict(tables)
    if "results" in tables:
        from tbptt_bench.suites.schema import RENAMED

        results = tables.pop("results")
        tables = {name: frame.rename(columns=RENAMED) for name, frame in tables.items()}
        tables.update(_split_file(Path("results"), results) if not results.empty else {})
    return {name: readable(frame) for name, frame in tables.items()}


def load_tables(path: str | Path) -> dict[str, pd.DataFrame]:
    """Every table of a store by name (:func:`as_tables`), checked against the declared columns
    (:data:`tbptt_bench.suites.measures.TABLES`); one Parquet/CSV file of a version-1 store (a ``measure``
    column) is split into its measures' tables first.

    Raises UsageError for a path that does not exist, an empty table, or a table that is not a
    tbptt-bench result table (no key/measure/status columns, or a measure's required columns missing).
    """
    from tbptt_bench.suites.store import read_tables

    root = find_store(path)
    tables = _split_file(root, _read_file(root)) if root.is_file() else read_tables(root)
    tables = {name: upgrade_bias_columns(df) for name, df in tables.items()}
    measured = {m: tables[m] for m in MEASURE_NAMES if m in tables and not tables[m].empty}
    if not measured:
        raise UsageError(f"results table in {root} is empty; run a suite into it first")
    for measure, frame in measured.items():
        missing = [c for c in BOOKKEEPING if c not in frame.columns]
        if missing:
            raise UsageError(f"{root} is not a tbptt-bench results table: missing column(s) {', '.join(missing)}")
        rows = frame[frame["status"] == "ok"]
        lacking = [c for c in TABLES[measure].required if c not in rows.columns or (len(rows) and rows[c].isna().all())]
        if len(rows) and lacking:
            raise UsageError(f"{root}: {measure} rows lack column(s) {', '.join(lacking)}; "
                             "the table was not written by this version of tbptt-bench")
    return as_tables(tables)


def _split_file(path: Path, frame: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """One results frame (all measures' rows, a ``measure`` column) as one table per measure and a ``cells``
    table (one row per cell), columns renamed as the store renames them."""
    from tbptt_bench.suites.schema import RENAMED, SHARED

    missing = [c for c in BOOKKEEPING if c not in frame.columns]
    if missing:
        raise UsageError(f"{path} is not a tbptt-bench results table: missing column(s) {', '.join(missing)}")
    frame = frame.rename(columns=RENAMED)
    out = {str(m): rows.reset_index(drop=True) for m, rows in frame.groupby("measure", sort=False)}
    out["cells"] = frame.drop_duplicates("key")[[c for c in SHARED if c in frame.columns]].reset_index(drop=True)
    return out


def upgrade_bias_columns(df: pd.DataFrame) -> pd.DataFrame:
    """Bias rows written before the noise-corrected headline (store schema ≤ 1): their ``relative_bias``
    was the plug-in and ``bound`` the lag-profile extrapolation. Rename, so that no old plug-in value is
    read as the headline; the headline is then the old ``relative_bias_unbiased`` without an interval."""
    if "relative_bias_unbiased" not in df.columns or "relative_bias_plugin" in df.columns:
        return df
    out = df.rename(columns={"relative_bias": "relative_bias_plugin", "bound": "extrapolation",
                             "relative_bias_unbiased": "relative_bias"})
    out["relative_bias_lo"] = float("nan")
    out["relative_bias_hi"] = float("nan")
    log.warning("bias rows of an older store: the headline is the noise-corrected estimate without its "
                "interval; rerun the suite for intervals and the test of zero bias")
    return out


def _read_file(path: Path) -> pd.DataFrame:
    try:
        if path.suffix == ".parquet":
            return pd.read_parquet(path)
        if path.suffix == ".csv":
            return pd.read_csv(path)
    except Exception as exc:  # pyarrow and pandas raise many types for a damaged file
        raise UsageError(f"cannot read results file {path}: {type(exc).__name__}: {exc}") from None
    raise UsageError(f"results file {path} is neither .parquet nor .csv; pass a store directory")
