"""Suite files: a declarative grid of measurements, expanded into cells with stable keys and seeds.

A suite is a TOML file (format in docs/suites.md)::

    [suite]
    name = "quick"
    seed = 0

    [defaults]            # applied to every block whose measurement accepts the key
    device = "cpu"

    [[train]]             # one block per grid; [[bias]] and [[perf]] blocks work the same way
    task = ["copy", "adding"]        # a list is a grid axis
    method = ["full", "chunked:k=4"]
    steps = 20                       # a scalar is fixed
    replicates = 2

Each block expands to the Cartesian product of its axes times its replicates. Every cell gets

* a **key**: the first 16 hex digits of the SHA-256 of the measurement kind, its semantics version,
  the package version and the fully resolved parameters (defaults filled in, method specs
  canonicalised, the seed included, None values left out); not the git commit, so a docs-only commit
  keeps results valid;
* a **seed** (:func:`cell_seed`): derived from the suite seed, the replicate index and the cell's
  pairing parameters (task, task parameters, model, sizes), so that cells differing only in the
  method (or optimiser, steps, measurement) share initial parameters and data: they are paired.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import itertools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

try:
    import tomllib
except ImportError:  # Python 3.10: the same parser, as a package
    import tomli as tomllib

import tbptt_bench
from tbptt_bench.suites.jobs import MEASURES, NO_DEFAULT, SEED_KEYS, GridPoint, Measure
from tbptt_bench.errors import UsageError
from tbptt_bench.methods.base import parse_method
from tbptt_bench.seeding import derive_seed
from tbptt_bench.core.build import resolve_device, resolve_dtype
from tbptt_bench.methods.length import warn_long_windows
from tbptt_bench.validation import is_allocation_failure

log = logging.getLogger(__name__)

TOP_KEYS = ("suite", "defaults", *MEASURES)
SUITE_KEYS = ("name", "description", "seed")
BLOCK_EXTRA = ("replicates", "task_params", "model_params", "time_limit")
#: Tables keyed by the name they apply to: task_params by task, model_params by model.
KEYED_TABLES = {"task_params": "task", "model_params": "model"}


@dataclass(frozen=True)
class Suite:
    """A parsed suite: its name, seed, source file and the cells of its grid in run order."""

    name: str
    description: str
    seed: int
    source: str
    cells: tuple[GridPoint, ...]


# --------------------------------------------------------------------------- finding suite files

def builtin_dir() -> Path:
    """Where the built-in suites live: package data when installed, ``tasks/`` in a source checkout."""
    packaged = Path(str(importlib.resources.files("tbptt_bench").joinpath("data", "suites")))
    if packaged.is_dir() and any(packaged.glob("*.toml")):
        return packaged
    return Path(tbptt_bench.__file__).resolve().parent.parent / "tasks"


def builtin_suites() -> dict[str, Path]:
    """Built-in suite names and their files."""
    folder = builtin_dir()
    return {p.stem: p for p in sorted(folder.glob("*.toml"))} if folder.is_dir() else {}


def find_suite(ref: str) -> Path:
    """A suite file from a built-in name (``quick``) or a path."""
    path = Path(ref).expanduser()
    if path.is_file():
        return path
    builtins = builtin_suites()
    if ref in builtins:
        return builtins[ref]
    if path.suffix == ".toml" or "/" in ref:
        raise UsageError(f"suite file {ref} does not exist")
    raise UsageError(f"unknown suite {ref!r}; accepted: a built-in name ({', '.join(builtins) or 'none found'}) "
                     "or the path of a .toml suite file")


def load_suite(ref: str) -> Suite:
    """Read, validate and expand a suite given by name or path."""
    path = find_suite(ref)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"suite file {path} is not valid TOML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read suite file {path}: {exc}") from None
    return parse_suite(data, default_name=path.stem, source=str(path))


# --------------------------------------------------------------------------- parsing and expansion

def parse_suite(data: Mapping[str, Any], *, default_name: str = "suite", source: str = "<suite>") -> Suite:
    """Validate a suite's TOML data and expand its blocks into cells (duplicates removed)."""
    _no_unknown(data, TOP_KEYS, f"suite file {source}")
    header = data.get("suite", {})
    if not isinstance(header, dict):
        raise UsageError(f"suite file {source}: [suite] must be a table with keys {', '.join(SUITE_KEYS)}")
    _no_unknown(header, SUITE_KEYS, f"suite file {source}, [suite]")
    name = header.get("name", default_name)
    if not isinstance(name, str) or not name or not all(c.isalnum() or c in "-_." for c in name) or name[0] == ".":
        raise UsageError(f"suite file {source}: name {name!r} must be a non-empty string of letters, digits, - _ .")
    seed = header.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise UsageError(f"suite file {source}: seed must be an integer ≥ 0, got {seed!r}")
    description = header.get("description", "")
    defaults = data.get("defaults", {})
    if not isinstance(defaults, dict):
        raise UsageError(f"suite file {source}: [defaults] must be a table")

    blocks: list[tuple[str, int, dict[str, Any]]] = []
    for measure_name in MEASURES:
        raw = data.get(measure_name, [])
        if isinstance(raw, dict):
            raw = [raw]
        if not isinstance(raw, list) or not all(isinstance(b, dict) for b in raw):
            raise UsageError(f"suite file {source}: {measure_name} must be written as [[{measure_name}]] tables")
        blocks.extend((measure_name, i + 1, b) for i, b in enumerate(raw))
    if not blocks:
        raise UsageError(f"suite file {source} defines no cells; add a [[train]], [[bias]], [[context]] or [[perf]] block")

    schemas: dict[str, dict[str, tuple[Any, Any]]] = {}
    for measure_name, _, _ in blocks:
        if measure_name not in schemas:
            measure = MEASURES[measure_name]
            reason = measure.available()
            if reason:
                raise UsageError(f"suite file {source}: {reason}; remove its [[{measure_name}]] blocks")
            schemas[measure_name] = measure.schema()
    accepted_defaults = set(BLOCK_EXTRA).union(*(s.keys() for s in schemas.values()))
    _no_unknown(defaults, sorted(accepted_defaults), f"suite file {source}, [defaults]")

    cells: list[GridPoint] = []
    seen: set[str] = set()
    for measure_name, index, block in blocks:
        where = f"suite file {source}, [[{measure_name}]] block {index}"
        schema = schemas[measure_name]
        merged = {k: v for k, v in defaults.items() if (k in schema or k in BLOCK_EXTRA) and k not in KEYED_TABLES}
        merged.update(block)
        for table, by in KEYED_TABLES.items():
            shared = defaults.get(table)
            if isinstance(shared, dict) and table not in block:  # only for the tasks (models) this block runs
                names = set(map(str, _as_list(merged.get(by))))
                merged[table] = {t: v for t, v in shared.items() if t in names}
            elif shared is not None and not isinstance(shared, dict):
                merged[table] = shared
        for cell in expand_block(MEASURES[measure_name], schema, merged, suite=name, suite_seed=seed, where=where):
            if cell.key in seen:
                log.info("%s: cell %s (%s) is also in an earlier block; kept once", where, cell.key, cell.label)
                continue
            seen.add(cell.key)
            cells.append(cell)
    return Suite(name, str(description), seed, source, tuple(cells))


def expand_block(measure: Measure, schema: Mapping[str, tuple[Any, Any]], block: Mapping[str, Any], *,
                 suite: str, suite_seed: int, where: str) -> list[GridPoint]:
    """The cells of one block: the product of its list-valued keys (axes) times its replicates."""
    accepted = sorted(set(schema) | set(BLOCK_EXTRA))
    _no_unknown(block, accepted, where)
    replicates = block.get("replicates", 1)
    if not isinstance(replicates, int) or isinstance(replicates, bool) or replicates < 1:
        raise UsageError(f"{where}: replicates must be an integer ≥ 1, got {replicates!r}")
    time_limit = _time_limit(block.get("time_limit"), where)
    task_params = block.get("task_params", {})
    if not isinstance(task_params, dict) or not all(isinstance(v, dict) for v in task_params.values()):
        raise UsageError(f"{where}: task_params must be a table of tables keyed by task, "
                         "e.g. task_params = {{ copy = {{ n_remember = 5 }} }}")
    model_params = block.get("model_params", {})
    if not isinstance(model_params, dict) or not all(isinstance(v, dict) for v in model_params.values()):
        raise UsageError(f"{where}: model_params must be a table of tables keyed by model, "
                         "e.g. model_params = {{ sab = {{ mem = 16 }} }}")

    fixed: dict[str, Any] = {}
    axes: dict[str, list[Any]] = {}
    for name, value in block.items():
        if name in BLOCK_EXTRA:
            continue
        is_axis = isinstance(value, list) and (
            name not in measure.list_keys or (bool(value) and all(isinstance(v, list) for v in value)))
        if is_axis:
            if not value:
                raise UsageError(f"{where}: {name} = [] makes the grid empty; give at least one value")
            axes[name] = value
        else:
            if name in measure.list_keys and isinstance(value, list) and not value:
                raise UsageError(f"{where}: {name} = [] makes the grid empty; give at least one value")
            fixed[name] = value
    missing = [n for n, (_, d) in schema.items() if d is NO_DEFAULT and n not in fixed and n not in axes]
    if missing:
        raise UsageError(f"{where}: missing {', '.join(missing)} (required by {measure.name} measurements)")
    if task_params and "task_params" not in schema:
        raise UsageError(f"{where}: {measure.name} measurements take no task_params")
    if model_params and "model_params" not in schema:
        raise UsageError(f"{where}: {measure.name} measurements take no model_params")
    for table, by in KEYED_TABLES.items():
        named = set(map(str, _as_list(axes.get(by, fixed.get(by)))))
        for key in block.get(table, {}):
            if key not in named:
                raise UsageError(f"{where}: {table} names {by} {key!r}, which the block does not run "
                                 f"(its {by}s: {', '.join(sorted(named)) or 'none'})")

    cells = []
    names = list(axes)
    checked: set[str] = set()
    for replicate in range(replicates):
        for combo in itertools.product(*(axes[n] for n in names)):
            raw = {**fixed, **dict(zip(names, combo))}
            params = resolve_params(measure, schema, raw, where)
            if "task_params" in schema:
                params["task_params"] = dict(task_params.get(params.get("task"), {}))
            if model_params.get(params.get("model")):  # only when set: keys of earlier stores stay valid
                params["model_params"] = dict(model_params[params["model"]])
            params["seed"] = cell_seed(suite_seed, replicate, params)
            text = canonical_json(params)
            if text not in checked:
                checked.add(text)
                _check(measure, params, where)
            cells.append(GridPoint(suite, measure.name, params, cell_key(measure, params), replicate, time_limit))
    return cells


def _time_limit(value: Any, where: str) -> float | None:
    """A block's ``time_limit``: seconds > 0, or ``"none"`` / absent for no limit."""
    if value is None or value == "none":
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise UsageError(f"{where}: time_limit = {value!r} must be a number of seconds > 0 or \"none\"")
    return float(value)


def resolve_params(measure: Measure, schema: Mapping[str, tuple[Any, Any]], raw: Mapping[str, Any],
                   where: str) -> dict[str, Any]:
    """Defaults filled in, values checked against their types and their declared bounds and accepted values
    (:mod:`tbptt_bench.options`), method specs canonicalised."""
    options = measure.options()
    out: dict[str, Any] = {}
    for name, (_, default) in schema.items():
        if name in KEYED_TABLES:
            continue
        value = raw.get(name, default)
        if value is NO_DEFAULT:
            raise UsageError(f"{where}: missing {name}")
        if name in raw:
            value = options[name].read(value, where)
        if name == "method" and isinstance(value, str):
            value = _canonical_method(value, where)
        if name == "methods" and isinstance(value, list):
            value = [_canonical_method(v, where) for v in value]
        out[name] = value
    return out


def _canonical_method(spec: str, where: str) -> str:
    try:
        return parse_method(spec).spec
    except UsageError as exc:
        raise UsageError(f"{where}: {exc}") from None


def _check(measure: Measure, params: dict[str, Any], where: str) -> None:
    try:
        check_values(params)
        measure.check(dict(params))
    except UsageError as exc:
        raise UsageError(f"{where}: {exc}") from None
    except (MemoryError, RuntimeError) as exc:  # the check itself could not allocate: the cell will say oom
        if not is_allocation_failure(exc):
            raise
        log.info("%s: checking a cell needed more memory than is free here; it runs (and is recorded as oom "
                 "where it does not fit)", where)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{where}: invalid parameters: {exc}") from None


def check_values(params: Mapping[str, Any]) -> None:
    """What every measurement shares, checked as the suite is read (docs/reliability.md): the dtype and
    truncation lengths against seq_len (docs/design.md §2.10). Memory is not checked here: a cell runs
    where the executor puts it (a Ray node may have more), and one that does not fit is recorded as oom."""
    if "dtype" in params:
        resolve_dtype(params["dtype"])
    if isinstance(params.get("seq_len"), int) and params["seq_len"] >= 1:
        specs = [params["method"]] if isinstance(params.get("method"), str) else params.get("methods") or []
        warn_long_windows(specs, params["seq_len"])


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def _no_unknown(table: Mapping[str, Any], accepted: Any, where: str) -> None:
    accepted = list(accepted)
    for name in table:
        if name not in accepted:
            raise UsageError(f"{where}: unknown key {name!r}; accepted: {', '.join(accepted)}")


# --------------------------------------------------------------------------- keys and seeds

def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no spaces: the same parameters always give the same text."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def cell_key(measure: Measure, params: Mapping[str, Any]) -> str:
    """Stable key: hash of the measure, its semantics version, the package version and the parameters.

    Parameters whose value is None (an optional feature left off) are left out, so that adding an
    optional parameter to a measurement does not change the keys of results stored before.
    """
    payload = {"measure": measure.name, "semantics": measure.version, "package": tbptt_bench.__version__,
               "params": {k: v for k, v in params.items() if v is not None}}
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()[:16]


def cell_seed(suite_seed: int, replicate: int, params: Mapping[str, Any]) -> int:
    """The seed rule: ``derive_seed("cell", suite seed, replicate, pairing parameters)``.

    The pairing parameters are :data:`tbptt_bench.suites.jobs.SEED_KEYS` that the cell has, as
    ``(name, canonical JSON value)`` pairs in that order.
    """
    pairing = [(k, canonical_json(params[k])) for k in SEED_KEYS if k in params]
    return derive_seed("cell", suite_seed, replicate, pairing)


# --------------------------------------------------------------------------- selecting cells

def select(cells: tuple[GridPoint, ...] | list[GridPoint], only: list[str] | None) -> list[GridPoint]:
    """The cells whose key equals, or uniquely starts with, one of ``only`` (all cells if empty)."""
    if not only:
        return list(cells)
    chosen: dict[str, GridPoint] = {}
    for ref in only:
        matches = [c for c in cells if c.key == ref] or [c for c in cells if c.key.startswith(ref)]
        if not matches:
            raise UsageError(f"--only {ref}: no cell of the suite has that key; list the keys with --list")
        if len(matches) > 1:
            raise UsageError(f"--only {ref}: the prefix matches {len(matches)} cells; give more digits of the key")
        chosen[matches[0].key] = matches[0]
    return [c for c in cells if c.key in chosen]


def check_devices(cells: list[GridPoint]) -> None:
    """Every device the cells name is available on this machine (used by the local executor)."""
    for device in sorted({c.device for c in cells}):
        resolve_device(device)
