"""Bad input from a hostile user: every sub-command, fed random and adversarial flag values, ends with
exit status 0, 1 or 2, never a traceback; exit 2 is exactly one line on stderr and leaves no file
behind (docs/reliability.md). Plus one parametrised regression test per class of the issue-15 findings.
"""

from __future__ import annotations

import io
import itertools
import logging
import textwrap
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tbptt_bench.cli import main
from tbptt_bench.errors import UsageError
from tbptt_bench.methods.length import keeps_every_lag, long_window_note
from tbptt_bench.methods.base import parse_method
from tbptt_bench.registry import Registry
from tbptt_bench import validation

TINY = ["--task", "adding", "--model", "rnn", "--seq-len", "6", "--batch", "2", "--hidden", "3"]
NUMBERS = ["", "0", "-1", "2.5", "inf", "-inf", "nan", "1e400", "abc", "99999999999999999999", "1000000000000", "é"]
UNWRITABLE = "/proc/tbptt-bench-out.csv"  # the folder exists, but no file can be created in it (even as root)

SUITE = """
[suite]
name = "hostile"
seed = 1

[[train]]
task = "adding"
model = "rnn"
method = "chunked:k=2"
seq_len = 6
batch_size = 2
hidden_size = 3
steps = 2
eval_every = 1
eval_batches = 1
dtype = "{dtype}"
lr = {lr}
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Suite files (good and bad), a file standing where a folder is expected, and a small result store."""
    root = tmp_path_factory.mktemp("hostile")
    (root / "afile").write_text("not a folder")
    for name, dtype, lr in [("good", "float64", "0.01"), ("float16", "float16", "0.01"), ("inflr", "float64", "inf"),
                            ("nanlr", "float64", "nan")]:
        (root / f"{name}.toml").write_text(textwrap.dedent(SUITE.format(dtype=dtype, lr=lr)))
    (root / "huge.toml").write_text(textwrap.dedent(SUITE.format(dtype="float64", lr="0.01")).replace(
        "seq_len = 6", "seq_len = 1000000000000"))
    with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
        assert main(["run", str(root / "good.toml"), "--results", str(root / "store"), "--quiet"]) == 0
    return {"root": root, "afile": root / "afile", "store": root / "store" / "hostile"}


def _paths(world: dict[str, Path], out: Path, name: str) -> list[str]:
    return [str(out / name), UNWRITABLE, str(world["afile"] / name), str(out), "", str(out / "missing" / name)]


def flag_values(command: str, world: dict[str, Path], out: Path) -> dict[str, list[str]]:
    """Per flag: adversarial values (the base arguments hold a valid tiny value for each)."""
    paths = lambda name: _paths(world, out, name)  # noqa: E731
    common = {f: NUMBERS for f in ("--seq-len", "--batch", "--hidden", "--layers", "--seed")}
    common |= {"--task": ["nope", "", "copy"], "--model": ["nope", ""], "--dtype": ["float16", ""],
               "--device": ["tpu", "cuda:99", ""], "--task-param": ["x", "=1", "n_remember=inf", "lag=1e400", "a=b"],
               "--path": ["nope"]}
    specs = ["", "chunked:k=inf", "tbptt:k1=1e400,k2=2", "sliding:k=nan", "chunked:k=100", "nope:k=1", "x:y",
             "chunked:k=2,k=3", "chunked:k=-1", "artbp:c=inf"]
    return {
        "tasks": {"--json": [""], "--bogus": [""]},
        "explain": {"SPEC": specs, "--seq-len": NUMBERS + ["2001"]},
        "grad": common | {"--method": specs, "--save": paths("g.npz")},
        "train": common | {f: NUMBERS for f in ("--steps", "--eval-every", "--eval-batches", "--max-tokens",
                                                "--bias-batches", "--lr", "--clip")}
                 | {"--method": specs, "--optimizer": ["rmsprop"], "--bias-at": ["x", "-1", "1e400", "3"],
                    "--bias-methods": ["nope"], "--save": paths("c.json")},
        "bias": common | {f: NUMBERS for f in ("--k", "--batches", "--flips", "--ci", "--probes", "--max-lag",
                                               "--true-checkpoint", "--warmup", "--fit-from")}
                | {"--split": ["nope"], "--save": paths("b.csv") + [str(out / "b.txt")],
                   "--figure": paths("b.png") + [str(out / "b.gif")], "--method": specs},
        "perf": common | {f: NUMBERS + ["6,0", "6,,6"] for f in ("--seq-len", "--batch", "--hidden", "--layers")}
                | {f: NUMBERS for f in ("--threads", "--repeats", "--warmup", "--lr", "--timeout")}
                | {"--memory-limit": ["abc", "0", "1e400", "9" * 30 + "T"], "--optimizer": ["x"],
                   "--method": ["k=2", "", "chunked:k=inf", "chunked:k=100"], "--model": ["rnn,nope"],
                   "--save": paths("p.csv") + [str(out / "p.txt")]},
        "run": {"SUITE": [str(world["root"] / f"{n}.toml") for n in ("float16", "inflr", "nanlr", "huge", "missing")]
                + ["nope", ""], "--results": [UNWRITABLE, str(world["afile"]), ""],
                "--jobs": NUMBERS, "--threads": NUMBERS, "--only": ["zzz", ""], "--executor": ["nope"],
                "--ray-address": ["nohost"]},
        "report": {"RESULTS": [str(out / "missing"), str(world["afile"])],
                   "--out": [UNWRITABLE, str(world["afile"]), str(world["afile"] / "r"), ""],
                   **{f: NUMBERS for f in ("--alpha", "--confidence", "--resamples", "--dpi", "--seed")},
                   "--target": ["nope=1", "adding=inf", "adding=nan", "adding", "=1", "copy=0.5"],
                   "--compare": ["x", "full vs nope"], "--test": ["nope"], "--formats": ["gif", ""]},
    }[command]


def base_args(command: str, world: dict[str, Path], out: Path) -> list[str]:
    """Valid tiny arguments: each run takes well under a second (report: a few)."""
    return {
        "tasks": ["tasks"],
        "explain": ["explain", "chunked:k=2", "--seq-len", "6"],
        "grad": ["grad", *TINY, "--method", "chunked:k=2"],
        "train": ["train", *TINY, "--method", "chunked:k=2", "--steps", "2", "--eval-every", "1",
                  "--eval-batches", "1", "--quiet"],
        "bias": ["bias", *TINY, "--method", "chunked", "--k", "2", "--batches", "2", "--flips", "10", "--max-lag", "2"],
        "perf": ["perf", *TINY, "--method", "chunked:k=2", "--repeats", "1", "--warmup", "0", "--in-process",
                 "--threads", "1"],
        "run": ["run", str(world["root"] / "good.toml"), "--results", str(out), "--list"],
        "report": ["report", str(world["store"]), "--out", str(out / "report"), "--formats", "png", "--dpi", "20",
                   "--resamples", "100"],
    }[command]


def apply(args: list[str], flag: str, value: str) -> list[str]:
    """``args`` with ``flag`` set to ``value`` (positional SPEC/SUITE/RESULTS replace the first operand)."""
    if flag in ("SPEC", "SUITE", "RESULTS"):
        return [args[0], value, *args[2:]]
    if flag in ("--json", "--bogus"):
        return [*args, flag]
    return [*args, flag, value]  # argparse keeps the last value given


def run_cli(argv: list[str]) -> tuple[int, str]:
    """``main(argv)`` in this process with stdout and stderr captured; any escaping exception fails."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = main(argv)
        except BaseException as exc:  # noqa: BLE001 - the promise is that nothing escapes
            pytest.fail(f"{argv}: {type(exc).__name__} escaped main: {exc}")
    return code, err.getvalue()


def check_promise(argv: list[str], out: Path) -> int:
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    code, err = run_cli(argv)
    assert code in (0, 1, 2), (argv, code, err)
    assert "Traceback" not in err, (argv, err)
    if code == 2:
        assert err.endswith("\n") and err.count("\n") == 1 and ": error: " in err, (argv, err)
        after = sorted(p.relative_to(out) for p in out.rglob("*"))
        assert after == before, (argv, "files left behind", set(after) - set(before))
    return code


COMMANDS = ["tasks", "explain", "grad", "train", "bias", "perf", "run", "report"]
EXAMPLES = {"tasks": 5, "explain": 40, "grad": 40, "train": 30, "bias": 30, "perf": 30, "run": 30, "report": 20}
_counter = itertools.count()


@pytest.mark.parametrize("command", COMMANDS)
def test_hostile_flags_never_break_the_promise(command: str, world: dict[str, Path]) -> None:
    root = world["root"]
    flags = flag_values(command, world, root)  # paths are re-made per example below

    @settings(max_examples=EXAMPLES[command], deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(st.tuples(st.sampled_from(sorted(flags)), st.integers(0, 1000)), max_size=2))
    def one(picks: list[tuple[str, int]]) -> None:
        out = root / f"out{next(_counter)}"
        out.mkdir()
        values = flag_values(command, world, out)
        argv = base_args(command, world, out)
        for flag, index in picks:
            options = values[flag]
            argv = apply(argv, flag, options[index % len(options)])
        check_promise(argv, out)

    logging.disable(logging.WARNING)  # warnings go to the log, not to the captured stderr
    try:
        one()
    finally:
        logging.disable(logging.NOTSET)


# ---------------------------------------------------------------------------------------- regressions

@pytest.mark.parametrize("argv, message", [
    (["explain", "chunked:k=inf", "--seq-len", "6"], "not a finite number"),
    (["explain", "tbptt:k1=1e400,k2=2", "--seq-len", "6"], "not a finite number"),
    (["explain", "artbp:c=nan", "--seq-len", "6"], "not a finite number"),
    (["grad", *TINY, "--method", "full", "--task-param", "n=1e400"], "finite number"),
    (["train", *TINY, "--method", "full", "--lr", "inf", "--quiet"], "--lr must be a finite number"),
    (["train", *TINY, "--method", "full", "--steps", "1e400", "--quiet"], "invalid int value"),
    (["bias", *TINY, "--k", "2", "--ci", "nan"], "--ci must be a finite number"),
    (["perf", *TINY, "--timeout", "inf"], "--timeout must be a finite number"),
    (["perf", *TINY, "--memory-limit", "9" * 400], "--memory-limit"),
])
def test_non_finite_numbers_are_refused(argv: list[str], message: str) -> None:
    code, err = run_cli(argv)
    assert code == 2 and message in err and err.count("\n") == 1, err


@pytest.mark.parametrize("lr, message", [("inf", "finite number"), ("nan", "finite number"), ("1e400", "finite number")])
def test_non_finite_numbers_in_suite_files_are_refused(tmp_path: Path, lr: str, message: str) -> None:
    suite = tmp_path / "s.toml"
    suite.write_text(textwrap.dedent(SUITE.format(dtype="float64", lr=lr)))
    code, err = run_cli(["run", str(suite), "--results", str(tmp_path / "r")])
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("flag, suffix", [("grad --save", ".npz"), ("train --save", ".json"), ("bias --save", ".csv"),
                                          ("bias --figure", ".png"), ("perf --save", ".csv"), ("report --out", ""),
                                          ("run --results", "")])
@pytest.mark.parametrize("where", ["unwritable", "file-as-folder"])
def test_output_paths_are_checked_before_work(tmp_path: Path, world: dict[str, Path], flag: str, suffix: str,
                                              where: str) -> None:
    command, option = flag.split()
    target = UNWRITABLE.replace(".csv", suffix) if where == "unwritable" else str(world["afile"] / f"x{suffix}")
    if command == "report" or command == "run":
        target = "/proc/tbptt-bench-dir" if where == "unwritable" else str(world["afile"])
    args = {"grad": ["grad", *TINY, "--method", "full"], "train": ["train", *TINY, "--quiet"],
            "bias": ["bias", *TINY, "--k", "2"], "perf": ["perf", *TINY, "--in-process"],
            "report": ["report", str(world["store"])], "run": ["run", str(world["root"] / "good.toml")]}[command]
    code, err = run_cli([*args, option, target])
    assert code == 2 and err.count("\n") == 1 and ("not writable" in err or "is a file" in err
                                                   or "a file stands there" in err or "does not exist" in err), err


@pytest.mark.parametrize("argv", [
    ["grad", *TINY, "--method", "full", "--hidden", str(10**9)],
    ["grad", *TINY, "--method", "full", "--batch", str(10**12)],
    ["train", *TINY, "--seq-len", str(10**13), "--quiet"],
    ["bias", *TINY, "--k", "2", "--hidden", str(10**9)],
    ["perf", *TINY, "--in-process", "--seq-len", f"6,{10**13}"],
])
def test_sizes_that_cannot_be_allocated_are_refused(argv: list[str]) -> None:
    code, err = run_cli(argv)
    assert code == 2 and "use smaller sizes" in err and err.count("\n") == 1, err


def test_a_huge_suite_cell_is_read_without_a_crash(world: dict[str, Path]) -> None:
    """Checking a cell whose data cannot be allocated here does not crash the reading of the suite: the
    cell stays in the grid (it may run on a larger Ray node; where it does not fit it is recorded as oom)."""
    out = io.StringIO()
    with redirect_stdout(out), redirect_stderr(io.StringIO()) as err:
        code = main(["run", str(world["root"] / "huge.toml"), "--list"])
    assert code == 0 and "1 cells" in out.getvalue() and "Traceback" not in err.getvalue(), err.getvalue()


@pytest.mark.parametrize("argv", [
    ["explain", "chunked:k=100", "--seq-len", "6"],
    ["grad", *TINY, "--method", "chunked:k=100", "--json"],
    ["train", *TINY, "--method", "sliding:k=100", "--steps", "1", "--eval-every", "1", "--quiet"],
    ["bias", *TINY, "--method", "chunked:k=100", "--batches", "2", "--flips", "10", "--max-lag", "2"],
    ["perf", *TINY, "--method", "tbptt:k1=100,k2=100", "--in-process", "--repeats", "1", "--warmup", "0"],
])
def test_k_longer_than_the_sequence_is_the_full_gradient_with_a_warning(argv: list[str],
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="tbptt_bench.methods.length"):
        code, err = run_cli(argv)
    assert code == 0, err
    assert any("exceeds the sequence length T=6" in r.message and "full gradient" in r.message
               for r in caplog.records)


def test_k_longer_than_the_sequence_gives_exactly_the_full_mask() -> None:
    """Independent check of the rule (docs/design.md §2.10) on the mask itself, entry by entry."""
    for spec in ("chunked:k=9", "sliding:k=9", "tbptt:k1=9,k2=9", "tbptt:k1=9,k2=20", "sliding:k=9,k1=2"):
        updates = parse_method(spec).updates(6)
        assert keeps_every_lag(updates)
        assert all(u.weight(t, s) == 1.0 for u in updates for t in range(u.loss_start, u.loss_end)
                   for s in range(t + 1)), spec
    note = long_window_note("tbptt:k1=9,k2=2", 6)
    assert note is not None and "full gradient" not in note  # k2 < T: the last 2 losses only
    assert not keeps_every_lag(parse_method("tbptt:k1=9,k2=2").updates(6))
    assert long_window_note("chunked:k=6", 6) is None


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", ""])
def test_unknown_suite_dtype_is_refused_when_read(tmp_path: Path, dtype: str) -> None:
    suite = tmp_path / "s.toml"
    suite.write_text(textwrap.dedent(SUITE.format(dtype=dtype, lr="0.01")))
    code, err = run_cli(["run", str(suite), "--list"])
    assert code == 2 and "unknown dtype" in err and err.count("\n") == 1, err


@pytest.mark.parametrize("target, message", [("nope=1", "unknown task 'nope'"), ("copy=0.5", "no 'copy' rows"),
                                             ("adding=inf", "finite number")])
def test_report_targets_must_name_tasks_in_the_results(tmp_path: Path, world: dict[str, Path], target: str,
                                                       message: str) -> None:
    code, err = run_cli(["report", str(world["store"]), "--out", str(tmp_path / "r"), "--target", target])
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("argv, message", [
    (["grad", "--hidden", "x", "--method", "full"], "tbptt-bench grad: error: argument --hidden: invalid int value"),
    (["nope"], "tbptt-bench: error: argument command: invalid choice"),
    ([], "tbptt-bench: error: the following arguments are required: command"),
    (["train", "--optimizer", "nosuchopt"], "tbptt-bench: error: unknown optimizer 'nosuchopt'"),
    (["explain", "full"], "tbptt-bench explain: error: the following arguments are required: --seq-len"),
])
def test_argument_errors_are_one_line(argv: list[str], message: str) -> None:
    code, err = run_cli(argv)
    assert code == 2 and err.startswith(message) and err.count("\n") == 1, err


@pytest.mark.parametrize("name", ["", " ", "a b", "1abc", "x/y", None, 3])
def test_registry_names_must_be_identifiers(name: object) -> None:
    with pytest.raises(UsageError, match="must be a non-empty name"):
        Registry("task").register(name, object())  # type: ignore[arg-type]


def test_validation_functions_against_their_rules() -> None:
    assert validation.integer("n", "12") == 12 and validation.integer("n", 8.0) == 8
    for bad in (True, 2.5, float("inf"), float("nan"), "1e400", "x", None, 0):
        with pytest.raises(UsageError):
            validation.integer("n", bad)
    assert validation.finite_float("x", "0.5", 0, 1, lo_open=True) == 0.5
    for bad in ("inf", "-inf", "nan", "1e400", True, "x", 0.0):
        with pytest.raises(UsageError):
            validation.finite_float("x", bad, 0, lo_open=True)
    assert validation.allocation("t", 10, 8, limit_bytes=80) == 80
    with pytest.raises(UsageError, match="needs at least 88 B but 80 B"):
        validation.allocation("t", 11, 8, limit_bytes=80)
    assert validation.run_elements(2, 3, 4, 5) == 5 * 16 + 2 * 3 * 4 + 2 * 3
    assert 0 < validation.available_memory()


def test_integer_lists_take_whole_numbers_at_or_above_the_minimum() -> None:
    from tbptt_bench.validation import integer_list

    assert integer_list("--k", "1, 2,,8") == [1, 2, 8]
    assert integer_list("update counts", "0,100", lo=0) == [0, 100]
    for bad, kwargs in (("1,x", {}), ("0,2", {}), ("1,inf", {}), ("-1", {"lo": 0}), ("256,,1024", {"skip_empty": False})):
        with pytest.raises(UsageError, match="separated by commas"):
            integer_list("--k", bad, **kwargs)
