"""Declared once: each command's flags and each suite's keys come from one dataclass declaration, each
measure's tables and metric directions from one table (tbptt_bench.options, tbptt_bench.suites.measures)."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import tomllib

import pandas as pd
import pytest

from tbptt_bench.cli import build_parser
from tbptt_bench.commands import grad as grad_command
from tbptt_bench.commands import train as train_command
from tbptt_bench.commands.perf import GRID, configs_from_args
from tbptt_bench.commands.train import config_from_args
from tbptt_bench.errors import UsageError
from tbptt_bench.options import REQUIRED, declared, from_args, option
from tbptt_bench.perf.config import PerfConfig
from tbptt_bench.report.common import _metric_labels
from tbptt_bench.suites import measures
from tbptt_bench.suites.jobs import MEASURES, GridPoint, run_cell
from tbptt_bench.suites.schema import MEASURE_TABLES, SIDE_TABLES
from tbptt_bench.suites.suite import parse_suite
from tbptt_bench.training.loop import TrainConfig


def _subparser(command: str) -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def _parse(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(argv)


# --------------------------------------------------------------------------- command-line defaults

COMMAND_OPTIONS = {
    "train": lambda: {**TrainConfig.options(), **train_command.SNAPSHOT},
    "perf": PerfConfig.options,
    "bias": measures.bias_options,
    "grad": lambda: grad_command.OPTIONS,
}


@pytest.mark.parametrize("command", sorted(COMMAND_OPTIONS))
def test_every_flag_default_is_its_declarations_default(command: str) -> None:
    """Each flag of a declared option parses, when not given, to the dataclass field's default: a flag whose
    default differs from its dataclass's fails here (grid flags of perf: their default alone)."""
    options = COMMAND_OPTIONS[command]()
    actions = {a.dest: a for a in _subparser(command)._actions}
    flagged = [name for name, o in options.items() if o.flag.flag is not None]
    assert flagged, command
    for name in flagged:
        action, o = actions[name], options[name]
        if o.flag.action == "append" or (command == "perf" and name in GRID):
            assert action.default == [], name
        else:
            assert action.default == (None if o.default is REQUIRED else o.default), (command, name)


def test_train_and_perf_without_flags_are_their_dataclasses() -> None:
    assert config_from_args(_parse(["train"])).flat() == TrainConfig().flat()
    [config] = configs_from_args(_parse(["perf"]))
    assert config.flat() == PerfConfig().flat()


def test_bias_without_flags_is_a_suites_bias_cell() -> None:
    """The bias command and a suite's [[bias]] block: one set of defaults (they differed in dtype before)."""
    parsed = from_args(_parse(["bias"]), measures.bias_options())
    suite = MEASURES["bias"].schema()
    shared = set(parsed) & set(suite)
    assert {"dtype", "n_batches", "n_flips", "seq_len", "batch_size", "hidden_size", "fast"} <= shared
    for name in shared:
        assert parsed[name] == suite[name][1], name


def test_bias_flips_are_the_statistics_default() -> None:
    """One number of sign flips: the bias command, suites, BiasOptions, train --bias-at snapshots and the
    statistics module (bias_snapshots used 1000 before)."""
    from tbptt_bench.analysis.bias import BiasOptions, bias_snapshots
    from tbptt_bench.analysis.expectation import DEFAULT_FLIPS

    assert BiasOptions.n_flips == DEFAULT_FLIPS
    assert inspect.signature(bias_snapshots).parameters["n_flips"].default == DEFAULT_FLIPS
    batches = inspect.signature(bias_snapshots).parameters["n_batches"].default
    assert batches == train_command.SNAPSHOT["n_batches"].default == _parse(["train"]).n_batches == 4
    assert from_args(_parse(["bias"]), measures.bias_options())["n_flips"] == DEFAULT_FLIPS


def test_grad_defaults_and_flags() -> None:
    values = from_args(_parse(["grad", "--method", "full", "--hidden", "5", "--task-param", "n_remember=3"]),
                       grad_command.OPTIONS)
    assert values["hidden_size"] == 5 and values["seq_len"] == 40 and values["batch_size"] == 4
    assert values["task_params"] == {"n_remember": 3}


@pytest.mark.parametrize("argv, message", [
    (["bias", "--batches", "0"], "--batches must be ≥ 1, got 0"),
    (["bias", "--ci", "1"], "--ci must be in (0, 1), got 1"),
    (["bias", "--flips", "-1"], "--flips must be ≥ 0, got -1"),
    (["train", "--max-tokens", "0"], "--max-tokens must be ≥ 1, got 0"),
    (["train", "--bias-batches", "0"], "--bias-batches must be ≥ 1, got 0"),
    (["train", "--clip-norm", "-1"], "--clip-norm must be ≥ 0, got -1"),
    (["perf", "--seq-len", "8,0"], "--seq-len takes integers ≥ 1 separated by commas"),
    (["perf", "--path", "fused,gpu"], "unknown --path 'gpu'; accepted: fused, cell"),
])
def test_flag_values_are_checked_against_their_declaration(argv: list[str], message: str) -> None:
    args = _parse(argv)
    options = COMMAND_OPTIONS[argv[0]]()
    with pytest.raises(UsageError) as info:
        if argv[0] == "perf":
            configs_from_args(args)
        else:
            from_args(args, options)
    assert message in str(info.value)


def test_clip_zero_means_none() -> None:
    assert config_from_args(_parse(["train", "--clip-norm", "0"])).clip is None
    assert config_from_args(_parse(["train", "--clip", "2.5"])).clip == 2.5


def test_a_field_without_a_declaration_is_refused() -> None:
    @dataclasses.dataclass
    class Half:
        a: int = option(1, flag="--a", help="declared")
        b: int = 2

    with pytest.raises(TypeError, match="Half.b has no declaration"):
        declared(Half)
    assert list(declared(Half, skip={"b"})) == ["a"]


# --------------------------------------------------------------------------- suite validation

BIAS_SUITE = """
[suite]
name = "b"

[[bias]]
task = "adding"
model = "rnn"
methods = ["chunked:k=2"]
seq_len = 8
{extra}
"""


@pytest.mark.parametrize("extra, message", [
    ("colour = 1", "unknown key 'colour'; accepted: "),
    ('expectation = "maybe"', "block 1: unknown expectation 'maybe'; accepted: sampled, exact"),
    ("n_flips = -1", "block 1: n_flips must be ≥ 0, got -1"),
    ("ci_level = 1.5", "block 1: ci_level must be in (0, 1), got 1.5"),
    ('split = "dev"', "unknown split 'dev'; accepted: train, valid, test"),
    ("n_batches = 0", "n_batches must be ≥ 1, got 0"),
    ('n_batches = "8"', "n_batches = '8' must be an integer"),
])
def test_bias_suite_keys_are_checked_against_their_declaration(extra: str, message: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_suite(tomllib.loads(BIAS_SUITE.format(extra=extra)), source="b.toml")
    text = str(info.value)
    assert message in text and "\n" not in text
    if "unknown key" in message:  # the accepted keys are the declared ones
        for name in measures.bias_options():
            if name != "seed":
                assert name in text


def test_bias_suite_defaults_come_from_the_declaration() -> None:
    suite = parse_suite(tomllib.loads(BIAS_SUITE.format(extra="")), source="b.toml")
    params = suite.cells[0].params
    options = measures.bias_options()
    for name, value in params.items():
        if name not in ("seed", "task", "model", "methods", "seq_len"):
            assert value == options[name].default, name
    assert params["dtype"] == "float64" and params["n_flips"] == 999


# --------------------------------------------------------------------------- measures

def test_every_measure_and_table_is_declared_once() -> None:
    assert set(MEASURES) == set(measures.MEASURE_NAMES)
    assert MEASURE_TABLES == {m: m for m in measures.MEASURE_NAMES}
    assert set(SIDE_TABLES) | set(MEASURE_TABLES.values()) == set(measures.TABLES)
    for name, measure in MEASURES.items():
        assert measure.tables[0] == name and set(measure.tables) <= set(measures.TABLES)
    for table in measures.TABLES.values():
        assert table.measure in MEASURES
        for metric in table.metrics:
            assert metric.better in (measures.HIGHER, measures.LOWER, measures.TASK), (table.name, metric.name)
            assert metric.what


def test_metric_direction_is_declared_not_guessed() -> None:
    """The report reads a metric's direction from its declaration: fixed per metric, or the row's task's
    (the stored column, else the registered task). A name that looks like accuracy decides nothing."""
    assert measures.higher_is_better("perf", "tokens_per_s", {}) is True
    assert measures.higher_is_better("perf", "ms_per_update", {}) is False
    assert measures.higher_is_better("bias", "relative_bias", {}) is False
    frame = pd.DataFrame({"task": ["copy", "adding", "plug", "plug2"],
                          "metric_name": ["accuracy", "mse", "acc", "acc"],
                          measures.TASK_DIRECTION: [None, None, False, True]})
    labels = _metric_labels(frame).set_index("task")["higher"].to_dict()
    assert labels == {"copy": True, "adding": False, "plug": False, "plug2": True}
    with pytest.raises(UsageError, match="do not say whether their eval_metric is better"):
        _metric_labels(pd.DataFrame({"task": ["nope"], "metric_name": ["accuracy"]}))
    with pytest.raises(UsageError, match="declares no metric 'accuracy'"):
        measures.higher_is_better("train", "accuracy", {})


def test_a_train_cell_writes_its_tasks_direction() -> None:
    params = {**TrainConfig(task="adding", model="rnn", method="full", steps=1, seq_len=6, batch_size=2,
                            hidden_size=3, eval_every=1, eval_batches=1).flat()}
    result = run_cell(GridPoint("s", "train", params, "k", 0))
    assert result.status == "ok", result.error
    for table in ("train", "curves"):
        assert {row[measures.TASK_DIRECTION] for row in result.tables[table]} == {False}
