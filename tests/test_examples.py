"""The examples and the README's own-loop snippet run (at small sizes)."""

from __future__ import annotations

import importlib.util
import math
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bias_of_my_model(capsys):
    load("bias_of_my_model").main(["--small"])
    out = capsys.readouterr().out
    rows = {line.split()[0]: float(line.split()[1]) for line in out.splitlines() if re.match(r"\s*(chunked|sliding):k=\d+\s+[-+.\de]+\s", line)}
    assert rows["chunked:k=12"] < 1e-12 and rows["sliding:k=12"] < 1e-12  # K = T: the true gradient
    assert rows["chunked:k=1"] > 1e-3


def test_own_training_loop():
    assert math.isfinite(load("own_training_loop").main(["--small"]))


def test_lightning_module():
    pytest.importorskip("lightning", reason="Lightning 2 is not installed (pip install 'tbptt-bench[lightning]')")
    assert math.isfinite(load("lightning_module").main(["--small"]))


def test_readme_own_loop_snippet_runs_and_trains():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Use it in your own training loop", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    runner, model = namespace["runner"], namespace["model"]
    # three pieces of one stream: updates at multiples of 8 along its 150 steps, the last 6 losses waiting
    assert runner.updates_done == 150 // 8 and runner.batches_done == 3
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert namespace["optimiser"].state_dict()["state"]  # the caller's optimiser stepped


def test_the_plugins_in_docs_tasks_md_work_from_the_cli(tmp_path):
    """The task, model and method plugins of docs/tasks.md, as files in a plugin folder: to-start keeps
    every contribution (each window starts at step 1), so its estimate is the true gradient."""
    import json
    import os
    import subprocess
    import sys

    blocks = re.findall(r"```python\n# (my_\w+)/(\w+\.py)[^\n]*\n(.*?)```", (ROOT / "docs" / "tasks.md").read_text(), re.S)
    assert sorted(name for _, name, _ in blocks) == ["ln_gru.py", "parity.py", "to_start.py"]
    for _, name, code in blocks:
        (tmp_path / name).write_text(code)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "tbptt_bench.cli", "--plugins", str(tmp_path), "grad", "--task", "parity",
                          "--model", "ln-gru", "--method", "to-start:k1=4", "--seq-len", "10", "--batch", "2",
                          "--hidden", "4", "--dtype", "float64", "--json"], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    metrics = json.loads(out.stdout)["metrics"]["all"]
    assert metrics["relative_error"] < 1e-12 and abs(metrics["cosine"] - 1) < 1e-12
