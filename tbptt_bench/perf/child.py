"""The fresh-process protocol: each configuration measured in a new Python process (docs/perf.md).

The parent writes the configuration as JSON, runs ``python -m tbptt_bench.perf.child --child CONFIG ROW``
and reads the row the child wrote; a child that dies is classified by how it died.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
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
from tbptt_bench.perf.harness import empty_row, measure
from tbptt_bench.perf.memory import limit_address_space
from tbptt_bench.perf.tables import to_frame, write_json_atomic

log = logging.getLogger(__name__)


def _child_env(cfg: PerfConfig) -> dict[str, str]:
    from tbptt_bench import registry

    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    plugin_dirs = [p for p in env.get(registry.PLUGIN_ENV, "").split(os.pathsep) if p]
    plugin_dirs += [str(p) for p in sorted(registry._loaded_dirs)]
    if plugin_dirs:
        env[registry.PLUGIN_ENV] = os.pathsep.join(dict.fromkeys(plugin_dirs))
    threads = str(cfg.resolved_threads())
    env["OMP_NUM_THREADS"] = threads
    env["MKL_NUM_THREADS"] = threads
    return env


def measure_in_fresh_process(cfg: PerfConfig, timeout: float | None = None) -> dict[str, Any]:
    """Measure one configuration in a new Python process (so memory and caches start clean).

    The child runs :func:`measure` and writes its row to a file; a child that times out gives status
    ``timeout``, one killed by SIGKILL (the out-of-memory killer's signal) ``oom``, any other death
    ``failed`` with the end of its stderr.
    """
    cfg.validate()
    device = resolve_device(cfg.device)
    with tempfile.TemporaryDirectory(prefix="tbptt-perf-") as tmp:
        cfg_path, out_path = Path(tmp) / "config.json", Path(tmp) / "row.json"
        cfg_path.write_text(json.dumps(dataclasses.asdict(cfg)))
        cmd = [sys.executable, "-m", "tbptt_bench.perf.child", "--child", str(cfg_path), str(out_path)]
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
) -> pd.DataFrame:
    """Measure every configuration (each in its own process unless ``fresh`` is False); one row each.

    All configurations are checked before the first runs; a failing or out-of-memory one is recorded
    and the grid goes on.
    """
    for cfg in configs:
        cfg.validate()
    rows = []
    for cfg in configs:
        row = measure_in_fresh_process(cfg, timeout) if fresh else measure(cfg)
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return to_frame(rows)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the measuring child: ``python -m tbptt_bench.perf.child --child CONFIG.json ROW.json``."""
    parser = argparse.ArgumentParser(prog="python -m tbptt_bench.perf.child")
    parser.add_argument("--child", nargs=2, metavar=("CONFIG", "ROW"), required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return _child_main(*args.child)
    except UsageError as exc:
        print(f"tbptt-bench perf: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
