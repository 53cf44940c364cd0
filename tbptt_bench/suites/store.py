"""The result store: tidy Parquet tables in one directory, written so that SIGKILL loses nothing.

Layout of a store directory (``results/<suite>/`` by default; columns in :mod:`tbptt_bench.suites.schema`)::

    manifest.json          the schema version and the names of the tables (written atomically)
    cells.parquet          one row per cell, whatever its outcome (status, timing, provenance)
    train.parquet  curves.parquet  bias.parquet  lags.parquet  alignment.parquet  perf.parquet
    parts/<key>/<table>.parquet   cells finished since the last compaction
    backup-v1/             the files of a schema-version-1 store, kept when it was converted
    .lock                  held (fcntl.flock) by the one run that writes here

Protocol (a single writer, enforced by the lock):

1. before anything is written, every table, part file and the manifest are read completely
   (:func:`check_store`); a damaged store is a UsageError naming the file, and nothing is modified.
   Readers (``run --list``, ``report``, :func:`read_results`) make the same check, so every command
   accepts and refuses the same stores with the same message;
2. a finished cell is written to ``parts/.tmp-<key>-…/`` (each file fsynced), then renamed to
   ``parts/<key>/``: a cell is either wholly committed or absent;
3. compaction merges the parts into the main tables: for every table, rows of the committed keys are
   dropped from the old table and the parts' rows appended; each table is replaced atomically
   (write a temporary file, fsync, ``os.replace``); only then are the parts renamed away and deleted.
   Compaction is idempotent, so a kill at any moment leaves a state that the next run's compaction
   turns into every cell exactly once.

A store of schema version 1 (one ``results`` table with a ``measure`` column) is converted when read,
and converted on disk by the first run that writes it (its files are kept in ``backup-v1/``).
Readers (:func:`read_results`) need no lock: they read parts first, then the main table, and keep
each key once; a read-only store can be read (and ``run`` over one that needs nothing done ends without
taking the lock). No space left, out of memory or permission refused while a file is written or read is
a ResourceError naming the file (docs/reliability.md).
"""

from __future__ import annotations

import errno
import fcntl
import json
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

from tbptt_bench.errors import ResourceError, UsageError, touching
from tbptt_bench.suites.schema import (CELLS, MEASURE_TABLES, SCHEMA_META, SCHEMA_VERSION, SIDE_TABLES, convert_v1,
                                       to_arrow, to_frame, v1_frame)

log = logging.getLogger(__name__)

MAIN_TABLE = CELLS
MANIFEST = "manifest.json"
BACKUP_V1 = "backup-v1"
V1_TABLES = ("results", "curves", "lags")
LOCK_NAME = ".lock"
PARTS = "parts"
_TABLE_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_KEY = re.compile(r"^[0-9a-f]{16}$")
_MOVE_ASIDE = "move it aside (or restore it from a copy) or pass another --results directory"

__all__ = ["SCHEMA_VERSION", "ResultStore", "check_store", "read_results", "read_tables", "settled",
           "table_names", "store_dir", "to_arrow"]


# --------------------------------------------------------------------------- arrow helpers

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


def _one_line(exc: BaseException) -> str:
    """An exception as ``Type: message`` on one line (the Parquet reader's messages carry newlines)."""
    return " ".join(f"{type(exc).__name__}: {exc}".split())


def _read_or_refuse(path: Path, what: str) -> pa.Table:
    """A store file read completely, or a UsageError naming it (pyarrow raises several types for damage);
    no memory or no permission to read it is a ResourceError."""
    try:
        with touching(path, "read"):
            return pq.read_table(path)
    except (FileNotFoundError, ResourceError):
        raise
    except Exception as exc:
        raise UsageError(f"results file {path} {what} ({_one_line(exc)}); it was left untouched"
                         f"{', as was every other file' if 'damaged' in what else ''}: {_MOVE_ASIDE}") from None


def _file_version(path: Path) -> str:
    """The schema version in a Parquet file's metadata (the file is read completely first)."""
    table = _read_or_refuse(path, "is damaged and cannot be read")
    return (table.schema.metadata or {}).get(SCHEMA_META, b"?").decode(errors="replace")


def read_checked(path: Path, version: int = SCHEMA_VERSION) -> pa.Table:
    """Read a store file, or raise a UsageError naming it (unreadable, another schema version, no key)."""
    table = _read_or_refuse(path, "cannot be read")
    found = (table.schema.metadata or {}).get(SCHEMA_META, b"?").decode(errors="replace")
    if found != str(version):
        raise UsageError(f"results file {path} has schema version {found}; this tbptt-bench reads and writes "
                         f"version {SCHEMA_VERSION} (and converts version 1): {_MOVE_ASIDE}")
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


def _replace_atomic(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with touching(path):
        try:
            write(tmp)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)


def write_atomic(table: pa.Table, path: Path) -> None:
    """Replace ``path`` with ``table`` so that a reader sees the old or the new file, never a part."""
    _replace_atomic(path, lambda tmp: _write_file(table, tmp))


def _write_manifest(root: Path, tables: set[str]) -> None:
    manifest = {"format": "tbptt-bench result store", "schema_version": SCHEMA_VERSION, "tables": sorted(tables)}

    def write(tmp: Path) -> None:
        with open(tmp, "w") as fh:
            json.dump(manifest, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
    _replace_atomic(root / MANIFEST, write)


# --------------------------------------------------------------------------- layout and checks

def _main_files(root: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted(root.glob("*.parquet")) if _TABLE_NAME.match(p.stem)}


def _part_dirs(root: Path) -> list[Path]:
    parts = root / PARTS
    if not parts.is_dir():
        return []
    return sorted(p for p in parts.iterdir() if _KEY.match(p.name) and p.is_dir())


def read_manifest(root: Path) -> dict[str, Any] | None:
    """The store's manifest, None when it has none; a damaged one is a UsageError naming it."""
    path = root / MANIFEST
    try:
        with touching(path, "read"):
            manifest = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise UsageError(f"store manifest {path} is damaged ({_one_line(exc)}); it was left untouched: "
                         f"{_MOVE_ASIDE}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("tables"), list):
        raise UsageError(f"store manifest {path} has no table list; it was left untouched: {_MOVE_ASIDE}")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise UsageError(f"store {root} has schema version {manifest.get('schema_version')} ({path}); this "
                         f"tbptt-bench reads and writes version {SCHEMA_VERSION}: {_MOVE_ASIDE}")
    return manifest


def _layout(root: Path) -> tuple[int, Path]:
    """(schema version, directory holding its files): 2 with a manifest, 1 for an old store, 0 for none."""
    if read_manifest(root) is not None:
        return SCHEMA_VERSION, root
    if (root / BACKUP_V1).is_dir():  # a conversion was interrupted: its source is the backup
        return 1, root / BACKUP_V1
    files = list(_main_files(root).values()) + [f for p in _part_dirs(root) for f in sorted(p.glob("*.parquet"))]
    versions = {f: _file_version(f) for f in files}
    if not versions:
        return 0, root
    foreign = {f: v for f, v in versions.items() if v != "1"}
    if not foreign:
        return 1, root
    path, version = next(iter(foreign.items()))
    if version == str(SCHEMA_VERSION):
        raise UsageError(f"store {root} has tables of schema version {version} but no {MANIFEST}; it was left "
                         f"untouched: restore the manifest from a copy, {_MOVE_ASIDE}")
    raise UsageError(f"results file {path} has schema version {version}; this tbptt-bench reads and writes version "
                     f"{SCHEMA_VERSION} (and converts version 1): {_MOVE_ASIDE}")


def check_store(root: str | os.PathLike[str]) -> int:
    """Read every file of a store completely, changing nothing; its schema version (0: no store yet).

    The one check of a store, made by every command that reads or writes one (``run``, ``run --list``,
    ``report``, :func:`read_results`). Raises a UsageError naming the first damaged file: a table or part
    that cannot be read, has another schema version or no ``key`` column, a table the manifest does not
    list, a listed table that is nowhere, or a damaged manifest. Safe while a run writes the store: the
    files are listed in the order in which a writer's compaction makes them appear and vanish.
    """
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise UsageError(f"results directory {root} is a file; pass a store directory such as results/quick")
    before = _main_files(root)  # a table file appears only after the manifest lists it
    version, source = _layout(root)
    if version == SCHEMA_VERSION:
        listed = set(read_manifest(root)["tables"])  # type: ignore[index]
        for name, path in before.items():
            if name not in listed:
                raise UsageError(f"results file {path} is not listed in {root / MANIFEST}; the store is "
                                 f"inconsistent and was left untouched: {_MOVE_ASIDE}")
        in_parts = {f.stem for p in _part_dirs(root) for f in p.glob("*.parquet")}  # parts vanish only
        absent = sorted(listed - in_parts - set(_main_files(root)))               # after the tables are written
        if absent:
            raise UsageError(f"store manifest {root / MANIFEST} lists the table {absent[0]!r} but the store holds "
                             f"no {absent[0]}.parquet; the store is inconsistent and was left untouched: "
                             f"{_MOVE_ASIDE}")
    files = [f for f in _main_files(source).values() if version == SCHEMA_VERSION or f.stem in V1_TABLES]
    files += [f for p in _part_dirs(source) for f in sorted(p.glob("*.parquet"))]
    for path in files:
        try:
            read_checked(path, version or SCHEMA_VERSION)
        except FileNotFoundError:  # a part compacted and removed by a run writing the store meanwhile
            continue
    return version


# --------------------------------------------------------------------------- reading

def _read_parts(root: Path, table: str, version: int) -> tuple[list[pa.Table], set[str]]:
    """The part files of ``table`` and the keys of every committed part (parts that vanish are skipped)."""
    out, keys = [], set()
    for part in _part_dirs(root):
        file = part / f"{table}.parquet"
        try:
            if file.exists():
                out.append(read_checked(file, version))
            elif not part.is_dir():
                continue
        except FileNotFoundError:
            continue
        keys.add(part.name)
    return out, keys


def _read_table(root: Path, table: str, version: int) -> pa.Table | None:
    """One table of a store directory in its own schema version (parts included, each key once)."""
    parts, keys = _read_parts(root, table, version)
    pieces = []
    try:
        main = read_checked(root / f"{table}.parquet", version)
        if keys:
            main = main.filter(pc.invert(pc.is_in(main["key"], value_set=pa.array(sorted(keys)))))
        pieces.append(main)
    except FileNotFoundError:
        pass
    pieces.extend(parts)
    if not pieces:
        return None
    return concat(pieces) if version == SCHEMA_VERSION else pa.concat_tables(
        [p.replace_schema_metadata(None) for p in pieces], promote_options="permissive")


def _read_v1(source: Path) -> dict[str, pa.Table]:
    """A schema-version-1 store converted to version-2 tables (in memory)."""
    frames = {}
    for name in V1_TABLES:
        table = _read_table(source, name, 1)
        frames[name] = pd.DataFrame() if table is None else v1_frame(table)
    return convert_v1(frames["results"], frames["curves"], frames["lags"])


def read_arrow(root: str | os.PathLike[str], table: str = MAIN_TABLE) -> pa.Table | None:
    """One table of a store (committed parts included, each key once), or None if it has none."""
    root = Path(root)
    version, source = _layout(root)
    if version == 1:
        return _read_v1(source).get(table)
    return _read_table(root, table, SCHEMA_VERSION)


#: Every table a store written by this version can hold (an absent one reads as empty).
KNOWN_TABLES = frozenset({CELLS, *MEASURE_TABLES.values(), *SIDE_TABLES})


def _check_args(root: Path, table: str | None = None) -> None:
    """UsageError unless ``root`` is a store directory that passes :func:`check_store` and ``table`` a table name."""
    if table is not None and not _TABLE_NAME.match(table):
        raise UsageError(f"bad table name {table!r}; expected lower-case letters, digits and _")
    if not root.is_dir():
        raise UsageError(f"results directory {root} does not exist")
    check_store(root)


def _frame(root: Path, table: str) -> pd.DataFrame:
    arrow = read_arrow(root, table)
    return pd.DataFrame() if arrow is None else to_frame(arrow)


def read_results(root: str | os.PathLike[str], table: str = MAIN_TABLE) -> pd.DataFrame:
    """A store's table as a DataFrame (``cells``, ``train``, ``curves``, ``bias``, ``lags``, ``alignment``, ``perf``, …).

    A table this kind of store can hold but this one does not (no cell measured it) reads as an empty frame;
    any other name is a UsageError listing the tables there are. Needs no lock: safe while a run writes, and
    then a snapshot of the cells committed so far. A store of schema version 1 is converted on the fly. The
    store is checked first (:func:`check_store`).
    """
    root = Path(root)
    _check_args(root, table)
    if table not in KNOWN_TABLES and table not in (present := table_names(root)):
        raise UsageError(f"{root} has no table {table!r}; its tables: {', '.join(present) or 'none'} "
                         f"(a store can hold {', '.join(sorted(KNOWN_TABLES))})")
    return _frame(root, table)


def read_tables(root: str | os.PathLike[str]) -> dict[str, pd.DataFrame]:
    """Every table of a store, by name (an old store converted once, not once per table; checked once)."""
    root = Path(root)
    _check_args(root)
    version, source = _layout(root)
    if version == 1:
        return {name: to_frame(t) for name, t in sorted(_read_v1(source).items())}
    return {name: _frame(root, name) for name in table_names(root)}


def table_names(root: str | os.PathLike[str]) -> list[str]:
    """Names of the tables a store holds (main files and parts)."""
    root = Path(root)
    version, source = _layout(root)
    if version == 1:
        return sorted(_read_v1(source))
    names = set(_main_files(root))
    for part in _part_dirs(root):
        names.update(p.stem for p in part.glob("*.parquet"))
    return sorted(names)


def settled(root: str | os.PathLike[str]) -> bool:
    """Whether a store needs nothing written before it is read as it is: no store at all, or one of this
    schema version without committed parts waiting for compaction (so ``run`` with nothing to measure
    leaves it alone, read-only or not)."""
    root = Path(root)
    return not root.exists() or (_layout(root)[0] != 1 and not _part_dirs(root))


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
            with touching(self.root):
                self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"cannot create results directory {self.root}: {exc.strerror}") from None
        lock_path = self.root / LOCK_NAME
        with touching(lock_path):
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = lock_path.read_text(errors="replace").strip() or "unknown process"
            raise UsageError(f"results directory {self.root} is in use by another tbptt-bench run ({holder}); "
                             "wait for it to finish or pass another --results directory") from None
        self._lock_fd = fd
        try:
            version = check_store(self.root)  # read-only: a damaged store is reported with nothing modified
            with touching(lock_path):
                os.ftruncate(fd, 0)
                os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                         f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
            self._clean_temporaries()
            if version == 1:
                self._migrate()
            elif version == 0:
                _write_manifest(self.root, set())
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
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
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

    def _migrate(self) -> None:
        """Convert a schema-version-1 store on disk; its files are kept in ``backup-v1/``.

        Safe to interrupt: the backup is complete before anything is replaced, a store without a
        manifest but with a backup is read from the backup, and the manifest is written last.
        """
        backup = self.root / BACKUP_V1
        if not backup.is_dir():
            with touching(backup):
                self._back_up_v1(backup)
        tables = _read_v1(backup)
        for name, table in tables.items():
            write_atomic(table, self.root / f"{name}.parquet")
        (self.root / "results.parquet").unlink(missing_ok=True)
        for part in _part_dirs(self.root):
            self._discard(part)
        _write_manifest(self.root, set(tables))
        log.warning("converted the schema-version-1 store %s to version %d; its old files are in %s",
                    self.root, SCHEMA_VERSION, backup)

    def _back_up_v1(self, backup: Path) -> None:
        """Copy a version-1 store's files into ``backup`` (complete and fsynced before it gets its name)."""
        tmp = self.root / f".{BACKUP_V1}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            for name in V1_TABLES:
                if (self.root / f"{name}.parquet").exists():
                    shutil.copy2(self.root / f"{name}.parquet", tmp / f"{name}.parquet")
            if _part_dirs(self.root):
                shutil.copytree(self.root / PARTS, tmp / PARTS)
            for path in [tmp, *tmp.rglob("*")]:
                if path.is_file():
                    with open(path, "rb") as fh:
                        os.fsync(fh.fileno())
                else:
                    _fsync_dir(path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        os.rename(tmp, backup)
        _fsync_dir(self.root)

    # ---- writing
    def commit(self, key: str, tables: dict[str, list[dict[str, Any]]]) -> None:
        """Commit one finished cell's rows atomically (all tables or none)."""
        self._require_lock()
        if not _KEY.match(key):
            raise ValueError(f"bad cell key {key!r}")
        if len(tables.get(MAIN_TABLE) or ()) != 1:
            raise ValueError(f"cell {key} must have exactly one row in the {MAIN_TABLE!r} table")
        for name in tables:
            if not _TABLE_NAME.match(name):
                raise ValueError(f"bad table name {name!r}")
        parts = self.root / PARTS
        final = parts / key
        with touching(final):
            parts.mkdir(exist_ok=True)
            tmp = parts / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
            tmp.mkdir()
            try:
                for name, rows in tables.items():
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
        listed = set(read_manifest(self.root)["tables"])  # type: ignore[index]
        if not names <= listed:
            _write_manifest(self.root, listed | names)  # listed before its file exists, never after
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

