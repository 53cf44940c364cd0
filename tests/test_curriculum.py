"""The copy curriculum (tbptt_bench.training.curriculum): when it advances, what it records, what it measures."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tbptt_bench.core.build import make_model, make_task
from tbptt_bench.errors import UsageError
from tbptt_bench.training.curriculum import CopyCurriculum
from tbptt_bench.training.loop import TrainConfig, train


class Scripted(CopyCurriculum):
    """A curriculum whose measurements are given in advance (the advancing rule alone under test)."""

    def __init__(self, bits: list[float], **kw) -> None:  # type: ignore[no-untyped-def]
        super().__init__(n_symbols=2, batch_size=2, eval_batches=1, seed=0, **kw)
        self.script = list(bits)

    def recall_bits(self, model: nn.Module, level: int, drawn: int) -> float:
        return self.script.pop(0)


def test_level_advances_exactly_when_the_measurement_is_below_the_threshold() -> None:
    cur = Scripted([0.2, 0.1, 0.15, 0.149, 0.0, 0.0], threshold=0.15, check_every=2, max_level=4)
    lengths = [batch.length for (batch, carry), _ in zip(cur.segments(nn.Linear(1, 1)), range(11))]
    # checks before sequences 0, 2, 4, 6, 8, 10: 0.2 stays at 1, 0.1 → 2, 0.15 stays, 0.149 → 3, 0 → 4, 0 → capped at 4
    assert [(n - 1) // 2 for n in lengths] == [1, 1, 2, 2, 2, 2, 3, 3, 4, 4, 4]


def test_recall_bits_of_a_uniform_predictor_is_log2_of_the_classes() -> None:
    task = make_task("copy", n_symbols=3, n_remember=1)
    model = make_model("rnn", task, 4, dtype="float64")
    with torch.no_grad():
        model.readout.weight.zero_()
        model.readout.bias.zero_()
    cur = CopyCurriculum(n_symbols=3, batch_size=4, eval_batches=2, seed=1)
    assert cur.recall_bits(model, 3, 0) == pytest.approx(math.log2(4), rel=1e-12)


def test_training_records_the_level_of_every_update() -> None:
    cfg = TrainConfig(task="copy", task_params={"n_symbols": 2, "n_remember": 1}, model="rnn", hidden_size=8,
                      method="full", seq_len=3, batch_size=8, lr=0.02, steps=120, eval_every=40, eval_batches=2,
                      curriculum={"threshold": 0.5, "check_every": 4})
    result = train(cfg)
    assert len(result.levels) == 120
    assert result.levels == sorted(result.levels) and result.levels[0] == 1
    assert all(b - a in (0, 1) for a, b in zip(result.levels, result.levels[1:]))
    assert [row["curriculum_level"] for row in result.curve] == sorted(row["curriculum_level"] for row in result.curve)
    assert result.curve[-1]["curriculum_level"] >= result.levels[-1]
    assert result.as_dict()["levels"] == result.levels


def test_refusals() -> None:
    with pytest.raises(UsageError, match="copy task"):
        CopyCurriculum.from_config({}, make_task("adding"), 2, 1, 0)
    with pytest.raises(UsageError, match="unknown keys"):
        CopyCurriculum.from_config({"grow": 2}, make_task("copy"), 2, 1, 0)
    with pytest.raises(UsageError, match="start"):
        CopyCurriculum(n_symbols=2, batch_size=1, eval_batches=1, seed=0, start=0)
