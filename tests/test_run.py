"""``tbptt-bench run``: resume after a real SIGKILL, failures recorded as data, reproducing one cell,
the lock and bad input through the command line."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Iterator

import pytest

from tbptt_bench.cli import main
from tbptt_bench.suites.store import ResultStore, read_results
from tbptt_bench.suites.suite import load_suite
from tbptt_bench.training.loop import TrainConfig, train

ROOT = Path(__file__).resolve().parent.parent

TINY = """
[suite]
name = "tiny"
seed = 5

[defaults]
seq_len = 8
batch_size = 2
hidden_size = 4

[[train]]
task = ["adding", "char-lm"]
model = ["rnn", "gru"]
method = ["full", "chunked:k=4", "sliding:k=2"]
steps = 4
eval_every = 2
eval_batches = 1
"""

FAILING = """
[suite]
name = "failing"
seed = 1

[defaults]
seq_len = 8
batch_size = 2
hidden_size = 4
steps = 30
eval_every = 1
eval_batches = 1

[[train]]            # diverges: plain SGD with a huge step on a squared error
task = "adding"
model = "lstm"
method = "chunked:k=4"
optimizer = "sgd"
lr = 1e6
clip = "none"

[[train]]            # out of memory: a 2^23 x 2^23 recurrent matrix (256 TB) cannot be allocated
task = "adding"
model = "rnn"
method = "full"
hidden_size = 8388608

[[train]]            # fails: the stream is far shorter than one segment
task = "char-lm"
model = "gru"
method = "full"
seq_len = 10000000

[[train]]            # kills its own worker process with SIGKILL
task = "adding"
model = "suicide"
method = "full"

[[train]]            # and the sweep goes on
task = "adding"
model = "gru"
method = "full"
"""

SUICIDE_PLUGIN = """
import os
import signal

from tbptt_bench.models import register_model


@register_model("suicide")
def suicide(task, hidden_size, num_layers=1):
    \"\"\"A model whose construction kills the process (a stand-in for a segfault or the OOM killer).\"\"\"
    os.kill(os.getpid(), signal.SIGKILL)
"""


HANG_PLUGIN = """
import os
import time

from tbptt_bench.tasks.adding import AddingTask
from tbptt_bench.tasks.base import register_task


@register_task
class HangTask(AddingTask):
    \"\"\"The adding task whose batches never come (but the one-row check of a suite file): writes its
    pid, then sleeps for an hour.\"\"\"

    name = "hang"

    def sample(self, batch_size, seq_len, generator, split="train"):
        if batch_size > 1:
            with open(os.path.join(os.path.dirname(__file__), "hang.pids"), "a") as fh:
                fh.write(f"{os.getpid()}\\n")
            time.sleep(3600)
        return super().sample(batch_size, seq_len, generator, split)
"""


@pytest.fixture(scope="module")
def plugins(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One plugin folder per test module: a model is registered once per process. Its entries are
    unregistered afterwards, so that later test modules see the built-ins only."""
    from tbptt_bench.models import MODELS
    from tbptt_bench.tasks import TASKS

    folder = tmp_path_factory.mktemp("plugins")
    write(folder / "suicide.py", SUICIDE_PLUGIN)
    write(folder / "hang.py", HANG_PLUGIN)
    before = {"tasks": set(TASKS._items), "models": set(MODELS._items)}
    yield folder
    for name in set(TASKS._items) - before["tasks"]:
        TASKS._items.pop(name)
    for name in set(MODELS._items) - before["models"]:
        MODELS._items.pop(name)


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def live_members(pgid: int) -> list[int]:
    """Processes of a process group that still run (zombies waiting to be reaped do not count)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def group_ends(pgid: int, within: float) -> bool:
    """Whether every process of a process group has ended within ``within`` seconds."""
    deadline = time.monotonic() + within
    while live_members(pgid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)
    return True


def test_resume_after_sigkill_has_every_cell_exactly_once(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    suite_file = write(tmp_path / "tiny.toml", TINY)
    results = tmp_path / "res"
    cmd = [sys.executable, "-m", "tbptt_bench.cli", "run", str(suite_file), "--results", str(results), "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(),
                            start_new_session=True)
    finished = 0
    try:
        for line in proc.stdout:
            if re.match(r"\[\d+/12\] ok", line):
                finished += 1
            if finished == 4:
                break
        os.kill(proc.pid, signal.SIGKILL)  # the driver alone, mid-suite
        proc.wait()
        assert finished == 4, proc.stderr.read()
        assert group_ends(proc.pid, within=30), "worker processes end when their driver is killed"
    finally:
        if not group_ends(proc.pid, within=0):
            os.killpg(proc.pid, signal.SIGKILL)
    store = results / "tiny"
    partial = read_results(store)
    partial_train = read_results(store, "train")
    assert 4 <= len(partial) < 12 and not partial["key"].duplicated().any()

    assert main(cmd[3:]) == 0
    assert f"skipped {len(partial)} (already in the store)" in capsys.readouterr().out

    suite = load_suite(str(suite_file))
    final = read_results(store)
    assert sorted(final["key"]) == sorted(c.key for c in suite.cells), "every cell exactly once"
    assert (final["status"] == "ok").all()
    curves = read_results(store, "curves")
    assert sorted(curves.groupby("key")["n_updates"].apply(list).map(sorted).map(tuple).unique()) == [(0, 2, 4)]
    assert len(curves) == 3 * 12
    final_train = read_results(store, "train")
    merged = partial_train.merge(final_train, on="key", suffixes=("_before", "_after"))
    assert len(merged) == len(partial)
    assert (merged["eval_loss_before"] == merged["eval_loss_after"]).all(), "finished cells are kept as they were"

    # one cell alone, by key prefix, rerun in place: the same numbers (its seed depends on the cell only)
    cell = suite.cells[7]
    assert main(["run", str(suite_file), "--results", str(results), "--only", cell.key[:8], "--rerun", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"[1/1] ok       {cell.label}" in out and "ran 1" in out
    again = read_results(store, "train")
    assert sorted(again["key"]) == sorted(final["key"]), "a rerun cell replaces its rows"
    alone, row = again.set_index("key").loc[cell.key], final_train.set_index("key").loc[cell.key]
    assert alone["finished"] > row["finished"]
    for column in ("seed", "train_loss", "eval_loss", "eval_metric"):
        assert alone[column] == row[column]
    assert len(read_results(store, "curves")) == 3 * 12
    direct = train(TrainConfig(**cell.params))
    assert direct.final["eval_loss"] == row["eval_loss"], "the stored cell is train() with the cell's params"


def test_diverged_oom_failed_and_crashed_cells_are_recorded(tmp_path: Path, plugins: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    suite_file = write(tmp_path / "failing.toml", FAILING)
    args = ["--plugins", str(plugins), "run", str(suite_file), "--results", str(tmp_path / "res"), "--quiet"]
    assert main(args) == 1, "a failed cell makes the exit status 1"
    out = capsys.readouterr().out
    assert "ran 5" in out and "1 ok, 1 diverged, 1 oom, 0 timeout, 2 failed" in out

    suite = load_suite(str(suite_file))
    frame = read_results(tmp_path / "res" / "failing", "train").set_index("key")
    status = {c.params["model"] + "/" + c.params["task"]: frame.loc[c.key] for c in suite.cells}

    diverged = status["lstm/adding"]
    assert diverged["status"] == "diverged"
    cell = next(c for c in suite.cells if c.params["model"] == "lstm")
    direct = train(TrainConfig(**cell.params))
    assert 1 <= diverged["diverged_at"] <= 30 and diverged["diverged_at"] == direct.diverged_at
    assert "non-finite" in diverged["error"]
    curve = read_results(tmp_path / "res" / "failing", "curves")
    kept = curve[curve["key"] == cell.key]
    assert list(kept["n_updates"]) == [r["update"] for r in direct.curve] and len(kept) >= 1
    assert kept["n_updates"].max() < diverged["diverged_at"], "the partial curve stops before the divergence"

    oom = status["rnn/adding"]
    assert oom["status"] == "oom" and "allocate" in oom["error"]
    failed = status["gru/char-lm"]
    assert failed["status"] == "failed" and "shorter than seq_len" in failed["error"]
    crashed = status["suicide/adding"]
    assert crashed["status"] == "failed" and "died abruptly" in crashed["error"]
    ok = status["gru/adding"]
    assert ok["status"] == "ok" and ok["eval_loss"] > 0
    for row in status.values():
        assert row["started"] <= row["finished"] and row["suite"] == "failing" and row["measure"] == "train"
        assert row["torch_version"] and row["cpu_model"] and row["git_commit"]

    assert main(args) == 1, "failures from an earlier run still fail the exit status"
    out = capsys.readouterr().out
    assert "ran 0" in out and "skipped 5" in out and "2 cells failed (2 in earlier runs)" in out

    failed_key = next(c.key for c in suite.cells if c.params["task"] == "char-lm")
    assert main(args + ["--retry-failed", "--only", failed_key]) == 1
    out = capsys.readouterr().out
    assert "ran 1" in out and "0 ok, 0 diverged, 0 oom, 0 timeout, 1 failed" in out and "earlier" not in out
    assert len(read_results(tmp_path / "res" / "failing")) == 5


def test_lock_stops_a_second_run_on_the_same_results(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    suite_file = write(tmp_path / "tiny.toml", TINY)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from tbptt_bench.suites.store import ResultStore
        ResultStore({str(tmp_path / 'res' / 'tiny')!r}).acquire()
        print("locked", flush=True)
        time.sleep(120)
    """)], stdout=subprocess.PIPE, text=True, env=env(), start_new_session=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(["run", str(suite_file), "--results", str(tmp_path / "res")]) == 2
        err = capsys.readouterr().err
        assert "in use by another tbptt-bench run" in err and f"pid {holder.pid}" in err
        assert "Traceback" not in err
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()


def test_corrupted_results_file_exits_2_and_is_kept(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    suite_file = write(tmp_path / "tiny.toml", TINY)
    store = tmp_path / "res" / "tiny"
    store.mkdir(parents=True)
    (store / "results.parquet").write_bytes(b"PAR1 truncated")
    assert main(["run", str(suite_file), "--results", str(tmp_path / "res")]) == 2
    err = capsys.readouterr().err
    assert str(store / "results.parquet") in err and "left untouched" in err
    assert (store / "results.parquet").read_bytes() == b"PAR1 truncated"
    assert main(["run", str(suite_file), "--results", str(tmp_path / "res"), "--list"]) == 2


@pytest.mark.parametrize("argv, message", [
    (["run", "nosuchsuite"], "unknown suite 'nosuchsuite'"),
    (["run", "quick", "--only", "zzzz"], "no cell of the suite has that key"),
    (["run", "quick", "--jobs", "0"], "--jobs must be ≥ 1"),
    (["run", "quick", "--ray-address", "x:1"], "--ray-address needs --executor ray"),
    (["run", "quick", "--executor", "ray", "--ray-address", "nonsense"], "is not HOST:PORT"),
    (["run", "quick", "--executor", "ray", "--ray-address", "127.0.0.1:1"], "cannot reach the Ray cluster"),
])
def test_bad_input_is_one_line_and_exit_2(argv: list[str], message: str, tmp_path: Path,
                                         capsys: pytest.CaptureFixture) -> None:
    assert main(argv + ["--results", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir()), "nothing is written for bad input"


def test_bad_suite_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    suite_file = write(tmp_path / "bad.toml", TINY.replace("steps = 4", "stpes = 4"))
    assert main(["run", str(suite_file), "--results", str(tmp_path / "res")]) == 2
    assert "unknown key 'stpes'" in capsys.readouterr().err


def test_list_shows_keys_seeds_and_stored_status(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    suite_file = write(tmp_path / "tiny.toml", TINY)
    suite = load_suite(str(suite_file))
    with ResultStore(tmp_path / "res" / "tiny") as store:
        cell = suite.cells[0]
        store.commit(cell.key, {"cells": [{"key": cell.key, "status": "diverged"}]})
    assert main(["run", str(suite_file), "--results", str(tmp_path / "res"), "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "12 cells" in lines[0]
    listed = {line.split()[0]: line for line in lines[1:]}
    assert set(listed) == {c.key for c in suite.cells}
    assert "diverged" in listed[cell.key] and f"seed={cell.params['seed']}" in listed[cell.key]
    assert all(line.split()[1] == "-" for key, line in listed.items() if key != cell.key)


def test_a_crash_among_parallel_jobs_blames_only_the_crashing_cell(tmp_path: Path, plugins: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    suite_file = write(tmp_path / "crash.toml", """
        [suite]
        name = "crash"
        [defaults]
        seq_len = 8
        batch_size = 2
        hidden_size = 4
        steps = 2
        [[train]]
        task = "adding"
        model = ["suicide", "gru", "rnn"]
        method = "full"
    """)
    argv = ["--plugins", str(plugins), "run", str(suite_file), "--results", str(tmp_path / "res"), "--jobs", "2",
            "--quiet"]
    assert main(argv) == 1
    assert "2 ok, 0 diverged, 0 oom, 0 timeout, 1 failed" in capsys.readouterr().out
    frame = read_results(tmp_path / "res" / "crash", "train").set_index("model")
    assert frame.loc["suicide", "status"] == "failed" and "died abruptly" in frame.loc["suicide", "error"]
    assert (frame.loc[["gru", "rnn"], "status"] == "ok").all()


HANGING = """
[suite]
name = "hanging"
[defaults]
seq_len = 8
batch_size = 2
hidden_size = 4
steps = 2
eval_batches = 1
time_limit = 60
[[train]]
task = "hang"
model = "rnn"
method = "full"
time_limit = 3
[[train]]
task = "adding"
model = "rnn"
method = "full"
[[bias]]
task = "hang"
model = "rnn"
methods = ["full"]
seq_len = 8
batch_size = 2
n_batches = 1
time_limit = 4
"""


def test_a_hanging_cell_is_stopped_at_its_time_limit_and_the_sweep_goes_on(
        tmp_path: Path, plugins: Path, capsys: pytest.CaptureFixture) -> None:
    pids = plugins / "hang.pids"
    suite_file = write(tmp_path / "hanging.toml", HANGING)
    t0 = time.monotonic()
    argv = ["--plugins", str(plugins), "run", str(suite_file), "--results", str(tmp_path / "res"), "--quiet",
            "--jobs", "2"]
    assert main(argv) == 1, "a timeout fails the exit status"
    assert time.monotonic() - t0 < 60
    assert "1 ok, 0 diverged, 0 oom, 2 timeout, 0 failed" in capsys.readouterr().out
    suite = load_suite(str(suite_file))  # after main() loaded the plugin task
    assert sorted(c.time_limit for c in suite.cells) == [3.0, 4.0, 60.0], "block values override [defaults]"
    cells = read_results(tmp_path / "res" / "hanging").set_index("key")
    for cell in suite.cells:
        row = cells.loc[cell.key]
        if cell.params["task"] == "hang":
            assert row["status"] == "timeout" and "time limit" in row["error"]
            assert cell.time_limit <= row["duration_s"] < cell.time_limit + 10
        else:
            assert row["status"] == "ok"
    bias = read_results(tmp_path / "res" / "hanging", "bias")
    assert list(bias["status"]) == ["timeout"], "a stopped cell has its row in its measurement's table"
    hung = [int(p) for p in pids.read_text().split()]
    assert 1 <= len(hung) <= 2, "the hanging sample was reached (a slow start may be stopped before it)"
    for pid in hung:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2], \
            f"the hanging process {pid} was stopped"
    assert main(argv) == 1 and "skipped 3" in capsys.readouterr().out


def test_a_damaged_part_file_exits_2_before_any_file_is_written(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    suite_file = write(tmp_path / "tiny.toml", TINY)
    suite = load_suite(str(suite_file))
    store = tmp_path / "res" / "tiny"
    assert main(["run", str(suite_file), "--results", str(tmp_path / "res"), "--quiet", "--only",
                 suite.cells[0].key]) == 0
    with ResultStore(store) as writer:  # a committed cell not yet compacted, then damaged
        first = read_results(store, "train").iloc[0].to_dict()
        writer.commit(suite.cells[1].key, {"cells": [{"key": suite.cells[1].key, "status": "ok"}],
                                           "train": [{**first, "key": suite.cells[1].key}]})
    damaged = store / "parts" / suite.cells[1].key / "train.parquet"
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    capsys.readouterr()
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in store.rglob("*") if p.is_file()}
    assert main(["run", str(suite_file), "--results", str(tmp_path / "res"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert str(damaged) in err and "damaged" in err and len(err.splitlines()) == 1
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in store.rglob("*") if p.is_file()} == before
