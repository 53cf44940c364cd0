"""The local executor's warm workers: reused between cells, each cell started from a fresh process's state,
replaced after a crash, a time limit or an out-of-memory cell, and giving the fresh-process executor's numbers."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Iterator

import pandas as pd
import pytest

from tbptt_bench.registry import add_plugin_dirs
from tbptt_bench.suites.executors import LocalExecutor
from tbptt_bench.suites.jobs import JobResult
from tbptt_bench.suites.suite import load_suite

#: A task that writes what its process looked like when its cell began (pid, global RNG draws, default
#: dtype, threads, environment, working folder, autograd and precision switches), then changes all of it.
PROBE_PLUGIN = """
import json
import os
import random
import sys

import numpy as np
import torch

from tbptt_bench.tasks.adding import AddingTask
from tbptt_bench.tasks.base import register_task

LOG = os.path.join(os.path.dirname(__file__), "probe.jsonl")


def observe():
    state = {
        "pid": os.getpid(), "torch_draw": torch.rand(2).tolist(), "numpy_draw": np.random.rand(2).tolist(),
        "python_draw": random.random(), "dtype": str(torch.get_default_dtype()), "threads": torch.get_num_threads(),
        "leak_env": os.environ.get("TBPTT_PROBE_LEAK"), "cwd": os.getcwd(), "grad": torch.is_grad_enabled(),
        "deterministic": torch.are_deterministic_algorithms_enabled(), "anomaly": torch.is_anomaly_enabled(),
        "matmul": torch.get_float32_matmul_precision(), "leak_path": "/tbptt-probe-leak" in sys.path,
    }
    with open(LOG, "a") as fh:
        fh.write(json.dumps(state) + "\\n")


def spoil():
    torch.manual_seed(12345)
    np.random.seed(12345)
    random.seed(12345)
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(2)
    os.environ["TBPTT_PROBE_LEAK"] = "1"
    os.chdir(os.path.dirname(__file__))
    torch.use_deterministic_algorithms(True)
    torch.autograd.set_detect_anomaly(True)
    torch.set_float32_matmul_precision("medium")
    sys.path.append("/tbptt-probe-leak")


@register_task
class ProbeTask(AddingTask):
    name = "probe"

    def sample(self, batch_size, seq_len, generator, split="train"):
        batch = super().sample(batch_size, seq_len, generator, split)
        if batch_size > 1 and not getattr(self, "observed", False):
            self.observed = True
            observe()
            spoil()
        return batch
"""

CRASH_PLUGIN = """
import os
import signal
import time

from tbptt_bench.models import register_model
from tbptt_bench.tasks.adding import AddingTask
from tbptt_bench.tasks.base import register_task


@register_model("exits")
def exits(task, hidden_size, num_layers=1):
    os._exit(3)


@register_model("killed")
def killed(task, hidden_size, num_layers=1):
    os.kill(os.getpid(), signal.SIGKILL)


@register_task
class SleepTask(AddingTask):
    name = "sleeps"

    def sample(self, batch_size, seq_len, generator, split="train"):
        if batch_size > 1:
            with open(os.path.join(os.path.dirname(__file__), "sleeps.pids"), "a") as fh:
                fh.write(f"{os.getpid()}\\n")
            time.sleep(3600)
        return super().sample(batch_size, seq_len, generator, split)
"""

HEADER = """
[suite]
name = "{name}"
seed = 3
[defaults]
seq_len = 8
batch_size = 2
hidden_size = 4
steps = 3
eval_batches = 1
"""

PROBED = """
[[train]]
task = "probe"
model = "rnn"
method = "full"
replicates = {replicates}
"""


@pytest.fixture(scope="module")
def plugins(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The probe and crash plugins, loaded here too (a suite's cells are checked in the driver); their
    entries are unregistered afterwards, so that later test modules see the built-ins only."""
    from tbptt_bench.models import MODELS
    from tbptt_bench.tasks import TASKS

    folder = tmp_path_factory.mktemp("executor_plugins")
    (folder / "probe.py").write_text(textwrap.dedent(PROBE_PLUGIN))
    (folder / "crash.py").write_text(textwrap.dedent(CRASH_PLUGIN))
    before = {"tasks": set(TASKS._items), "models": set(MODELS._items)}
    add_plugin_dirs([folder])
    yield folder
    for name in set(TASKS._items) - before["tasks"]:
        TASKS._items.pop(name)
    for name in set(MODELS._items) - before["models"]:
        MODELS._items.pop(name)


def run_suite(tmp_path: Path, plugins: Path, body: str, **executor: Any) -> list[JobResult]:
    """Run a suite's cells through the local executor, in grid order (one job)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "suite.toml"
    path.write_text(textwrap.dedent(HEADER.format(name="executor") + body))
    cells = load_suite(str(path)).cells
    results = {r.key: r for r in LocalExecutor(plugin_dirs=[plugins], **executor).run(cells)}
    return [results[c.key] for c in cells]


def probes(plugins: Path) -> list[dict[str, Any]]:
    """What the probe task saw at the start of each cell since the last call (and clears the log)."""
    log = plugins / "probe.jsonl"
    if not log.exists():
        return []
    seen = [json.loads(line) for line in log.read_text().splitlines()]
    log.unlink()
    return seen


def test_warm_workers_are_reused_and_every_cell_starts_from_a_fresh_process_state(
        tmp_path: Path, plugins: Path) -> None:
    import random

    probes(plugins)
    warm = run_suite(tmp_path / "warm", plugins, PROBED.format(replicates=3))
    warm_seen = probes(plugins)
    fresh = run_suite(tmp_path / "fresh", plugins, PROBED.format(replicates=3), cells_per_worker=1)
    fresh_seen = probes(plugins)
    assert [r.status for r in warm + fresh] == ["ok"] * 6, [r.error for r in warm + fresh]
    assert len({s["pid"] for s in warm_seen}) == 1, "one job: one worker ran every cell"
    assert len({s["pid"] for s in fresh_seen}) == 3, "cells_per_worker=1: a fresh process per cell"
    assert len(warm_seen) == len(fresh_seen) == 3
    # Python's `random` is seeded from the OS in every new process (fresh ones differ); a warm worker
    # gives each cell the state it started with.
    random.seed(12345)
    spoilt = random.random()
    assert len({s.pop("python_draw") for s in fresh_seen}) == 3
    warm_draws = {s.pop("python_draw") for s in warm_seen}
    assert len(warm_draws) == 1 and spoilt not in warm_draws
    for seen in warm_seen + fresh_seen:
        state = {k: v for k, v in seen.items() if k != "pid"}
        assert state == {k: v for k, v in fresh_seen[0].items() if k != "pid"}, \
            "each cell saw what the first cell of a fresh process saw, though the one before spoilt it"
    first = fresh_seen[0]
    assert first["dtype"] == "torch.float32" and first["threads"] == 1 and first["leak_env"] is None
    assert not first["deterministic"] and not first["anomaly"] and not first["leak_path"]
    assert first["cwd"] != str(plugins) and first["matmul"] == "highest"


def comparable(tables: dict[str, list[dict[str, Any]]]) -> dict[str, pd.DataFrame]:
    """A cell's rows without the columns that say when it ran and for how long."""
    clock = {"started", "finished", "duration_s", "wall_time", "seconds"}
    return {name: pd.DataFrame(rows).drop(columns=[c for c in clock if c in rows[0]] if rows else [])
            for name, rows in tables.items()}


def test_warm_workers_give_the_fresh_process_executor_s_tables(tmp_path: Path, plugins: Path) -> None:
    body = """
        [[train]]
        task = ["adding", "char-lm"]
        model = "gru"
        method = ["full", "chunked:k=4"]
        eval_every = 1
        [[bias]]
        task = "adding"
        model = "lstm"
        methods = ["full", "chunked:k=2"]
        n_batches = 2
    """
    warm = run_suite(tmp_path / "warm", plugins, body, jobs=2)
    fresh = run_suite(tmp_path / "fresh", plugins, body, jobs=2, cells_per_worker=1)
    assert [r.status for r in warm] == ["ok"] * 5, [r.error for r in warm]
    assert [r.status for r in fresh] == ["ok"] * 5
    for w, f in zip(warm, fresh):
        w_tables, f_tables = comparable(w.tables), comparable(f.tables)
        assert sorted(w_tables) == sorted(f_tables)
        for name in w_tables:
            pd.testing.assert_frame_equal(w_tables[name], f_tables[name], check_exact=True)


def test_a_crash_or_an_out_of_memory_cell_replaces_the_worker_and_the_sweep_goes_on(
        tmp_path: Path, plugins: Path) -> None:
    probe = PROBED.format(replicates=1)
    body = (probe + '[[train]]\ntask = "adding"\nmodel = "exits"\nmethod = "full"\n'
            + PROBED.format(replicates=2).replace("replicates = 2", "replicates = 2\nsteps = 4")
            + '[[train]]\ntask = "adding"\nmodel = "killed"\nmethod = "full"\n'
            + probe.replace("method", "steps = 5\nmethod")
            + '[[train]]\ntask = "adding"\nmodel = "rnn"\nhidden_size = 8388608\nmethod = "full"\n'
            + probe.replace("method", "steps = 6\nmethod"))
    probes(plugins)
    results = run_suite(tmp_path, plugins, body)
    assert [r.status for r in results] == ["ok", "failed", "ok", "ok", "failed", "ok", "oom", "ok"], \
        [r.error for r in results]
    assert "died abruptly" in results[1].error and "died abruptly" in results[4].error
    pids = [s["pid"] for s in probes(plugins)]
    assert len(pids) == 5 and pids[1] == pids[2], "the two cells between crashes shared a worker"
    assert len({pids[0], pids[1], pids[3], pids[4]}) == 4, "a new worker after each crash and after the oom cell"
    assert os.getpid() not in pids


def test_a_cell_past_its_time_limit_is_a_timeout_and_its_worker_is_replaced(tmp_path: Path, plugins: Path) -> None:
    probe = PROBED.format(replicates=1)
    body = (probe + '[[train]]\ntask = "sleeps"\nmodel = "rnn"\nmethod = "full"\ntime_limit = 2\n'
            + probe.replace("method", "steps = 4\nmethod"))
    probes(plugins)
    results = run_suite(tmp_path, plugins, body)
    assert [r.status for r in results] == ["ok", "timeout", "ok"], [r.error for r in results]
    assert 2 <= results[1].duration_s < 12 and "time limit of 2 s" in results[1].error
    first, last = (s["pid"] for s in probes(plugins))
    assert first != last, "the stopped worker was replaced"
    (slept,) = [int(p) for p in (plugins / "sleeps.pids").read_text().split()]
    assert slept == first, "the sleeping cell ran in the warm worker of the cell before it"
    stat = Path(f"/proc/{slept}/stat")
    assert not stat.exists() or stat.read_text().rpartition(")")[2].split()[0] == "Z", "the worker was stopped"


def test_a_ray_task_with_a_time_limit_runs_its_cell_in_a_worker_of_its_own(tmp_path: Path, plugins: Path) -> None:
    from tbptt_bench.suites.executors import _ray_task

    body = PROBED.format(replicates=1) + '[[train]]\ntask = "sleeps"\nmodel = "rnn"\nmethod = "full"\ntime_limit = 2\n'
    (tmp_path / "suite.toml").write_text(textwrap.dedent(HEADER.format(name="executor") + body))
    probe, sleeps = load_suite(str(tmp_path / "suite.toml")).cells
    probes(plugins)
    assert _ray_task(dataclasses.replace(probe, time_limit=60.0), 1, [str(plugins)], 1, 0).status == "ok"
    (seen,) = probes(plugins)
    assert seen["pid"] != os.getpid(), "a cell with a time limit runs in a worker process"
    stopped = _ray_task(sleeps, 1, [str(plugins)], 1, 0)
    assert stopped.status == "timeout" and "time limit of 2 s" in stopped.error
    assert stopped.tables["cells"][0]["executor"] == "ray"


def bench_workers(*args: str) -> str:
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, str(root / "benchmarks" / "bench_workers.py"), *args], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


@pytest.mark.slow
def test_bench_workers_script_prints_both_modes_and_a_whole_suite(tmp_path: Path) -> None:
    out = bench_workers("--cells", "2", "--repeats", "1")
    rows = {line[:24].strip(): [float(x) for x in line[24:].split()] for line in out.splitlines()[2:]}
    assert sorted(rows) == ["fresh process per cell", "warm workers"]
    for wall, inside, outside, cpu in rows.values():
        assert wall == pytest.approx(inside + outside, abs=2e-3) and inside > 0, "one repeat: wall = in + outside"
        assert cpu > 0, "the workers' CPU time was found"
    suite = tmp_path / "two.toml"
    suite.write_text(textwrap.dedent(HEADER.format(name="two") + '[[train]]\ntask = "adding"\nmodel = "rnn"\n'
                                     'method = ["full", "chunked:k=4"]\n'))
    line = bench_workers("--whole-suite", str(suite)).strip()
    cpu = [float(x) for x in re.findall(r"CPU of the workers (\d+) s, of the driver (\d+) s", line)[0]]
    assert "exit status 0" in line and cpu[1] > 0, line
