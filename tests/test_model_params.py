"""Model parameters (``model_params``, ``--model-param``) through train, perf and suites (docs/attention.md)."""

from __future__ import annotations

import dataclasses
import json
import tomllib

import pytest

from tbptt_bench.cli import main
from tbptt_bench.errors import UsageError
from tbptt_bench.perf.config import PerfConfig
from tbptt_bench.perf.harness import measure
from tbptt_bench.suites.suite import parse_suite
from tbptt_bench.training.loop import TrainConfig
from tbptt_bench.training.run import build_run

SUITE = """
[suite]
name = "mp"
seed = 0

[defaults]
seq_len = 12
batch_size = 2
hidden_size = 4
{defaults}

[[train]]
task = "copy"
task_params = {{ copy = {{ n_remember = 2 }} }}
model = ["lstm", "sab"]
method = "chunked:k=4"
steps = 2
{block}
"""


def cells(defaults: str = "", block: str = ""):
    return parse_suite(tomllib.loads(SUITE.format(defaults=defaults, block=block)), source="mp.toml").cells


def test_suite_model_params_apply_per_model_and_leave_other_keys_unchanged() -> None:
    plain = {c.params["model"]: c for c in cells()}
    keyed = {c.params["model"]: c for c in cells(defaults="model_params = { sab = { mem = 2, ktop = 1 } }")}
    assert keyed["sab"].params["model_params"] == {"mem": 2, "ktop": 1}
    assert "model_params" not in keyed["lstm"].params
    assert keyed["lstm"].key == plain["lstm"].key, "a model without parameters keeps the key it had before"
    assert keyed["sab"].key != plain["sab"].key
    assert keyed["sab"].params["seed"] == plain["sab"].params["seed"], "model parameters do not change the seed"
    block = {c.params["model"]: c for c in cells(block="model_params = { sab = { mem = 3 } }",
                                                defaults="model_params = { sab = { mem = 2 } }")}
    assert block["sab"].params["model_params"] == {"mem": 3}, "a block's table replaces the default"


@pytest.mark.parametrize("block, match", [
    ("model_params = { xl = { memory = 2 } }", "names model 'xl', which the block does not run"),
    ("model_params = { sab = 3 }", "table of tables keyed by model"),
    ("model_params = { sab = { ktop = 5, mem = 2 } }", "ktop=5 exceeds"),
    ("model_params = { sab = { window = 2 } }", "does not accept parameters"),
])
def test_suite_bad_model_params_are_usage_errors(block: str, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        cells(block=block)


def test_run_config_builds_the_model_with_its_parameters() -> None:
    cfg = TrainConfig(task="copy", task_params={"n_remember": 2}, model="sab", model_params={"mem": 2, "ktop": 1},
                      seq_len=12, batch_size=2, hidden_size=4, method="tbptt:k1=2,k2=4", steps=2)
    model = build_run(cfg.run).model
    assert (model.mem, model.ktop, model.katt) == (2, 1, 4)
    assert cfg.flat()["model_params"] == {"mem": 2, "ktop": 1}


def test_train_cli_records_model_params(tmp_path, capsys) -> None:
    out = tmp_path / "curve.json"
    code = main(["train", "--task", "copy", "--task-param", "n_remember=2", "--model", "sab", "--model-param", "mem=2",
                 "--model-param", "ktop=1", "--method", "sliding:k=3", "--seq-len", "12", "--batch", "2", "--hidden",
                 "4", "--steps", "4", "--eval-every", "2", "--eval-batches", "1", "--quiet", "--save", str(out)])
    assert code == 0
    saved = json.loads(out.read_text())
    assert saved["config"]["model_params"] == {"mem": 2, "ktop": 1}
    assert [row["update"] for row in saved["curve"]] == [0, 2, 4]


def test_train_cli_bad_model_param_exits_2(capsys) -> None:
    code = main(["train", "--model", "sab", "--model-param", "ktop=9", "--seq-len", "24", "--batch", "2",
                 "--hidden", "4", "--steps", "1", "--quiet"])
    assert code == 2
    assert "ktop=9 exceeds" in capsys.readouterr().err


def test_perf_config_carries_model_params_to_the_child_and_the_row() -> None:
    cfg = PerfConfig(task="copy", task_params={"n_remember": 2}, model="sab", model_params={"mem": 2, "ktop": 1},
                     method="tbptt:k1=2,k2=4", seq_len=12, batch_size=2, hidden_size=4, threads=1, warmup=0, repeats=1)
    child = PerfConfig(**json.loads(json.dumps(dataclasses.asdict(cfg))))  # what the fresh process rebuilds
    assert build_run(child.run).model.mem == 2
    row = measure(cfg)
    assert row["status"] == "ok" and json.loads(row["model_params"]) == {"mem": 2, "ktop": 1}


def test_perf_cli_bad_model_param_exits_2(capsys) -> None:
    code = main(["perf", "--model", "sab", "--model-param", "mem=0", "--seq-len", "24", "--batch", "2",
                 "--hidden", "4", "--in-process"])
    assert code == 2
    assert "mem must be" in capsys.readouterr().err
