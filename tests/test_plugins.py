"""Users add tasks and models without editing the package: plugin folders and entry points."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap


from tbptt_bench import registry
from tbptt_bench.models import MODELS
from tbptt_bench.tasks import TASKS
from tbptt_bench.cli import main

PLUGIN = textwrap.dedent(
    '''
    import torch
    from torch import nn
    from tbptt_bench.models import register_model
    from tbptt_bench.tasks import register_task
    from tbptt_bench.tasks.base import Batch, Task


    @register_task
    class Parity(Task):
        """Running parity of a bit stream."""
        name = "parity-{tag}"
        description = "running parity of random bits"
        input_kind = "tokens"
        loss_kind = "cross_entropy"
        metric_name = "accuracy"
        metric_higher_is_better = True
        input_size = 2
        output_size = 2

        def sample(self, batch_size, seq_len, generator, split="train"):
            x = torch.randint(0, 2, (batch_size, seq_len), generator=generator)
            return Batch(x, x.cumsum(1) % 2, torch.ones(batch_size, seq_len))

        def metric(self, outputs, batch):
            return float((outputs.argmax(-1) == batch.targets).float().mean())

        def baseline(self, seq_len):
            return 0.5


    class Elman(nn.Module):
        def __init__(self, task, hidden_size, num_layers=1):
            super().__init__()
            self.hidden_size = hidden_size
            self.emb = nn.Embedding(task.input_size, hidden_size)
            self.rec = nn.Linear(hidden_size, hidden_size)
            self.out = nn.Linear(hidden_size, task.output_size)

        def initial_state(self, batch_size):
            return torch.zeros(1, batch_size, self.hidden_size, dtype=self.out.weight.dtype)

        def forward(self, inputs, state):
            h, outs = state[0], []
            for t in range(inputs.shape[1]):
                h = torch.tanh(self.emb(inputs[:, t]) + self.rec(h))
                outs.append(self.out(h))
            return torch.stack(outs, 1), h[None]


    register_model("elman-{tag}")(Elman)
    '''
)


def test_plugin_folder_via_cli_flag(tmp_path, capsys):
    (tmp_path / "my_plugin.py").write_text(PLUGIN.format(tag="a"))
    argv = ["--plugins", str(tmp_path), "grad", "--task", "parity-a", "--model", "elman-a", "--method",
            "tbptt:k1=3,k2=5", "--seq-len", "10", "--batch", "3", "--hidden", "4", "--dtype", "float64", "--json"]
    assert main(argv) == 0
    metrics = json.loads(capsys.readouterr().out)["metrics"]["all"]
    assert 0 < metrics["relative_error"] < 2 and -1 <= metrics["cosine"] <= 1
    assert main(["tasks"]) == 0
    listing = capsys.readouterr().out
    assert "parity-a" in listing and "elman-a" in listing


def test_plugin_folder_via_environment(tmp_path):
    (tmp_path / "p.py").write_text(PLUGIN.format(tag="b"))
    env = {**os.environ, registry.PLUGIN_ENV: str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "tbptt_bench.cli", "train", "--task", "parity-b", "--model",
                           "elman-b", "--method", "chunked:k=4", "--seq-len", "8", "--batch", "4", "--hidden", "4",
                           "--steps", "4", "--eval-every", "2", "--json"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert [r["update"] for r in json.loads(proc.stdout)["curve"]] == [0, 2, 4]


def test_entry_point_plugin(tmp_path, monkeypatch):
    (tmp_path / "ep_plugin.py").write_text(PLUGIN.format(tag="c") + "\ndef setup():\n    pass\n")
    dist = tmp_path / "ep_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ep-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[tbptt_bench.plugins]\nparity = ep_plugin:setup\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    assert "parity-c" in TASKS.names()
    assert "elman-c" in MODELS.names()


def test_broken_plugin_is_named(tmp_path, capsys):
    (tmp_path / "broken.py").write_text("raise RuntimeError('boom')\n")
    assert main(["--plugins", str(tmp_path), "tasks"]) == 2
    err = capsys.readouterr().err
    assert "broken.py" in err and "boom" in err


def test_missing_plugin_folder(capsys):
    assert main(["--plugins", "/no/such/folder", "tasks"]) == 2
    assert "does not exist" in capsys.readouterr().err
