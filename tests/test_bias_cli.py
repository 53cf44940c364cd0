"""``tbptt-bench bias`` and ``train --bias-at``: tables, figure, JSON, and one-line errors (exit 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from tbptt_bench.cli import main

SMALL = ["--model", "lstm", "--hidden", "4", "--batch", "2", "--batches", "2", "--flips", "50"]


@pytest.mark.parametrize("task, seq_len", [("copy", "24"), ("adding", "12"), ("char-lm", "16")])
def test_bias_command_table_figure_and_json(task: str, seq_len: str, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "bias.csv"
    fig = tmp_path / "bias.png"
    code = main(["bias", "--task", task, "--seq-len", seq_len, *SMALL, "--method", "chunked,sliding",
                 "--method", "tbptt", "--k", "1,2,4", "--max-lag", "6", "--save", str(out), "--figure", str(fig),
                 "--json"])
    assert code == 0
    doc = json.loads(capsys.readouterr().out)
    table = pd.read_csv(out)
    lags = pd.read_csv(tmp_path / "bias.lags.csv")
    assert len(doc["rows"]) == len(table) and len(doc["lags"]) == len(lags) == 6
    specs = set(table["spec"])
    assert {"chunked:k=4", "sliding:k=2", "tbptt:k1=4,k2=7"} <= specs
    assert fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_bias_command_parquet_and_text_summary(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "b.parquet"
    assert main(["bias", "--task", "adding", "--seq-len", "10", *SMALL, "--k", "2,5", "--max-lag", "0",
                 "--save", str(out)]) == 0
    text = capsys.readouterr().out
    assert "chunked:k=5" in text and "rel. bias" in text
    assert set(pd.read_parquet(out)["spec"]) == {"chunked:k=2", "chunked:k=5"}


def test_bias_command_with_probes(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["bias", "--task", "adding", "--seq-len", "10", *SMALL, "--k", "2", "--probes", "4",
                 "--max-lag", "0", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [r["group"] for r in doc["rows"]] == ["all"] and doc["meta"]["true_method"] == "probes:4"


@pytest.mark.parametrize("args, message", [
    (["--k", "2", "--batches", "0"], "--batches must be"),
    (["--k", "2", "--max-lag", "30"], "maximum lag D"),
    (["--k", "2", "--probes", "1"], "number of probes"),
    (["--k", "x"], "--k takes integers"),
    (["--method", "chunked:k=0"], "must be an integer"),
    (["--k", "2", "--save", "out.txt"], ".csv or .parquet"),
    (["--k", "2", "--save", "/no/such/folder/x.csv"], "does not exist"),
])
def test_bias_command_bad_input_exit_2(args, message, capsys) -> None:  # type: ignore[no-untyped-def]
    code = main(["bias", "--task", "copy", "--seq-len", "24", "--hidden", "3", "--batch", "2", *args])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_bias_command_model_state_not_protocol(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    plugin = tmp_path / "plugins"
    plugin.mkdir()
    (plugin / "bad_state.py").write_text(
        "import torch\nfrom torch import nn\nfrom tbptt_bench.models import register_model\n\n"
        "class ListState(nn.Module):\n"
        "    def __init__(self, task):\n        super().__init__()\n"
        "        self.emb = nn.Embedding(task.input_size, task.output_size)\n"
        "    def initial_state(self, batch_size):\n        return [torch.zeros(1, batch_size, 1)]\n"
        "    def forward(self, inputs, state):\n        return self.emb(inputs), state\n\n"
        "@register_model('list-state-bias-test')\n"
        "def build(task, hidden_size, num_layers=1):\n    return ListState(task)\n")
    code = main(["--plugins", str(plugin), "bias", "--task", "copy", "--model", "list-state-bias-test",
                 "--seq-len", "24", "--batch", "2", "--k", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "batch in dimension 1" in err and err.count("\n") == 1


def test_train_bias_at_records_snapshots(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    save = tmp_path / "curve.json"
    code = main(["train", "--task", "copy", "--model", "lstm", "--method", "chunked:k=4", "--seq-len", "24",
                 "--batch", "2", "--hidden", "4", "--steps", "2", "--eval-every", "1", "--eval-batches", "1",
                 "--bias-at", "0,2", "--bias-methods", "chunked:k=4,tbptt:k1=4,k2=8", "--bias-batches", "4",
                 "--quiet", "--save", str(save)])
    assert code == 0
    curve = json.loads(save.read_text())["curve"]
    by_update = {row["update"]: row for row in curve}
    for n in (0, 2):
        row = by_update[n]
        assert row["bias_method"] == "chunked:k=4"
        assert 0 < row["relative_bias"] < 1 and row["relative_bias_lo"] <= row["relative_bias"] <= row["relative_bias_hi"]
        assert row["tbptt:k1=4,k2=8/relative_bias"] < row["relative_bias"]  # longer windows, less bias
    assert by_update[1]["relative_bias"] is None


def test_train_bias_at_must_be_an_evaluation_point(capsys) -> None:  # type: ignore[no-untyped-def]
    code = main(["train", "--task", "copy", "--seq-len", "24", "--steps", "4", "--eval-every", "2",
                 "--bias-at", "3", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "not an evaluation point" in err
