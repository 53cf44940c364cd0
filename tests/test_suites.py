"""Suite files: validation errors, grid expansion, keys and the seed rule."""

from __future__ import annotations

import dataclasses
import itertools
import json
import tomllib

import pytest

from tbptt_bench.suites.jobs import MEASURES
from tbptt_bench.errors import UsageError
from tbptt_bench.seeding import derive_seed
from tbptt_bench.suites.suite import builtin_suites, cell_key, check_devices, find_suite, load_suite, parse_suite, select
from tbptt_bench.training.loop import TrainConfig

BASE = """
[suite]
name = "t"
seed = 7

[defaults]
seq_len = 8
batch_size = 2
hidden_size = 4

[[train]]
task = ["adding", "char-lm"]
model = ["rnn", "gru"]
method = ["full", "chunked:k=4", "tbptt:k1=2,k2=4"]
steps = 3
replicates = 2
"""


def parse(text: str):
    return parse_suite(tomllib.loads(text), source="test.toml")


def error_of(text: str) -> str:
    with pytest.raises(UsageError) as info:
        parse(text)
    return str(info.value)


# --------------------------------------------------------------------------- validation errors

@pytest.mark.parametrize("text, expected", [
    (BASE + "\n[extra]\nx = 1\n", "unknown key 'extra'"),
    (BASE.replace("steps = 3", "stepz = 3"), "unknown key 'stepz'"),
    (BASE.replace('seed = 7', 'seed = 7\ncolour = "red"'), "unknown key 'colour'"),
    (BASE.replace('"adding", "char-lm"', '"adding", "nope"'), "unknown task 'nope'"),
    (BASE.replace('"rnn", "gru"', '"rnn", "transformer"'), "unknown model 'transformer'"),
    (BASE.replace('"full", "chunked:k=4"', '"full", "tbtt:k=4"'), "unknown method 'tbtt'"),
    (BASE.replace('"full", "chunked:k=4"', '"full", "chunked:k=0"'), "must be an integer ≥ 1"),
    (BASE.replace('method = ["full", "chunked:k=4", "tbptt:k1=2,k2=4"]', "method = []"), "grid empty"),
    (BASE.replace("replicates = 2", "replicates = 0"), "replicates must be an integer ≥ 1"),
    (BASE.replace("steps = 3", 'steps = "three"'), "steps = 'three' must be an integer"),
    (BASE.replace("steps = 3", "steps = 0"), "[[train]] block 1: steps must be ≥ 1, got 0"),
    (BASE.replace("steps = 3", 'path = "gpu"'), "block 1: unknown path 'gpu'; accepted: fused, cell"),
    (BASE.replace("steps = 3", "lr = 0"), "lr must be > 0, got 0"),
    (BASE + "task_params = { copy = { n_remember = 3 } }\n", "task_params names task 'copy'"),
    (BASE + "task_params = { adding = { colour = 3 } }\n", "does not accept parameters"),
    (BASE.replace('"adding", "char-lm"', '"copy"'), "seq_len must be at least 21"),
    ('[suite]\nname = "t"\n', "defines no cells"),
    ("[suite]\nname = \"t\"\n[[sweep]]\ntask = 'copy'\n", "unknown key 'sweep'"),
    ('[suite]\nname = "../up"\n[[train]]\n', "name '../up' must be"),
])
def test_validation_errors_say_what_is_wrong(text: str, expected: str) -> None:
    assert expected in error_of(text)


def test_error_names_the_block() -> None:
    text = BASE + '\n[[train]]\ntask = "adding"\nmodel = "rnn"\nmethod = "full"\nlr = "fast"\n'
    message = error_of(text)
    assert "[[train]] block 2" in message and "lr = 'fast' must be a number" in message


def test_bad_toml_and_missing_file(tmp_path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[suite\n")
    with pytest.raises(UsageError, match="not valid TOML"):
        load_suite(str(bad))
    with pytest.raises(UsageError, match="does not exist"):
        load_suite(str(tmp_path / "absent.toml"))
    with pytest.raises(UsageError, match="unknown suite 'nosuch'; accepted: a built-in name"):
        load_suite("nosuch")


# --------------------------------------------------------------------------- expansion

def test_grid_is_the_product_of_axes_times_replicates() -> None:
    suite = parse(BASE)
    tasks, models = ["adding", "char-lm"], ["rnn", "gru"]
    methods = ["full", "chunked:k=4", "tbptt:k1=2,k2=4"]
    expected = {(r, t, m, me) for r, t, m, me in itertools.product(range(2), tasks, models, methods)}
    got = [(c.replicate, c.params["task"], c.params["model"], c.params["method"]) for c in suite.cells]
    assert len(got) == len(expected) == 24
    assert set(got) == expected
    assert [g[0] for g in got] == sorted(g[0] for g in got), "replicate is the outermost loop"
    for cell in suite.cells:
        assert cell.params["steps"] == 3 and cell.params["seq_len"] == 8
        assert cell.params["lr"] == TrainConfig().lr, "unset values take TrainConfig's defaults"
        assert cell.suite == "t" and cell.measure == "train"


def test_block_values_override_defaults_and_task_params_apply_per_task() -> None:
    text = BASE.replace("steps = 3", "steps = 3\nseq_len = 24").replace('"adding", "char-lm"', '"copy", "adding"')
    suite = parse(text + "[train.task_params.copy]\nn_remember = 3\n")
    for cell in suite.cells:
        assert cell.params["seq_len"] == 24
        expected = {"n_remember": 3} if cell.params["task"] == "copy" else {}
        assert cell.params["task_params"] == expected


def test_task_params_in_defaults_apply_to_the_blocks_that_run_the_task() -> None:
    text = BASE.replace("hidden_size = 4", "hidden_size = 4\ntask_params = { copy = { n_remember = 3 } }")
    text += '\n[[train]]\ntask = "copy"\nmodel = "rnn"\nmethod = "full"\nseq_len = 12\n'
    cells = parse(text).cells
    assert {c.params["task"]: c.params["task_params"] for c in cells} == {
        "adding": {}, "char-lm": {}, "copy": {"n_remember": 3}}


def test_identical_cells_from_two_blocks_are_kept_once() -> None:
    extra = '\n[[train]]\ntask = "adding"\nmodel = "rnn"\nmethod = "full"\nsteps = 3\nreplicates = 2\n'
    assert len(parse(BASE + extra).cells) == 24


def test_none_for_optional_values() -> None:
    cells = parse(BASE.replace("steps = 3", 'steps = 3\nclip = "none"\nlr = 1')).cells
    assert all(c.params["clip"] is None for c in cells)
    assert all(c.params["lr"] == 1.0 and isinstance(c.params["lr"], float) for c in cells)


# --------------------------------------------------------------------------- keys

def test_keys_are_stable_unique_and_ignore_spelling() -> None:
    a, b = parse(BASE), parse(BASE)
    assert [c.key for c in a.cells] == [c.key for c in b.cells]
    assert len({c.key for c in a.cells}) == len(a.cells)
    assert all(len(c.key) == 16 and int(c.key, 16) >= 0 for c in a.cells)
    spelled = BASE.replace('"chunked:k=4"', '"chunked: k = 4"').replace("steps = 3", 'steps = 3\noptimizer = "adam"')
    assert [c.key for c in parse(spelled).cells] == [c.key for c in a.cells]
    renamed = BASE.replace('name = "t"', 'name = "other"')
    assert [c.key for c in parse(renamed).cells] == [c.key for c in a.cells], "the key is the cell, not the suite"


def test_keys_change_with_parameters_seed_and_semantics_version() -> None:
    keys = {c.key for c in parse(BASE).cells}
    assert keys.isdisjoint(c.key for c in parse(BASE.replace("steps = 3", "steps = 4")).cells)
    assert keys.isdisjoint(c.key for c in parse(BASE.replace("seed = 7", "seed = 8")).cells)
    cell = parse(BASE).cells[0]
    bumped = dataclasses.replace(MEASURES["train"], version=MEASURES["train"].version + 1)
    assert cell_key(MEASURES["train"], cell.params) == cell.key
    assert cell_key(bumped, cell.params) != cell.key


def test_key_matches_its_documented_definition() -> None:
    import hashlib

    import tbptt_bench

    cell = parse(BASE).cells[5]
    params = {k: v for k, v in cell.params.items() if v is not None}
    assert len(params) < len(cell.params), "unset optional parameters (None) are left out of the key"
    payload = {"measure": "train", "semantics": MEASURES["train"].version, "package": tbptt_bench.__version__,
               "params": params}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    assert cell.key == hashlib.sha256(text.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- seeds

def test_seed_rule_pairs_methods_and_separates_replicates() -> None:
    cells = parse(BASE).cells
    by_pair: dict[tuple, set[int]] = {}
    for c in cells:
        by_pair.setdefault((c.replicate, c.params["task"], c.params["model"]), set()).add(c.params["seed"])
    assert all(len(s) == 1 for s in by_pair.values()), "cells differing only in method share a seed"
    seeds = [next(iter(s)) for s in by_pair.values()]
    assert len(set(seeds)) == len(seeds), "replicates, tasks and models get different seeds"


def test_seed_follows_the_documented_formula() -> None:
    cell = next(c for c in parse(BASE).cells if c.replicate == 1 and c.params["task"] == "char-lm"
                and c.params["model"] == "gru")
    pairing = [("task", '"char-lm"'), ("task_params", "{}"), ("model", '"gru"'), ("hidden_size", "4"),
               ("num_layers", "1"), ("seq_len", "8"), ("batch_size", "2")]
    assert cell.params["seed"] == derive_seed("cell", 7, 1, pairing)


# --------------------------------------------------------------------------- selection, built-ins

def test_select_by_key_and_prefix() -> None:
    cells = parse(BASE).cells
    target = cells[3]
    assert select(cells, [target.key]) == [target]
    assert select(cells, [target.key[:10]]) == [target]
    assert select(cells, []) == list(cells)
    with pytest.raises(UsageError, match="no cell of the suite has that key"):
        select(cells, ["ffffffffffffffff0"])
    with pytest.raises(UsageError, match="matches"):
        select(cells, [""])


def test_builtin_suites_parse_and_cover_the_registry() -> None:
    from tbptt_bench.methods.base import METHODS
    from tbptt_bench.models import MODELS
    from tbptt_bench.tasks import TASKS

    names = builtin_suites()
    assert {"quick", "standard", "gpu"} <= set(names)
    assert find_suite("quick") == names["quick"]
    quick = load_suite("quick")
    assert {c.measure for c in quick.cells} >= {"train", "perf"}
    trained = [c for c in quick.cells if c.measure == "train"]
    builtin_tasks = {"copy", "adding", "char-lm", "copy-stream"}
    assert {c.params["task"] for c in trained} == builtin_tasks <= set(TASKS.names())
    assert {c.params["model"] for c in trained} == {"rnn", "lstm", "gru"} <= set(MODELS.names())
    builtin_families = {"full", "tbptt", "chunked", "sliding", "hybrid", "artbp", "stepped", "curriculum", "adaptive"}
    assert builtin_families == {c.params["method"].split(":")[0] for c in trained}
    assert {c.params["method"].split(":")[0] for c in trained} <= set(METHODS.names())
    assert len({c.params["seed"] for c in trained}) > 1
    standard = load_suite("standard")
    assert len(standard.cells) > len(quick.cells)
    gpu = load_suite("gpu")
    assert {c.device for c in gpu.cells} == {"cuda"}


def test_gpu_suite_needs_a_gpu_for_the_local_executor() -> None:
    import torch

    cells = list(load_suite("gpu").cells)
    if torch.cuda.is_available():
        check_devices(cells)
    else:
        with pytest.raises(UsageError, match="no CUDA GPU"):
            check_devices(cells)
