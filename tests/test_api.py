"""The public API: a light import, every exported name documented, seeds that match the CLI."""

from __future__ import annotations

import doctest
import inspect
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import tbptt_bench
from tbptt_bench import api
from tbptt_bench.cli import main

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def test_import_is_light_and_every_exported_name_resolves_with_a_docstring():
    code = "import sys, tbptt_bench; print(sorted(m for m in ('torch', 'numpy', 'pandas') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    for name in tbptt_bench.__all__:
        if name == "__version__":
            continue
        value = getattr(tbptt_bench, name)
        assert inspect.getdoc(value), f"{name} has no docstring"
    with pytest.raises(AttributeError):
        tbptt_bench.no_such_name  # noqa: B018


@pytest.mark.parametrize("module", [tbptt_bench, api])
def test_docstring_examples_run(module):
    result = doctest.testmod(module, raise_on_error=False)
    assert result.attempted > 0 and result.failed == 0


def test_explain_method_is_what_the_cli_prints(capsys):
    assert main(["explain", "tbptt:k1=3,k2=5", "--seq-len", "8", "--picture"]) == 0
    assert capsys.readouterr().out.rstrip("\n") == tbptt_bench.explain_method("tbptt:k1=3,k2=5", 8, picture=True)


def test_method_mask_against_the_closed_form_of_tbptt():
    """docs/design.md §2.5: loss t of update j (nominal end u = j·k1) keeps step s iff s ≥ u - k2 + 1."""
    T, k1, k2 = 8, 3, 5
    m = tbptt_bench.method_mask(f"tbptt:k1={k1},k2={k2}", T)
    for t in range(1, T + 1):
        u = -(-t // k1) * k1
        for s in range(1, T + 1):
            assert m[t - 1, s - 1] == float(max(1, u - k2 + 1) <= s <= t), (t, s)
    with pytest.raises(tbptt_bench.UsageError):
        tbptt_bench.method_mask("chunked:k=2", 0)


SEED_SCRIPT = textwrap.dedent(
    """
    import sys, numpy as np, torch
    torch.set_default_dtype(torch.float64)
    import tbptt_bench as tb
    task = tb.make_task("adding")
    model = tb.make_model("lstm", task, 4, seed=3, dtype="float64")
    batch = tb.sample_batch(task, 2, 8, seed=3)
    arrays = {"param/" + k: v.numpy() for k, v in model.state_dict().items()}
    arrays.update(inputs=batch.inputs.double().numpy(), targets=batch.targets.double().numpy())
    np.savez(sys.argv[1], **arrays)
    """
)


def test_same_seed_same_parameters_and_data_from_python_under_a_float64_default_as_from_the_cli(tmp_path):
    cli = subprocess.run(
        [sys.executable, "-m", "tbptt_bench.cli", "grad", "--task", "adding", "--model", "lstm", "--method",
         "chunked:k=4", "--seq-len", "8", "--batch", "2", "--hidden", "4", "--seed", "3", "--dtype", "float64",
         "--save", str(tmp_path / "cli.npz")], env=ENV, capture_output=True, text=True)
    assert cli.returncode == 0, cli.stderr
    py = subprocess.run([sys.executable, "-c", SEED_SCRIPT, str(tmp_path / "py.npz")], env=ENV,
                        capture_output=True, text=True)
    assert py.returncode == 0, py.stderr
    a, b = np.load(tmp_path / "cli.npz"), np.load(tmp_path / "py.npz")
    names = [k for k in b.files]
    assert sum(k.startswith("param/") for k in names) == 8
    for k in names:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_make_model_ignores_the_default_dtype():
    task = tbptt_bench.make_task("copy")
    plain = tbptt_bench.make_model("gru", task, 5, seed=7, dtype="float64")
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        under64 = tbptt_bench.make_model("gru", task, 5, seed=7, dtype="float64")
    finally:
        torch.set_default_dtype(before)
    for (n, p), q in zip(plain.named_parameters(), under64.parameters()):
        assert torch.equal(p, q), n
    assert torch.get_default_dtype() == before


def test_gradients_and_bias_curve_of_a_user_model():
    """Full BPTT and sliding(K ≥ T) are unbiased (β = 0); chunked(1) is not; the estimate of chunked(1)
    is the engine's, and its cosine is 1 for the read-out (kept whole by every method)."""
    task = tbptt_bench.make_task("copy", n_remember=3)
    model = tbptt_bench.make_model("rnn", task, 6, seed=0, dtype="float64")
    batch = tbptt_bench.sample_batch(task, 3, 12, seed=0).to("cpu", torch.float64)
    est = tbptt_bench.method_gradient(model, batch, "chunked:k=1", task.loss_kind)
    true = tbptt_bench.true_gradient(model, batch, task.loss_kind)
    parts = tbptt_bench.compare(est, true)
    assert parts["readout"].relative_error < 1e-12 and parts["recurrent"].relative_error > 1e-3
    curve = tbptt_bench.bias_curve(model, task, ["full", "sliding:k=12", "chunked:k=1"], seq_len=12,
                                   batch_size=3, n_batches=3, n_flips=50, max_lag=0)
    bias = dict(zip(curve["spec"], curve["relative_bias"]))
    assert bias["full"] < 1e-12 and bias["sliding:k=12"] < 1e-12 and bias["chunked:k=1"] > 1e-3
    assert set(curve["group"]) == {"all"}


def test_read_results_of_a_missing_store_is_a_usage_error(tmp_path):
    with pytest.raises(tbptt_bench.UsageError, match="does not exist"):
        tbptt_bench.read_results(tmp_path / "nothing")
