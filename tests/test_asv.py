"""The asv benchmarks (benchmarks/asv_bench) and the comparison summary (tbptt_bench.asv_compare).

Every benchmark runs once here on its tiny cell, outside asv; the track_ bias figures are checked
against ``tbptt-bench bias`` for the same cell; a plugin task shows up in the grid; asv accepts the
configuration; and the summary judges real asv tables (taken from docs/regression.md's demonstration).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import io
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tbptt_bench import asv_compare
from tbptt_bench.cli import main as cli_main
from tbptt_bench.errors import UsageError
from tbptt_bench.methods.base import METHODS, parse_method
from tbptt_bench.tasks import TASKS

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "benchmarks"
PREFIXES = ("time_", "peakmem_", "track_")

sys.path.insert(0, str(BENCH_DIR))
grid = importlib.import_module("asv_bench.grid")
gradient_bias = importlib.import_module("asv_bench.gradient_bias")
MODULES = [importlib.import_module(f"asv_bench.{p.stem}") for p in sorted((BENCH_DIR / "asv_bench").glob("*.py"))
           if p.stem != "__init__"]


@pytest.fixture(autouse=True)
def restore_threads():
    """The benchmarks pin torch to one thread; give other tests the count they had."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def benchmark_classes() -> list[type]:
    """Classes that asv would find: defined in a benchmark module, with time_/peakmem_/track_ methods."""
    out = []
    for module in MODULES:
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module.__name__ and any(n.startswith(PREFIXES) for n in dir(cls)):
                out.append(cls)
    return out


def benchmark_methods(cls: type) -> list[str]:
    return sorted(n for n in dir(cls) if n.startswith(PREFIXES))


# --------------------------------------------------------------------------------------- the grid

def test_grid_is_the_registries_and_the_suite():
    tasks, families = grid.grid()
    assert tasks == TASKS.names()
    assert set(families) <= set(METHODS.names())
    listed = grid.suite_specs()
    assert {"full", "tbptt", "chunked", "sliding"} <= set(listed)  # the quick suite's method families
    for family, spec in listed.items():
        assert family in families
        assert parse_method(spec).family == family
        assert grid.representative_spec(family, 12) == spec
    for cls in benchmark_classes():
        assert cls.params == [tasks, families] and cls.param_names == ["task", "method"]


def test_the_task_axis_can_be_narrowed_by_name(monkeypatch):
    monkeypatch.setenv(grid.TASKS_ENV, " adding,copy ")
    assert grid.tasks() == [t for t in TASKS.names() if t in ("copy", "adding")]
    monkeypatch.setenv(grid.TASKS_ENV, "copy,nope")
    with pytest.raises(UsageError, match="unknown task.*nope.*registered: "):
        grid.tasks()
    monkeypatch.delenv(grid.TASKS_ENV)
    assert grid.tasks() == TASKS.names()


def test_family_outside_the_suite_gets_k_for_its_required_integers():
    unlisted = [f for f in grid.grid()[1] if f not in grid.suite_specs()]
    for family in unlisted:
        method = parse_method(grid.representative_spec(family, 24))
        for name, param in METHODS.get(family).schema.items():
            if param.required and param.default is None:
                assert method.params[name] == 6  # K = T // 4


def test_every_benchmark_runs_once_on_its_tiny_cell(monkeypatch):
    """Bias figures over 8 batches, each cell's once for its three classes (the figures' values are checked
    against the bias command in test_bias_track_equals_the_bias_command)."""
    monkeypatch.setattr(gradient_bias, "N_BATCHES", 8)
    monkeypatch.setattr(gradient_bias, "bias_figures", functools.lru_cache(maxsize=None)(gradient_bias.bias_figures))
    classes = benchmark_classes()
    kinds = {name.split("_")[0] for cls in classes for name in benchmark_methods(cls)}
    assert kinds == {"time", "peakmem", "track"}
    ran = 0
    for cls in classes:
        for params in itertools.product(*cls.params):
            bench = cls()
            try:
                bench.setup(*params)
            except NotImplementedError:
                assert (not torch.cuda.is_available() and cls.__name__ == "GPUUpdate") or (
                    cls.__name__ == "KCurveCost" and params[1] not in ("chunked", "tbptt")) or (
                    cls.__name__ in ("GradientBias", "BiasDetected", "GradientAlignment"))  # figure not defined
                continue
            for name in benchmark_methods(cls):
                try:
                    value = getattr(bench, name)(*params)
                except NotImplementedError:  # asv: skipped; a bias figure not defined for this method
                    assert name.startswith("track_") and cls.__name__ != "GPUUpdate", (name, params)
                    continue
                ran += 1
                if name.startswith("track_"):
                    assert getattr(getattr(cls, name), "unit", None), name
                    assert isinstance(value, float) and math.isfinite(value) and value >= -1e-12, (name, params, value)
                else:
                    assert value is None
    n_cells = len(grid.grid()[0]) * len(grid.grid()[1])
    # time, peakmem and at least one bias figure everywhere: the exact-expectation bias for mask methods (and
    # 1 − cosine for deterministic ones), the bias-detected test for estimators without an exact expectation
    assert ran >= 3 * n_cells


def test_update_benchmark_is_perfs_timed_unit():
    work, updates = grid.workload("copy", "chunked")
    assert work.cfg.method == "chunked:k=4" and work.cfg.threads == grid.THREADS == torch.get_num_threads()
    assert len(updates) == grid.tiny_size("copy")[0] // 4  # chunked:k=4 over T = 24
    before = [p.detach().clone() for p in work.model.parameters()]
    work.sequence(updates)
    assert all(p.grad is None for p in work.model.parameters())
    assert all(not torch.equal(a, p) for a, p in zip(before, work.model.parameters()))  # one Adam step each


def test_full_bptt_has_no_bias():
    for task in grid.grid()[0]:
        figures = gradient_bias.bias_figures(task, "full")
        assert figures["relative_bias"] == 0.0
        assert abs(figures["one_minus_cosine"]) < 1e-12


# ------------------------------------------------------------------ bias figures = tbptt-bench bias

def cli_bias(task: str, spec: str, capsys: pytest.CaptureFixture[str]) -> dict:
    """``tbptt-bench bias`` on the cell, over the benchmark's :data:`gradient_bias.N_BATCHES` batches."""
    seq_len, batch, hidden = grid.tiny_size(task)
    argv = ["bias", "--task", task, "--model", grid.MODEL, "--method", spec, "--seq-len", str(seq_len),
            "--batch", str(batch), "--hidden", str(hidden), "--seed", str(grid.SEED),
            "--batches", str(gradient_bias.N_BATCHES), "--dtype", gradient_bias.DTYPE, "--flips", "0",
            "--max-lag", "0", "--expectation", "exact", "--json"]
    capsys.readouterr()
    assert cli_main(argv) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    (row,) = [r for r in rows if r["group"] == "all"]
    assert row["spec"] == spec
    return row


def test_bias_track_equals_the_bias_command(capsys, monkeypatch):
    """Every task with the suite's tbptt spec, and every family on copy; both sides over 8 batches (the figure
    is the same computation at any count; 64, the benchmark's, makes this test 8x longer)."""
    monkeypatch.setattr(gradient_bias, "N_BATCHES", 8)
    tasks, families = grid.grid()
    cells = sorted({(task, "tbptt") for task in tasks} | {("copy", family) for family in families})
    for task, family in cells:
        spec = grid.representative_spec(family, grid.tiny_size(task)[0])
        row = cli_bias(task, spec, capsys)
        bench = gradient_bias.GradientBias()
        if row["exact_relative_bias"] is None:  # no exact expectation: the test of zero bias is tracked
            with pytest.raises(NotImplementedError):
                bench.setup(task, family)
            continue
        bench.setup(task, family)
        assert bench.track_relative_bias(task, family) == row["exact_relative_bias"], (task, spec)
        if parse_method(spec).deterministic:
            alignment = gradient_bias.GradientAlignment()
            alignment.setup(task, family)
            assert alignment.track_one_minus_cosine(task, family) == 1.0 - row["cosine_mean"], (task, spec)


# ------------------------------------------------------------------------------ plugins and asv

PLUGIN = textwrap.dedent(
    '''
    from tbptt_bench.tasks import register_task
    from tbptt_bench.tasks.adding import AddingTask


    @register_task
    class LongAdding(AddingTask):
        name = "adding-long"
        tiny = {"seq_len": 20, "batch_size": 2, "hidden_size": 4}
    '''
)

PLUGIN_CHECK = textwrap.dedent(
    '''
    import json
    from asv_bench import gradient_bias, update
    bench = update.CPUUpdate()
    bench.setup("adding-long", "tbptt")
    bench.time_update("adding-long", "tbptt")
    print(json.dumps({"params": update.CPUUpdate.params,
                      "bias": gradient_bias.bias_figures("adding-long", "tbptt")}))
    '''
)


def test_a_plugin_task_appears_in_every_benchmark(tmp_path):
    (tmp_path / "long_adding.py").write_text(PLUGIN)
    env = {**os.environ, "TBPTT_BENCH_PLUGINS": str(tmp_path), "PYTHONPATH": str(BENCH_DIR)}
    out = subprocess.run([sys.executable, "-c", PLUGIN_CHECK], env=env, capture_output=True, text=True,
                         timeout=300, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert "adding-long" in result["params"][0]
    assert result["params"][0] == sorted(TASKS.names() + ["adding-long"])
    assert 0 < result["bias"]["relative_bias"] < 1


@pytest.mark.slow  # ~10-25 s; .ci/run runs `asv check` and the asv smoke run every time
@pytest.mark.skipif(shutil.which("asv") is None, reason="asv is not installed")
def test_asv_accepts_the_configuration():
    config = json.loads((ROOT / "asv.conf.json").read_text())
    assert config["benchmark_dir"] == "benchmarks/asv_bench"
    assert all(config[k].startswith(".asv/") for k in ("env_dir", "results_dir", "html_dir"))
    proc = subprocess.run(["asv", "check", "-E", "existing:same"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "No problems found" in proc.stdout


# ------------------------------------------------------------------------------------ asv_compare

# Excerpts of `asv compare --factor 1 BASE HEAD` from docs/regression.md's demonstration: HEAD makes
# every window one fused call per step (slower, same gradients to rounding) ...
SLOWED = """
| Change   | Before [8a3e71ff] <main~1>   | After [d469ed3d] <main>   | Ratio   | Benchmark (Parameter)                                                          |
|----------|------------------------------|---------------------------|---------|--------------------------------------------------------------------------------|
|          | n/a                          | n/a                       | n/a     | gpu.GPUUpdate.track_gpu_peakmem('copy', 'full')                                |
| -        | 0.014636398748169355         | 0.014636398748169133      | 1.00    | gradient_bias.GradientBias.track_one_minus_cosine('adding', 'stepped')         |
| +        | 0.0030450276558202077        | 0.0030450276558202133     | 1.00    | gradient_bias.GradientBias.track_relative_bias('copy', 'tbptt')                |
| +        | 438M                         | 438M                      | 1.00    | update.CPUUpdate.peakmem_update('adding', 'chunked')                           |
| +        | 2.96±0.1ms                   | 4.74±0.1ms                | 1.60    | update.CPUUpdate.time_update('adding', 'sliding')                              |
| +        | 813±30μs                     | 7.18±0.2ms                | 8.83    | update.CPUUpdate.time_update('copy', 'full')                                   |
| +        | 6.41±0.03ms                  | 7.52±0.07ms               | 1.17    | update.CPUUpdate.time_update('copy', 'sliding')                                |
"""

# ... or moves tbptt's window by one step (a semantic change).
SEMANTICS = """
| Change   | Before [8a3e71ff] <main~1>   | After [4273cd68] <semantics>   | Ratio   | Benchmark (Parameter)                                                          |
|----------|------------------------------|--------------------------------|---------|--------------------------------------------------------------------------------|
| +        | 0.0015741907525637089        | 0.012736077686297809           | 8.09    | gradient_bias.GradientBias.track_one_minus_cosine('copy', 'chunked')           |
|          | 0.010244751527167776         | 0.010244751527167776           | 1.00    | gradient_bias.GradientBias.track_relative_bias('copy', 'sliding')              |
| +        | 0.0030450276558202077        | 0.0060246956296654925          | 1.98    | gradient_bias.GradientBias.track_relative_bias('copy', 'tbptt')                |
|          | 4.76±0.2ms                   | 5.22±0.2ms                     | ~1.10   | update.CPUUpdate.time_update('adding', 'adaptive')                             |
"""

# When every value in a column is a number, asv's table prints 6 significant digits (`asv continuous
# -b track_` in an earlier run of the same demonstration, benchmarks then named track_relative_error).
NUMERIC = """
| Change   |   Before [a6b814c0] <main~1> |   After [b1b32b0b] <semantics> |   Ratio | Benchmark (Parameter)                                                   |
|----------|------------------------------|--------------------------------|---------|-------------------------------------------------------------------------|
| +        |                  6.61971e-07 |                    2.20361e-06 |    3.33 | gradient_bias.GradientBias.track_one_minus_cosine('copy', 'tbptt')      |
| +        |                  0.0338385   |                    0.0512432   |    1.51 | gradient_bias.GradientBias.track_relative_error('adding', 'tbptt')      |
|          |                  0.0338385   |                    0.0338385   |    1    | gradient_bias.GradientBias.track_relative_error('copy', 'sliding')      |
"""


def verdicts(text: str, *rules: asv_compare.Rule) -> dict[str, str]:
    chosen = rules or asv_compare.DEFAULT_RULES
    return {row.name: asv_compare.judge(row, chosen).status for row in asv_compare.parse_table(text.splitlines())}


def test_summary_flags_the_slowed_commit_and_nothing_else():
    got = verdicts(SLOWED)
    assert list(got.values()) == ["skipped", "ok", "ok", "ok", "fail", "fail", "ok"]


def test_summary_flags_any_change_of_a_deterministic_figure():
    assert list(verdicts(SEMANTICS).values()) == ["fail", "ok", "fail", "ok"]
    assert list(verdicts(NUMERIC).values()) == ["fail", "fail", "ok"]
    row = asv_compare.parse_table(SEMANTICS.splitlines())[2]
    verdict = asv_compare.judge(row, asv_compare.DEFAULT_RULES)
    assert verdict.rule.prefix == "track_" and "0.0030450276558202077 → 0.0060246956296654925" in verdict.detail


def test_exact_rule_tolerance_is_relative_plus_absolute():
    rule = asv_compare.Rule("track_", rtol=1e-3, atol=1e-9)
    row = lambda a, b: asv_compare.Row("+", a, b, "1.00", "m.C.track_x('copy', 'full')")  # noqa: E731
    assert asv_compare.judge(row("1.0", "1.0009"), [rule]).status == "ok"
    assert asv_compare.judge(row("1.0", "1.0011"), [rule]).status == "fail"
    assert asv_compare.judge(row("1.0", "0.9989"), [rule]).status == "fail"  # either direction
    assert asv_compare.judge(row("0.0", "5e-10"), [rule]).status == "ok"
    assert asv_compare.judge(row("0.0", "2e-9"), [rule]).status == "fail"


def test_failures_marks_and_skips():
    table = """
| Change   | Before [aaaa] | After [bbbb] | Ratio | Benchmark (Parameter) |
|----------|---------------|--------------|-------|-----------------------|
| !        | 1.00±0ms      | failed       | n/a   | update.CPUUpdate.time_update('copy', 'full') |
|          | failed        | failed       | n/a   | update.CPUUpdate.time_update('copy', 'tbptt') |
| *        | failed        | 2.00±0ms     | n/a   | update.CPUUpdate.time_update('copy', 'sliding') |
| x        | 1.00±0ms      | 3.00±0ms     | 3.00  | update.CPUUpdate.time_update('adding', 'full') |
|          | n/a           | n/a          | n/a   | gpu.GPUUpdate.track_gpu_peakmem('copy', 'full') |
|          | 1.00±0.5ms    | 1.60±0.5ms   | ~1.60 | update.CPUUpdate.time_update('adding', 'tbptt') |
| +        | 1.00M         | 1.30M        | 1.30  | gpu.GPUUpdate.track_gpu_peakmem('adding', 'full') |
| +        | 1.00          | 1.10         | 1.10  | m.C.mem_other('adding', 'full') |
"""
    got = list(verdicts(table).values())
    assert got == ["fail", "fail", "skipped", "not comparable", "skipped", "ok", "fail", "unmatched"]


def test_longest_prefix_wins_and_overrides_apply():
    rules = asv_compare.build_rules(["time_=2", "track_gpu_time=1.5"], ["track_=1e-3"])
    assert asv_compare.rule_for("track_gpu_time_per_update", rules).factor == 1.5
    assert asv_compare.rule_for("track_gpu_peakmem", rules).factor == 1.3
    assert asv_compare.rule_for("track_relative_bias", rules).rtol == 1e-3
    got = verdicts(SLOWED, *rules)
    assert [n for n, s in got.items() if s == "fail"] == ["update.CPUUpdate.time_update('copy', 'full')"]


def run_main(argv: list[str], stdin: str, monkeypatch, capsys) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = asv_compare.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_command_exit_status_and_summary(monkeypatch, capsys, tmp_path):
    code, out, _ = run_main(["-"], SLOWED, monkeypatch, capsys)
    assert code == 1 and "FAIL: 7 benchmarks, 2 failed checks" in out
    assert "time_*            3 /   2 /   0" in out
    code, out, _ = run_main(["-", "--factor", "time_=10"], SLOWED, monkeypatch, capsys)
    assert code == 0 and out.rstrip().endswith("PASS: 7 benchmarks, 0 failed checks")
    code, out, _ = run_main(["-"], "\nBENCHMARKS NOT SIGNIFICANTLY CHANGED.\n", monkeypatch, capsys)
    assert code == 0 and "PASS: 0 benchmarks" in out
    for argv, stdin in ((["-"], "no table here\n"), (["-", "--factor", "time_"], SLOWED),
                        (["-", "--factor", "time_=0.5"], SLOWED), ([str(tmp_path / "missing.txt")], "")):
        code, out, err = run_main(argv, stdin, monkeypatch, capsys)
        assert code == 2 and err.startswith("asv_compare: error: ") and err.count("\n") == 1, (argv, err)


def test_compare_script_runs_without_torch():
    code = "import sys; sys.modules['torch'] = None; from tbptt_bench import asv_compare; print(asv_compare.Rule)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
