"""The fresh-process protocol: each configuration measured in a new Python process (docs/perf.md).

The parent writes the configuration as JSON into a temporary folder ``tbptt-perf-<parent pid>-*``,
starts an isolated interpreter (``python -I``: no PYTHONPATH, no user site, not the current folder)
that imports the package from exactly the folder the parent imported it from (:func:`child_command`),
and reads the row the child wrote; a child that dies is classified by how it died. Folders left by
killed parents are removed by the next run (:func:`remove_stale_temp_dirs`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd

from tbptt_bench.core.build import resolve_device
from tbptt_bench.errors import UsageError
from tbptt_bench.perf.config import PerfConfig
from tbptt_bench.perf.harness import busy_message, empty_row, measure, refuse_if_busy
from tbptt_bench.perf.memory import limit_address_space
from tbptt_bench.perf.tables import to_frame, write_json_atomic

log = logging.getLogger(__name__)


TEMP_PREFIX = "tbptt-perf-"
_TEMP_NAME = re.compile(r"^tbptt-perf-(\d+)-")
#: Run by ``python -I -c``: put the parent's package folder first on sys.path, then run :func:`main`.
_BOOTSTRAP = "import sys; sys.path.insert(0, sys.argv[1]); from tbptt_bench.perf.child import main; sys.exit(main(sys.argv[2:]))"
#: Modules whose files the child checks against the parent's: the package and what it measures with.
CHECKED_MODULES = ("tbptt_bench", "torch", "numpy")


def _module_file(name: str) -> str:
    return str(Path(sys.modules[name].__file__ or "").resolve()) if name in sys.modules else ""


def child_command(cfg_path: Path, out_path: Path) -> list[str]:
    """The command that measures ``cfg_path`` in an isolated interpreter running the parent's code.

    ``-I`` ignores PYTHON* variables and the user site and leaves the current folder off sys.path;
    the bootstrap inserts the folder holding the parent's ``tbptt_bench`` first, and the child checks
    that the package, torch and numpy it imported are the parent's files (:data:`CHECKED_MODULES`).
    """
    import tbptt_bench

    root = Path(tbptt_bench.__file__).resolve().parent.parent
    expect = [f"{name}={_module_file(name)}" for name in CHECKED_MODULES]
    return [sys.executable, "-I", "-c", _BOOTSTRAP, str(root), "--child", str(cfg_path), str(out_path),
            *(arg for e in expect for arg in ("--expect", e))]


def _child_env(cfg: PerfConfig) -> dict[str, str]:
    """The child's environment: the parent's, plugin folders named, thread counts set."""
    from tbptt_bench import registry

    env = dict(os.environ)
    plugin_dirs = [p for p in env.get(registry.PLUGIN_ENV, "").split(os.pathsep) if p]
    plugin_dirs += [str(p) for p in sorted(registry._loaded_dirs)]
    if plugin_dirs:
        env[registry.PLUGIN_ENV] = os.pathsep.join(dict.fromkeys(plugin_dirs))
    threads = str(cfg.resolved_threads())
    env["OMP_NUM_THREADS"] = threads
    env["MKL_NUM_THREADS"] = threads
    return env


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def remove_stale_temp_dirs(root: Path | None = None) -> list[Path]:
    """Remove ``tbptt-perf-<pid>-*`` folders in ``root`` (the temp folder) whose pid is not alive.

    Only folders of this user named with a pid, and only when that process no longer exists (a live
    run's folders, and any folder whose pid was reused, stay); POSIX only. Returns what was removed.
    """
    if os.name != "posix":
        return []
    root = Path(tempfile.gettempdir()) if root is None else root
    removed = []
    for path in root.glob(TEMP_PREFIX + "*"):
        match = _TEMP_NAME.match(path.name)
        if match is None or path.is_symlink() or not path.is_dir():
            continue
        pid = int(match.group(1))
        if pid <= 0 or _pid_alive(pid) or path.stat().st_uid != os.getuid():
            continue
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            removed.append(path)
            log.info("removed %s, left by process %d, which no longer runs", path, pid)
    return removed


def measure_in_fresh_process(cfg: PerfConfig, timeout: float | None = None) -> dict[str, Any]:
    """Measure one configuration in a new Python process (so memory and caches start clean).

    The child runs :func:`measure` and writes its row to a file; a child that times out gives status
    ``timeout``, one killed by SIGKILL (the out-of-memory killer's signal) ``oom``, any other death
    ``failed`` with the end of its stderr.
    """
    cfg.validate()
    device = resolve_device(cfg.device)
    remove_stale_temp_dirs()
    with tempfile.TemporaryDirectory(prefix=f"{TEMP_PREFIX}{os.getpid()}-") as tmp:
        cfg_path, out_path = Path(tmp) / "config.json", Path(tmp) / "row.json"
        cfg_path.write_text(json.dumps(dataclasses.asdict(cfg)))
        cmd = child_command(cfg_path, out_path)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_child_env(cfg))
        except subprocess.TimeoutExpired:
            row = empty_row(cfg, device)
            row.update(status="timeout", error=f"no result after {timeout} s", pid=None, fresh_process=True)
            return row
        if out_path.exists():
            row = json.loads(out_path.read_text())
            row["fresh_process"] = True
            return row
    row = empty_row(cfg, device)
    row.update(fresh_process=True, pid=None)
    if proc.returncode == -signal.SIGKILL:
        row.update(status="oom", error="killed by SIGKILL (most likely the kernel's out-of-memory killer)")
    else:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        row.update(status="failed", error=f"child exited with status {proc.returncode}: {tail}"[:500])
    return row


def _child_main(cfg_path: str, out_path: str) -> int:
    cfg = PerfConfig(**json.loads(Path(cfg_path).read_text()))
    device = resolve_device(cfg.device)
    limiter = limit_address_space(cfg.memory_limit) if cfg.memory_limit is not None and device.type != "cuda" else None
    row = measure(cfg, limit_memory=limiter, isolated=True)
    row["pid"] = os.getpid()
    write_json_atomic(Path(out_path), row)
    return 0


def perf_grid(
    configs: Sequence[PerfConfig],
    *,
    fresh: bool = True,
    timeout: float | None = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
    strict: bool = False,
) -> pd.DataFrame:
    """Measure every configuration (each in its own process unless ``fresh`` is False); one row each.

    All configurations are checked before the first runs; a failing or out-of-memory one is recorded
    and the grid goes on. A row measured on a busy machine is logged as a warning; with ``strict`` its
    status becomes ``busy`` (:func:`tbptt_bench.perf.harness.refuse_if_busy`).
    """
    for cfg in configs:
        cfg.validate()
    rows = []
    for cfg in configs:
        row = measure_in_fresh_process(cfg, timeout) if fresh else measure(cfg)
        if row.get("busy") is True:
            log.warning("perf %s %s T=%d: %s", cfg.model, row["method"], cfg.seq_len, busy_message(row))
        if strict:
            row = refuse_if_busy(row)
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return to_frame(rows)


def _check_origins(expected: list[str]) -> str | None:
    """None if every ``NAME=FILE`` names the file this process imported NAME from, else what differs."""
    for item in expected:
        name, _, path = item.partition("=")
        if name not in sys.modules:
            __import__(name)
        found = _module_file(name)
        if path and found != path:
            return (f"the measuring child imported {name} from {found}, the parent from {path}; "
                    f"install it where an isolated interpreter (python -I) finds the parent's copy")
    return None


def main(argv: list[str] | None = None) -> int:
    """Entry point of the measuring child (started by :func:`child_command`): ``--child CONFIG.json ROW.json``."""
    parser = argparse.ArgumentParser(prog="python -m tbptt_bench.perf.child")
    parser.add_argument("--child", nargs=2, metavar=("CONFIG", "ROW"), required=True)
    parser.add_argument("--expect", action="append", default=[], metavar="MODULE=FILE",
                        help="fail unless MODULE was imported from FILE (the parent's copy)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    mismatch = _check_origins(args.expect)
    if mismatch is not None:
        print(f"tbptt-bench perf: error: {mismatch}", file=sys.stderr)
        return 2
    try:
        return _child_main(*args.child)
    except UsageError as exc:
        print(f"tbptt-bench perf: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
