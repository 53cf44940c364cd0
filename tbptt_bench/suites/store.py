"""The result store: tidy Parquet tables in one directory, written so that SIGKILL loses nothing.

Layout of a store directory (``results/<suite>/`` by default)::

    results.parquet        one row per measurement (every cell has ≥ 1 row here)
    curves.parquet         side tables (train learning curves, bias lag profiles, …), keyed the same way
    lags.parquet
    parts/<key>/<table>.parquet   cells finished since the last compaction
    .lock                  held (fcntl.flock) by the one run that writes here

Protocol (a single writer, enforced by the lock):

1. a finished cell is written to ``parts/.tmp-<key>-…/`` (each file fsynced), then renamed to
   ``parts/<key>/``: a cell is either wholly committed or absent;
2. compaction merges the parts into the main tables: for every table, rows of the committed keys are
   dropped from the old table and the parts' rows appended; each table is replaced atomically
   (write a temporary file, fsync, ``os.replace``); only then are the parts renamed away and deleted.
   Compaction is idempotent, so a kill at any moment leaves a state that the next run's compaction
   turns into every cell exactly once.

Every file carries the schema version in its Parquet metadata and a ``schema_version`` column; a file
that cannot be read, or has another schema version, is reported with its path and never overwritten.
Readers (:func:`read_results`) need no lock: they read parts first, then the main table, and keep
each key once.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import shutil
import socket
import time
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tbptt_bench.errors import UsageError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
SCHEMA_META = b"tbptt_bench.schema_version"
MAIN_TABLE = "results"
LOCK_NAME = ".lock"
PARTS = "parts"
_TABLE_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_KEY = re.compile(r"^[0-9a-f]{16}$")


# --------------------------------------------------------------------------- arrow helpers

def to_arrow(rows: list[dict[str, Any]] | pd.DataFrame) -> pa.Table:
    """Rows as an Arrow table with the schema version attached; mixed-type columns become text."""
    frame = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame.from_records(rows)
    frame = frame.assign(schema_version=SCHEMA_VERSION)
    try:
        table = pa.Table.from_pandas(frame, preserve_index=False)
    except (pa.ArrowTypeError, pa.ArrowInvalid):
        for name in frame.columns:
            try:
                pa.array(frame[name], from_pandas=True)
            except (pa.ArrowTypeError, pa.ArrowInvalid):
                frame[name] = frame[name].map(lambda v: None if v is None else str(v))
        table = pa.Table.from_pandas(frame, preserve_index=False)
    return table.replace_schema_metadata({SCHEMA_META: str(SCHEMA_VERSION).encode()})


def concat(tables: list[pa.Table]) -> pa.Table:
    """Concatenate tables whose columns differ; conflicting column types are unified as text."""
    tables = [t.replace_schema_metadata(None) for t in tables]
    try:
        out = pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowTypeError, pa.ArrowInvalid):
        types: dict[str, set[pa.DataType]] = {}
        for t in tables:
            for f in t.schema:
                if not pa.types.is_null(f.type):
                    types.setdefault(f.name, set()).add(f.type)
        clash = {name for name, ts in types.items() if len(ts) > 1}
        fixed = []
        for t in tables:
            for name in clash & set(t.column_names):
                i = t.column_names.index(name)
                t = t.set_column(i, name, pc.cast(t[name], pa.string()))
            fixed.append(t)
        out = pa.concat_tables(fixed, promote_options="permissive")
    return out.replace_schema_metadata({SCHEMA_META: str(SCHEMA_VERSION).encode()})


def read_checked(path: Path) -> pa.Table:
    """Read a store file, or raise a UsageError naming it (unreadable, or another schema version)."""
    try:
        table = pq.read_table(path)
    except FileNotFoundError:
        raise
    except Exception as exc:  # pyarrow raises several types for damaged files
        raise UsageError(f"results file {path} cannot be read ({type(exc).__name__}: {exc}); it was left "
                         "untouched: move it aside or pass another --results directory") from None
    meta = table.schema.metadata or {}
    version = meta.get(SCHEMA_META, b"?").decode(errors="replace")
    if version != str(SCHEMA_VERSION):
        raise UsageError(f"results file {path} has schema version {version}; this tbptt-bench reads and writes "
                         f"version {SCHEMA_VERSION}: move it aside or pass another --results directory")
    if "key" not in table.column_names:
        raise UsageError(f"results file {path} has no 'key' column; it is not a tbptt-bench store file")
    return table


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(table: pa.Table, path: Path) -> None:
    with open(path, "wb") as fh:
        pq.write_table(table, fh)
        fh.flush()
        os.fsync(fh.fileno())


def write_atomic(table: pa.Table, path: Path) -> None:
    """Replace ``path`` with ``table`` so that a reader sees the old or the new file, never a part."""
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        _write_file(table, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


# --------------------------------------------------------------------------- reading

def _main_files(root: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted(root.glob("*.parquet")) if _TABLE_NAME.match(p.stem)}


def _part_dirs(root: Path) -> list[Path]:
    parts = root / PARTS
    if not parts.is_dir():
        return []
    return sorted(p for p in parts.iterdir() if _KEY.match(p.name) and p.is_dir())


def _read_parts(root: Path, table: str) -> tuple[list[pa.Table], set[str]]:
    """The part files of ``table`` and the keys of every committed part (parts that vanish are skipped)."""
    out, keys = [], set()
    for part in _part_dirs(root):
        file = part / f"{table}.parquet"
        try:
            if file.exists():
                out.append(read_checked(file))
            elif not part.is_dir():
                continue
        except FileNotFoundError:
            continue
        keys.add(part.name)
    return out, keys


def read_arrow(root: str | os.PathLike[str], table: str = MAIN_TABLE) -> pa.Table | None:
    """One table of a store (committed parts included, each key once), or None if it has none."""
    root = Path(root)
    parts, keys = _read_parts(root, table)
    main_path = root / f"{table}.parquet"
    pieces = []
    try:
        main = read_checked(main_path)
        if keys:
            main = main.filter(pc.invert(pc.is_in(main["key"], value_set=pa.array(sorted(keys)))))
        pieces.append(main)
    except FileNotFoundError:
        pass
    pieces.extend(parts)
    if not pieces:
        return None
    return concat(pieces)


def read_results(root: str | os.PathLike[str], table: str = MAIN_TABLE) -> pd.DataFrame:
    """A store's table as a DataFrame (``results``, ``curves``, ``lags``, …); empty if absent.

    Needs no lock: safe while a run writes, and then a snapshot of the cells committed so far.
    """
    root = Path(root)
    if not root.is_dir():
        raise UsageError(f"results directory {root} does not exist")
    if not _TABLE_NAME.match(table):
        raise UsageError(f"bad table name {table!r}; expected lower-case letters, digits and _")
    arrow = read_arrow(root, table)
    return pd.DataFrame() if arrow is None else arrow.to_pandas()


def table_names(root: str | os.PathLike[str]) -> list[str]:
    """Names of the tables a store holds (main files and parts)."""
    root = Path(root)
    names = set(_main_files(root))
    for part in _part_dirs(root):
        names.update(p.stem for p in part.glob("*.parquet"))
    return sorted(names)


# --------------------------------------------------------------------------- writing

class ResultStore:
    """The writer side of a store directory; use as a context manager (it holds the lock).

    >>> with ResultStore("results/quick") as store:   # doctest: +SKIP
    ...     store.commit(key, {"results": rows})
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self._lock_fd: int | None = None

    # ---- lock
    def __enter__(self) -> "ResultStore":
        self.acquire()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the directory's lock (fail fast if another run holds it), clean up, compact leftovers."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"cannot create results directory {self.root}: {exc.strerror}") from None
        lock_path = self.root / LOCK_NAME
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise UsageError(f"cannot open the lock file {lock_path}: {exc.strerror}; is the results "
                             "directory writable?") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = lock_path.read_text(errors="replace").strip() or "unknown process"
            raise UsageError(f"results directory {self.root} is in use by another tbptt-bench run ({holder}); "
                             "wait for it to finish or pass another --results directory") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                 .encode())
        self._lock_fd = fd
        try:
            self._clean_temporaries()
            for path in _main_files(self.root).values():
                read_checked(path)
            self.compact()
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def _require_lock(self) -> None:
        if self._lock_fd is None:
            raise RuntimeError("ResultStore used without holding its lock; use it as a context manager")

    def _clean_temporaries(self) -> None:
        """Remove what a killed run left half-written (never a committed file)."""
        for tmp in self.root.glob(".*.tmp-*"):
            tmp.unlink(missing_ok=True)
        parts = self.root / PARTS
        if parts.is_dir():
            for tmp in parts.glob(".*"):
                shutil.rmtree(tmp, ignore_errors=True)

    # ---- state
    def statuses(self) -> dict[str, str]:
        """Key → status of every committed cell."""
        table = read_arrow(self.root, MAIN_TABLE)
        if table is None:
            return {}
        frame = table.select(["key", "status"]).to_pandas()
        return dict(zip(frame["key"], frame["status"]))

    # ---- writing
    def commit(self, key: str, tables: dict[str, list[dict[str, Any]]]) -> None:
        """Commit one finished cell's rows atomically (all tables or none)."""
        self._require_lock()
        if not _KEY.match(key):
            raise ValueError(f"bad cell key {key!r}")
        if not tables.get(MAIN_TABLE):
            raise ValueError(f"cell {key} has no row in the {MAIN_TABLE!r} table")
        parts = self.root / PARTS
        parts.mkdir(exist_ok=True)
        final = parts / key
        tmp = parts / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            for name, rows in tables.items():
                if not _TABLE_NAME.match(name):
                    raise ValueError(f"bad table name {name!r}")
                if rows:
                    _write_file(to_arrow(rows), tmp / f"{name}.parquet")
            _fsync_dir(tmp)
            if final.exists():
                self._discard(final)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _fsync_dir(parts)

    def compact(self) -> None:
        """Merge committed parts into the main tables (idempotent; safe to interrupt at any point)."""
        self._require_lock()
        parts = _part_dirs(self.root)
        if not parts:
            return
        keys = pa.array(sorted(p.name for p in parts))
        names = set(_main_files(self.root))
        for part in parts:
            names.update(p.stem for p in part.glob("*.parquet") if _TABLE_NAME.match(p.stem))
        for name in sorted(names):
            path = self.root / f"{name}.parquet"
            pieces = []
            if path.exists():
                old = read_checked(path)
                pieces.append(old.filter(pc.invert(pc.is_in(old["key"], value_set=keys))))
            pieces.extend(read_checked(p / f"{name}.parquet") for p in parts if (p / f"{name}.parquet").exists())
            write_atomic(concat(pieces), path)
        for part in parts:
            self._discard(part)
        _fsync_dir(self.root / PARTS)
        log.info("compacted %d cells into %s", len(parts), self.root)

    def _discard(self, part: Path) -> None:
        trash = part.with_name(f".trash-{part.name}-{uuid.uuid4().hex[:8]}")
        os.rename(part, trash)
        shutil.rmtree(trash, ignore_errors=True)


def store_dir(results: str | os.PathLike[str], suite: str) -> Path:
    """Where a suite's store lives under a results root: ``<results>/<suite>/``."""
    return Path(results) / suite

