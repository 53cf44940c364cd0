"""The measurement harness: row schema, units, fresh-process isolation, memory, out-of-memory rows, CLI,
the child's code origin, stale temporary folders and busy-machine detection."""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from tbptt_bench import provenance as prov
from tbptt_bench import registry
from tbptt_bench.perf import child, gpu_check, harness
from tbptt_bench.cli import main as cli_main
from tbptt_bench.commands.perf import parse_size, split_methods
from tbptt_bench.errors import UsageError
from tbptt_bench.methods.base import parse_method
from tbptt_bench.perf.child import perf_grid
from tbptt_bench.perf.config import COLUMNS, PerfConfig
from tbptt_bench.perf.failures import is_out_of_memory
from tbptt_bench.perf.harness import interleaved_times, measure
from tbptt_bench.perf.memory import maxrss_bytes
from tbptt_bench.perf.tables import expand_grid, save_table

TINY = dict(task="copy", model="lstm", hidden_size=8, batch_size=2, threads=1, warmup=1, repeats=3)
B, H = 8, 32  # the fresh-process grid: big enough that full BPTT's activations stand out
HAS_CUDA = torch.cuda.is_available()


def statm_resident_bytes() -> int:
    """Resident set from /proc/self/statm (pages × page size): independent of the harness's reading."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def test_row_schema_and_time_units_in_process():
    cfg = PerfConfig(method="tbptt:k1=8,k2=16", seq_len=40, **TINY)
    t0 = time.perf_counter()
    row = measure(cfg)
    wall = time.perf_counter() - t0
    assert set(row) == set(COLUMNS)
    assert row["status"] == "ok", row["error"]
    assert row["method"] == "tbptt:k1=8,k2=16" and row["seq_len"] == 40 and row["threads"] == 1
    assert row["device"] == "cpu" and row["torch_version"] == torch.__version__ and row["git_commit"]
    assert row["fresh_process"] is False and row["pid"] == os.getpid()
    n = len(parse_method(cfg.method).updates(40))
    assert row["updates_per_sequence"] == n == 5 and row["tokens_per_sequence"] == 2 * 40
    secs = row["repeat_seconds"]
    assert len(secs) == 3 and all(s > 0 for s in secs)
    assert sum(secs) + row["first_sequence_s"] < wall  # seconds, not milliseconds
    assert row["seconds_per_sequence"] == statistics.median(secs)
    assert row["tokens_per_s"] == pytest.approx(80 / statistics.median(secs))
    assert row["ms_per_update"] == pytest.approx(1000 * statistics.median(secs) / n)
    assert row["ms_per_update_p10"] <= row["ms_per_update"] <= row["ms_per_update_p90"]
    assert row["tokens_per_s_p10"] <= row["tokens_per_s"] <= row["tokens_per_s_p90"]


def test_memory_columns_are_bytes():
    row = measure(PerfConfig(method="chunked:k=8", seq_len=32, **TINY))
    for col in ("mem_baseline_bytes", "mem_peak_bytes", "mem_delta_bytes"):
        assert isinstance(row[col], int) and row[col] >= 0
    assert row["mem_peak_bytes"] >= row["mem_baseline_bytes"]
    if Path("/proc/self/statm").exists():  # the baseline is this process's resident set, in bytes
        assert 0.5 < row["mem_baseline_bytes"] / statm_resident_bytes() < 2.0
    assert row["mem_source"] in ("rss_hwm_reset", "ru_maxrss")


def test_out_of_memory_classification():
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes"))
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(MemoryError())
    assert not is_out_of_memory(RuntimeError("could not execute a primitive"))
    assert is_out_of_memory(RuntimeError("could not execute a primitive"), limited=True)
    assert not is_out_of_memory(ValueError("out of memory"))


def test_maxrss_units():
    assert maxrss_bytes(1000, "Linux") == 1024000  # KiB on Linux
    assert maxrss_bytes(1000, "Darwin") == 1000  # bytes on macOS


def test_out_of_memory_in_process_is_a_row_and_the_grid_goes_on():
    impossible = PerfConfig(method="full", seq_len=32, **{**TINY, "hidden_size": 2**20})  # 2^42 LSTM weights
    frame = perf_grid([impossible, PerfConfig(method="full", seq_len=32, **TINY)], fresh=False)
    assert frame["status"].tolist() == ["oom", "ok"]
    assert "allocate" in frame.loc[0, "error"]


def test_bad_configurations_are_usage_errors():
    with pytest.raises(UsageError, match="at least 21"):
        measure(PerfConfig(seq_len=10, **TINY))
    with pytest.raises(UsageError, match="cell path"):
        PerfConfig(compile=True).validate()
    with pytest.raises(UsageError, match="optimizer"):
        PerfConfig(optimizer="lbfgs").validate()
    with pytest.raises(UsageError, match="fresh process"):
        measure(PerfConfig(seq_len=32, memory_limit=2**20, **TINY))
    if not HAS_CUDA:
        with pytest.raises(UsageError, match="no CUDA GPU"):
            PerfConfig(device="cuda").validate()


def test_expand_grid_and_interleaving():
    configs = expand_grid(PerfConfig(), method=["full", "chunked:k=8"], seq_len=[32, 64])
    assert [(c.method, c.seq_len) for c in configs] == [("full", 32), ("full", 64), ("chunked:k=8", 32), ("chunked:k=8", 64)]
    with pytest.raises(UsageError, match="unknown configuration field"):
        expand_grid(PerfConfig(), colour=["red"])
    order: list[str] = []
    times = interleaved_times({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, 3, warmup=1)
    assert order == ["a", "b", "a", "b", "b", "a", "a", "b"]
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".json"])
def test_save_table_round_trip(tmp_path, suffix):
    frame = perf_grid([PerfConfig(method="chunked:k=8", seq_len=24, **TINY)], fresh=False)
    path = save_table(frame, tmp_path / f"perf{suffix}")
    back = pd.read_csv(path) if suffix == ".csv" else pd.read_parquet(path) if suffix == ".parquet" else pd.read_json(path)
    assert list(back.columns) == COLUMNS
    assert back.loc[0, "tokens_per_s"] == pytest.approx(frame.loc[0, "tokens_per_s"])
    assert json.loads(back.loc[0, "repeat_seconds"]) if suffix != ".json" else back.loc[0, "repeat_seconds"]
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind
    with pytest.raises(UsageError, match="accepted: .csv"):
        save_table(frame, tmp_path / "perf.txt")


# ---------------------------------------------------------------------------------- fresh processes

@pytest.fixture(scope="module")
def fresh_grid():
    """Five configurations, each in its own process; the second runs out of its memory limit."""
    base = PerfConfig(task="copy", model="lstm", hidden_size=H, batch_size=B, threads=1, warmup=1, repeats=1)
    configs = [
        dataclasses.replace(base, method="full", seq_len=1024),
        dataclasses.replace(base, method="full", seq_len=1024, memory_limit=8 * 2**20),
        dataclasses.replace(base, method="chunked:k=16", seq_len=1024),
        dataclasses.replace(base, method="full", seq_len=64),
        dataclasses.replace(base, method="chunked:k=16", seq_len=64),
    ]
    return perf_grid(configs, fresh=True, timeout=300).to_dict("records")


def test_each_configuration_runs_in_its_own_process(fresh_grid):
    pids = [r["pid"] for r in fresh_grid]
    assert len(set(pids)) == len(pids) and os.getpid() not in pids
    assert all(r["fresh_process"] for r in fresh_grid)


def test_out_of_memory_is_recorded_and_the_grid_goes_on(fresh_grid):
    assert [r["status"] for r in fresh_grid] == ["ok", "oom", "ok", "ok", "ok"]
    assert fresh_grid[1]["error"].startswith("RuntimeError")  # the allocator's (or oneDNN's) failure


def test_large_allocation_does_not_leak_into_the_next_configuration(fresh_grid):
    big, after = fresh_grid[0], fresh_grid[2]
    assert big["mem_sequence_bytes"] > 4 * after["mem_sequence_bytes"]
    # the later process's absolute high-water mark does not contain the earlier run's activations
    assert after["mem_peak_bytes"] < big["mem_peak_bytes"] - 0.5 * big["mem_sequence_bytes"]


def test_full_bptt_memory_is_at_least_its_saved_features(fresh_grid):
    full_long, full_short = fresh_grid[0], fresh_grid[3]
    features = B * 1024 * H * 4  # float32 [B, T, H] the read-out's backward needs
    assert features <= full_long["mem_sequence_bytes"] <= 200 * features
    assert full_long["mem_sequence_bytes"] - full_short["mem_sequence_bytes"] >= B * (1024 - 64) * H * 4


def test_truncated_memory_is_flat_in_sequence_length(fresh_grid):
    full_growth = fresh_grid[0]["mem_sequence_bytes"] - fresh_grid[3]["mem_sequence_bytes"]
    trunc_growth = fresh_grid[2]["mem_sequence_bytes"] - fresh_grid[4]["mem_sequence_bytes"]
    assert full_growth > 0
    assert trunc_growth < 0.1 * full_growth


# ---------------------------------------------------------------------------------- command line

def test_method_lists_and_sizes():
    assert split_methods(["chunked:k=64,full"]) == ["chunked:k=64", "full"]
    assert split_methods(["tbptt:k1=16,k2=64,full", "sliding:k=4,k1=2"]) == [
        "tbptt:k1=16,k2=64", "full", "sliding:k=4,k1=2"]
    with pytest.raises(UsageError):
        split_methods(["k=3,full"])
    assert parse_size("512M") == 512 * 2**20 and parse_size("2g") == 2 * 2**30 and parse_size("100") == 100
    with pytest.raises(UsageError, match="not a size"):
        parse_size("lots")


def test_cli_json_and_save(tmp_path, capsys):
    out = tmp_path / "perf.csv"
    rc = cli_main(["perf", "--task", "copy", "--model", "lstm,gru", "--method", "chunked:k=8,full", "--seq-len", "24",
                   "--hidden", "8", "--batch", "2", "--repeats", "1", "--threads", "1", "--in-process", "--json",
                   "--save", str(out)])
    assert rc == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["model"], r["method"]) for r in rows] == [("lstm", "chunked:k=8"), ("lstm", "full"),
                                                          ("gru", "chunked:k=8"), ("gru", "full")]
    assert all(r["status"] == "ok" for r in rows)
    assert pd.read_csv(out)["tokens_per_s"].tolist() == pytest.approx([r["tokens_per_s"] for r in rows])


def test_cli_table(capsys):
    assert cli_main(["perf", "--method", "chunked:k=8", "--seq-len", "24", "--hidden", "8", "--batch", "2",
                     "--repeats", "1", "--threads", "1", "--in-process"]) == 0
    assert "tokens/s" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--method", "tbptt:k1=0"], "k1=0"),
    (["--seq-len", "ten"], "integers"),
    (["--save", "/no/such/folder/x.csv"], "does not exist"),
    (["--save", "x.txt"], "unknown suffix"),
    (["--memory-limit", "lots"], "not a size"),
] + ([] if HAS_CUDA else [(["--device", "cuda"], "no CUDA GPU")]))
def test_cli_bad_input_exits_2(capsys, argv, message):
    assert cli_main(["perf", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


# ---------------------------------------------------------------------------------- GPU check (CPU side)

def test_gpu_check_grid():
    entries = gpu_check.build_grid("cuda")
    roles = [e.role for e in entries]
    assert roles.count("fused_vs_cell") == 2 and roles.count("oom_probe") == 1 and roles.count("online") == 2
    methods = {(e.config.method, e.config.hidden_size, e.config.seq_len) for e in entries if e.role != "fused_vs_cell"}
    assert methods == {(m, h, 1024) for m in ("full", "chunked:k=16", "chunked:k=64", "chunked:k=256",
                                              "tbptt:k1=64,k2=128") for h in (256, 1024)} | {
        ("uoro", 256, 256), ("uoro", 1024, 256), ("full", 1024, 1024)}
    assert all(e.config.device == "cuda" and e.config.batch_size == 32 for e in entries)
    assert entries[-1].expect == "oom" and entries[-1].config.memory_limit == gpu_check.PROBE_LIMIT


@pytest.mark.skipif(HAS_CUDA, reason="checks the no-GPU refusal")
def test_gpu_check_without_gpu_exits_2(tmp_path, capsys):
    assert gpu_check.main(["--out", str(tmp_path / "out")]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_gpu_check_writes_its_files_on_cpu(tmp_path):
    target = Path(__file__).resolve().parent / "test_cuda.py"
    summary = gpu_check.run_check(tmp_path, "cpu", tiny=True, fresh=False, pytest_target=target)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"perf.csv", "perf.json", "summary.json", "pytest_cuda.log", "pytest_cuda.xml"} <= names
    table = pd.read_csv(tmp_path / "perf.csv")
    assert len(table) == len(gpu_check.build_grid("cpu", tiny=True)) == summary["rows"]
    assert table["status"].tolist() == table["expected_status"].tolist()
    assert json.loads((tmp_path / "summary.json").read_text())["ok"] is True
    assert summary["pytest_rc"] == 0 and "fused_over_cell_throughput" in summary["ratios"]
    assert "| methods | full | 8 | 24 | ok |" in (tmp_path / "summary.md").read_text()


# ---------------------------------------------------------------------------------- the child's code, temp folders

STRAY_INIT = "raise RuntimeError('stray tbptt_bench imported from the current folder')\n"
PLUGIN_TASK = (
    "from tbptt_bench.tasks import register_task\n"
    "from tbptt_bench.tasks.copy import CopyTask\n\n"
    "@register_task\n"
    "class PluginCopy(CopyTask):\n"
    "    name = 'copy-perf-plugin'\n"
)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_fresh_child_runs_the_parents_package_not_a_stray_one(tmp_path, monkeypatch):
    """A stray tbptt_bench/ in the working folder and on PYTHONPATH shadows the package in a plain
    interpreter, but not in the measuring child; a plugin folder still reaches the child; the child's
    temporary folder is named with this pid and removed, a dead pid's folder is cleaned, a live one kept."""
    stray = tmp_path / "stray"
    (stray / "tbptt_bench").mkdir(parents=True)
    (stray / "tbptt_bench" / "__init__.py").write_text(STRAY_INIT)
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "copy_plugin.py").write_text(PLUGIN_TASK)
    temp = tmp_path / "temp"
    dead, live = temp / f"tbptt-perf-{_dead_pid()}-old", temp / f"tbptt-perf-{os.getpid()}-mine"
    for folder in (dead, live):
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
    monkeypatch.chdir(stray)
    monkeypatch.setenv("PYTHONPATH", str(stray))
    monkeypatch.setenv(registry.PLUGIN_ENV, str(plugins))
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    plain = subprocess.run([sys.executable, "-c", "import tbptt_bench"], capture_output=True, text=True)
    assert plain.returncode != 0 and "stray tbptt_bench imported" in plain.stderr  # the hazard is real
    row = child.measure_in_fresh_process(PerfConfig(method="chunked:k=8", seq_len=24, **{
        **TINY, "task": "copy-perf-plugin", "repeats": 1}))
    assert row["status"] == "ok", row["error"]
    assert row["fresh_process"] and row["pid"] != os.getpid() and row["task"] == "copy-perf-plugin"
    left = sorted(p.name for p in temp.glob("tbptt-perf-*"))
    servers = [name for name in left if name.startswith(f"tbptt-perf-{os.getpid()}-server-")]  # this run's, alive
    assert sorted(set(left) - set(servers)) == [live.name] and len(servers) <= 1


def _server_pids() -> set[int]:
    server = child.MeasuringServer.current
    return {server.proc.pid} if server is not None and server.proc.poll() is None else set()


def test_server_forks_a_new_process_per_configuration_and_survives_a_timeout():
    cfg = PerfConfig(method="chunked:k=4", seq_len=24, **TINY)
    first = child.measure_in_fresh_process(cfg)
    late = child.measure_in_fresh_process(dataclasses.replace(cfg, seq_len=4096, repeats=50), timeout=0.5)
    second = child.measure_in_fresh_process(cfg)
    assert first["status"] == second["status"] == "ok" and late["status"] == "timeout"
    servers = _server_pids()
    assert len(servers) == 1 and os.getpid() not in servers
    assert len({first["pid"], second["pid"], os.getpid(), *servers}) == 4  # two new processes, neither a server
    assert first["fresh_process"] and late["fresh_process"]


def test_the_server_and_its_children_end_with_their_parent():
    script = ("import os, sys, json; from tbptt_bench.perf import child; from tbptt_bench.perf.config import PerfConfig;"
              f"row = child.measure_in_fresh_process(PerfConfig(method='full', seq_len=24, **{TINY!r}));"
              "print(json.dumps([child.MeasuringServer.current.proc.pid]), flush=True);"
              "os._exit(0)")  # no atexit: the server learns of its parent's end from the kernel
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    (server,) = json.loads(proc.stdout.strip().splitlines()[-1])
    for _ in range(100):
        if not Path(f"/proc/{server}").exists() or "Z" in Path(f"/proc/{server}/stat").read_text().split()[2]:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"measuring server {server} outlived its parent")


def test_one_interpreter_per_configuration_without_the_server(monkeypatch):
    monkeypatch.setenv(child.SERVER_ENV, "0")
    row = child.measure_in_fresh_process(PerfConfig(method="chunked:k=4", seq_len=24, **TINY))
    assert row["status"] == "ok" and row["fresh_process"] and row["pid"] not in _server_pids() | {os.getpid()}


def test_child_refuses_a_package_other_than_the_parents(tmp_path, capsys):
    import tbptt_bench

    cmd = child.child_command(tmp_path / "c.json", tmp_path / "r.json")
    assert cmd[:3] == [sys.executable, "-I", "-c"] and cmd[4] == str(Path(tbptt_bench.__file__).resolve().parents[1])
    assert child.child_command(None, None)[5] == "--serve"
    assert f"tbptt_bench={Path(tbptt_bench.__file__).resolve()}" in cmd
    rc = child.main(["--child", str(tmp_path / "c.json"), str(tmp_path / "r.json"),
                     "--expect", f"tbptt_bench={tmp_path / 'other' / '__init__.py'}"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "imported tbptt_bench from" in err and str(tmp_path / "other") in err
    assert not (tmp_path / "r.json").exists()


def test_stale_temp_folders_of_dead_runs_only_are_removed(tmp_path):
    dead_pid = _dead_pid()
    dead = tmp_path / f"tbptt-perf-{dead_pid}-abc"
    live = tmp_path / f"tbptt-perf-{os.getpid()}-def"
    unnamed = tmp_path / "tbptt-perf-k2j4h_x1"  # the old naming, no pid: not ours to judge
    for folder in (dead, live, unnamed):
        (folder / "sub").mkdir(parents=True)
    not_a_folder = tmp_path / f"tbptt-perf-{dead_pid}-file"
    not_a_folder.write_text("x")
    assert child.remove_stale_temp_dirs(tmp_path) == [dead]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, unnamed.name, not_a_folder.name])
    assert child.remove_stale_temp_dirs(tmp_path) == []


# ---------------------------------------------------------------------------------- busy machine

STAT = """cpu  999 999 999 999 999 999 999 999 0 0
cpu0 10 1 2 300 40 5 6 7 0 0
cpu1 20 2 4 600 80 10 12 14 0 0
intr 12345
"""


def test_cpu_busy_seconds_reads_busy_fields_of_allowed_cpus():
    tick = prov.clock_tick_seconds()
    # user + nice + system + irq + softirq + steal; idle and iowait are not busy; the total line is skipped
    assert prov.cpu_busy_seconds({0}, STAT) == pytest.approx((10 + 1 + 2 + 5 + 6 + 7) * tick)
    assert prov.cpu_busy_seconds(None, STAT) == pytest.approx((31 + 62) * tick)
    assert prov.cpu_busy_seconds({5}, STAT) is None


def test_busy_rule():
    assert prov.judge_busy(0.30, 0.01, 0.0, 1) is True
    assert prov.judge_busy(0.30, 0.10, 9.0, 1) is False  # within the counters' resolution of 0.25
    assert prov.judge_busy(0.10, 0.01, 9.0, 1) is False  # the CPU counters decide when they can
    assert prov.judge_busy(0.10, 0.50, 1.6, 1) is True  # window too short: the load average decides
    assert prov.judge_busy(None, float("inf"), 2.4, 2) is False
    assert prov.judge_busy(None, float("inf"), None, 1) is None


def _process_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) * prov.clock_tick_seconds()  # utime, stime


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="needs Linux /proc")
def test_load_probe_sees_another_process_spinning():
    """A spinning process's CPU time, read independently from /proc/PID/stat, is inside other_cpu_fraction."""
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        probe = prov.LoadProbe(threads=1)
        spin0, t0 = _process_cpu_seconds(spinner.pid), time.perf_counter()
        probe.start()
        time.sleep(1.0)
        cols = probe.stop()
        spin1, wall = _process_cpu_seconds(spinner.pid), time.perf_counter() - t0
    finally:
        spinner.kill()
        spinner.wait()
    n_cpus = len(os.sched_getaffinity(0))
    resolution = (2 * n_cpus + 2) * prov.clock_tick_seconds() / wall
    assert set(cols) == {"load_avg_1m", "load_avg_1m_end", "other_cpu_fraction", "busy"}
    assert (spin1 - spin0) / wall - resolution <= cols["other_cpu_fraction"] <= n_cpus + resolution
    if (spin1 - spin0) / wall > 0.25 + 2 * resolution:
        assert cols["busy"] is True


class _FakeProbe:
    """Stands in for LoadProbe so that the CLI's handling of a quiet or busy machine is deterministic."""

    busy = False

    def __init__(self, threads: int) -> None:
        self.threads = threads

    def start(self) -> None:
        pass

    def stop(self) -> dict:
        if self.busy:
            return {"load_avg_1m": 3.0, "load_avg_1m_end": 3.1, "other_cpu_fraction": 1.5, "busy": True}
        return {"load_avg_1m": 0.5, "load_avg_1m_end": 0.5, "other_cpu_fraction": 0.01, "busy": False}


def test_cli_exit_status_and_strict_busy_refusal(monkeypatch, capsys):
    base = ["perf", "--method", "full", "--seq-len", "24", "--batch", "2", "--repeats", "1", "--threads", "1",
            "--in-process", "--json"]
    monkeypatch.setattr(harness, "LoadProbe", _FakeProbe)
    import tbptt_bench.commands.perf as perf_command

    # the size check refuses a configuration that cannot fit before anything runs (exit 2); let this one
    # through so that it runs out of memory as a measured row would
    monkeypatch.setattr(perf_command, "check_run_size", lambda *args, **kwargs: None)
    assert cli_main([*base, "--hidden", f"8,{2**20}"]) == 1  # the second runs out of memory
    captured = capsys.readouterr()
    assert [r["status"] for r in json.loads(captured.out)] == ["ok", "oom"]
    assert "1 of 2 configurations not ok (oom 1); exit status 1" in captured.err
    monkeypatch.setattr(_FakeProbe, "busy", True)
    assert cli_main([*base, "--hidden", "8"]) == 0  # busy is a warning without --strict
    captured = capsys.readouterr()
    row = json.loads(captured.out)[0]
    assert row["status"] == "ok" and row["busy"] is True and row["other_cpu_fraction"] == 1.5
    assert "all 1 configurations ok; 1 measured on a busy machine" in captured.err
    assert cli_main([*base, "--hidden", "8", "--strict"]) == 1
    captured = capsys.readouterr()
    row = json.loads(captured.out)[0]
    assert row["status"] == "busy" and "other processes used 1.50 cores" in row["error"]
    assert row["tokens_per_s"] > 0  # the numbers stay, marked
    assert "(busy 1); exit status 1" in captured.err
