"""The command line: outputs, the saved .npz (checked by recomputing), bad input → exit 2."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from tbptt_bench.cli import main
from tbptt_bench.core.mask import mask_matrix
from tbptt_bench.methods.base import parse_method
from tbptt_bench.models.recurrent import RecurrentNet
from tbptt_bench.tasks.base import Batch

from reference import masked_reference

GRAD = ["grad", "--task", "copy", "--model", "rnn", "--method", "tbptt:k1=5,k2=10", "--seq-len", "24",
        "--batch", "2", "--hidden", "4", "--seed", "0", "--dtype", "float64"]


def test_grad_json_and_npz_verified_independently(tmp_path, capsys):
    out = tmp_path / "g.npz"
    assert main(GRAD + ["--json", "--save", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["method"] == "tbptt:k1=5,k2=10" and report["loss_kind"] == "cross_entropy"
    saved = np.load(out)
    meta = json.loads(str(saved["metadata"]))
    assert meta["task"] == "copy" and "loss_normalisation" in meta
    # Rebuild the model from the saved parameters alone and recompute both gradients by brute force.
    model = RecurrentNet("rnn", "tokens", 10, 9, 4).double()
    model.load_state_dict({k[6:]: torch.from_numpy(saved[k]) for k in saved.files if k.startswith("param/")})
    batch = Batch(torch.from_numpy(saved["inputs"]), torch.from_numpy(saved["targets"]), torch.from_numpy(saved["weights"]))
    T = batch.length
    method = parse_method(meta["method"])
    est = masked_reference(model, batch, mask_matrix(method.updates(T), T), "cross_entropy")
    true = masked_reference(model, batch, np.tril(np.ones((T, T))), "cross_entropy")
    for name in est:
        np.testing.assert_allclose(saved[f"grad_estimate/{name}"], est[name].numpy(), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(saved[f"grad_true/{name}"], true[name].numpy(), rtol=1e-9, atol=1e-12)
    diff = np.concatenate([(saved[f"grad_estimate/{n}"] - saved[f"grad_true/{n}"]).ravel() for n in est])
    norm = np.sqrt(sum((saved[f"grad_true/{n}"] ** 2).sum() for n in est))
    assert report["metrics"]["all"]["relative_error"] == pytest.approx(np.linalg.norm(diff) / norm, rel=1e-9)


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["grad", "--method", "nope:k=1"], "unknown method 'nope'; accepted:"),
        (["grad", "--method", "tbptt:k1=0,k2=3"], "k1=0 must be an integer ≥ 1"),
        (["grad", "--method", "chunked:k=-2"], "must be an integer ≥ 1"),
        (["grad", "--method", "tbptt:k1=4"], "needs k2="),
        (["grad", "--method", "tbptt:k1=4,k3=2,k2=1"], "no parameter 'k3'"),
        (["grad", "--method", "tbptt:k1"], "malformed parameter"),
        (["grad", "--method", "Tbptt k1=3"], "malformed method spec"),
        (["grad", "--method", "full", "--task", "nope"], "unknown task 'nope'; accepted: "),
        (["grad", "--method", "full", "--model", "transformer"], "unknown model 'transformer'"),
        (["grad", "--method", "full", "--seq-len", "10"], "at least 21"),
        (["grad", "--method", "full", "--task", "char-lm", "--task-param", "corpus=text", "--task-param", "path=/nonexistent/x.txt"], "/nonexistent/x.txt"),
        (["grad", "--method", "full", "--hidden", "0"], "--hidden must be ≥ 1"),
        (["grad", "--method", "full", "--device", "cuda"] if not torch.cuda.is_available() else ["grad", "--method", "x y"], ""),
        (["grad", "--method", "full", "--save", "/nonexistent/dir/g.npz"], "does not exist"),
        (["explain", "tbptt:k1=2,k2=2", "--seq-len", "0"], "--seq-len must be ≥ 1"),
        (["train", "--method", "full", "--lr", "-1"], "--lr must be > 0"),
        (["train", "--method", "full", "--threads", "0"], "--threads must be ≥ 1"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("tbptt-bench: error: ") and err.count("\n") == 1
    assert needle in err
    assert "Traceback" not in err


def test_failed_save_leaves_nothing(tmp_path):
    bad = tmp_path / "sub" / "g.npz"
    assert main(GRAD + ["--save", str(bad)]) == 2
    assert not bad.parent.exists()


def test_explain_prints_each_loss_and_update(capsys):
    assert main(["explain", "tbptt:k1=3,k2=5", "--seq-len", "8"]) == 0
    lines = capsys.readouterr().out.splitlines()[2:]
    assert len(lines) == 8
    # loss t=6 (update 2, ends at 6) reaches back to s = 6 - 5 + 1 = 2: lags 0..4
    assert lines[5].split()[:4] == ["6", "2", "6", "0-4"]
    # trailing loss t=8 (update 3) keeps its nominal window (u'=9): s ≥ 5, lags 0-3
    assert lines[7].split()[:4] == ["8", "3", "8", "0-3"]


def test_tasks_lists_everything(capsys):
    assert main(["tasks", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert {"copy", "adding", "char-lm"} <= set(listing["tasks"])
    assert {"rnn", "lstm", "gru"} <= set(listing["models"])
    assert {"full", "tbptt", "chunked", "sliding"} <= set(listing["methods"])


def test_train_saves_curve(tmp_path, capsys):
    out = tmp_path / "curve.json"
    argv = ["train", "--task", "adding", "--model", "gru", "--method", "tbptt:k1=4,k2=8", "--seq-len", "12",
            "--batch", "4", "--hidden", "8", "--steps", "6", "--eval-every", "3", "--quiet", "--save", str(out)]
    assert main(argv) == 0
    saved = json.loads(out.read_text())
    assert [r["update"] for r in saved["curve"]] == [0, 3, 6]
    assert saved["config"]["method"] == "tbptt:k1=4,k2=8"
    assert saved["baseline"] == pytest.approx(1 / 6 - 1 / 72)  # the memoryless optimum at T = 12


def test_train_threads_sets_torchs_thread_count_and_is_saved(tmp_path):
    out = tmp_path / "curve.json"
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        argv = ["train", "--task", "adding", "--model", "gru", "--method", "chunked:k=4", "--seq-len", "12",
                "--batch", "2", "--hidden", "4", "--steps", "2", "--eval-every", "2", "--quiet", "--threads", "1",
                "--save", str(out)]
        assert main(argv) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert json.loads(out.read_text())["config"]["threads"] == 1


def test_train_without_flags_is_the_dataclass_default():
    """Every train option's default is TrainConfig's (or RunConfig's): a CLI default that differs fails here."""
    from tbptt_bench.cli import build_parser
    from tbptt_bench.commands.train import config_from_args
    from tbptt_bench.training.loop import TrainConfig

    assert config_from_args(build_parser().parse_args(["train"])).flat() == TrainConfig().flat()


def test_console_script_runs_as_a_process():
    proc = subprocess.run([sys.executable, "-m", "tbptt_bench.cli", "grad", "--method", "bad spec!"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("tbptt-bench: error:")
