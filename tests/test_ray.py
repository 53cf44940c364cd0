"""The Ray executor on a real local Ray instance gives the same table as the local executor."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pandas as pd
import pytest

from tbptt_bench.cli import main
from tbptt_bench.suites.store import read_results
from tbptt_bench.suites.suite import load_suite

ray = pytest.importorskip("ray")

SUITE = """
[suite]
name = "raytiny"
seed = 11

[defaults]
seq_len = 8
batch_size = 2
hidden_size = 4

[[train]]
task = ["adding", "char-lm"]
model = ["rnn", "lstm"]
method = ["full", "tbptt:k1=2,k2=4"]
steps = 4
eval_every = 2
eval_batches = 1

[[train]]            # fails the same way on both executors
task = "char-lm"
model = "gru"
method = "full"
seq_len = 10000000
steps = 2
"""

PARAMS = ["task", "model", "method", "seed", "replicate", "steps", "seq_len", "batch_size", "hidden_size"]
METRICS = ["status", "train_loss", "eval_loss", "eval_metric", "n_updates", "tokens", "baseline"]


def test_ray_executor_matches_local_executor(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    suite_file = tmp_path / "raytiny.toml"
    suite_file.write_text(textwrap.dedent(SUITE))
    local_code = main(["run", str(suite_file), "--results", str(tmp_path / "local"), "--quiet"])
    assert not ray.is_initialized()
    ray_code = main(["run", str(suite_file), "--results", str(tmp_path / "ray"), "--quiet",
                     "--executor", "ray", "--jobs", "2"])
    assert not ray.is_initialized(), "the executor shuts down the Ray instance it started"
    assert local_code == ray_code == 1, "the failing cell fails the exit status on both executors"
    capsys.readouterr()

    keys = sorted(c.key for c in load_suite(str(suite_file)).cells)
    local = read_results(tmp_path / "local" / "raytiny", "train").sort_values("key").reset_index(drop=True)
    remote = read_results(tmp_path / "ray" / "raytiny", "train").sort_values("key").reset_index(drop=True)
    assert list(local["key"]) == list(remote["key"]) == keys
    assert set(local["executor"]) == {"local"} and set(remote["executor"]) == {"ray"}
    pd.testing.assert_frame_equal(local[PARAMS + METRICS], remote[PARAMS + METRICS])
    assert (local["error"] == remote["error"]).all()
    assert (local["status"] == "ok").sum() == 8

    columns = ["key", "n_updates", "train_loss", "eval_loss", "eval_metric"]
    local_curves = read_results(tmp_path / "local" / "raytiny", "curves")[columns].sort_values(columns[:2])
    ray_curves = read_results(tmp_path / "ray" / "raytiny", "curves")[columns].sort_values(columns[:2])
    pd.testing.assert_frame_equal(local_curves.reset_index(drop=True), ray_curves.reset_index(drop=True))
