"""The copy-stream task: the lag structure of both layouts, the memoryless baseline, and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tbptt_bench.cli import main
from tbptt_bench.errors import UsageError
from tbptt_bench.core.build import make_task
from tbptt_bench.training.loop import TrainConfig, train


def test_delay_targets_are_the_input_lag_steps_earlier():
    task = make_task("copy-stream", lag=7)
    s = task.stream(5, "train")
    assert s.inputs.shape == (5, task.length)
    for t in range(s.length):
        if t < 7:
            assert bool((s.weights[:, t] == 0).all())
        else:
            assert bool((s.weights[:, t] == 1).all()) and torch.equal(s.targets[:, t], s.inputs[:, t - 7])
    assert set(s.inputs.unique().tolist()) == set(range(6))


@pytest.mark.parametrize("min_lag,lag", [(10, 10), (5, 10), (2, 4)])
def test_blocks_echo_each_block_its_length_later(min_lag, lag):
    """Parse the inputs into blocks (a marker, then data, then blanks) and check the targets against them."""
    task = make_task("copy-stream", layout="blocks", lag=lag, min_lag=min_lag, length=600)
    s = task.stream(4, "valid")
    x, y, w = s.inputs.numpy(), s.targets.numpy(), s.weights.numpy()
    for row in range(4):
        starts = np.flatnonzero(x[row] == 1)
        expected = np.zeros(s.length, dtype=np.int64)
        checked = np.zeros(s.length, dtype=bool)
        for p in starts:
            size = 1
            while p + size < s.length and x[row, p + size] >= 2:
                size += 1
            if p + 2 * size > s.length:
                continue  # the block's echo runs past the end of the stream
            assert min_lag <= size <= lag
            assert (x[row, p + size : p + 2 * size] == 0).all()
            expected[p + size : p + 2 * size] = x[row, p : p + size]
            checked[p : p + 2 * size] = True
        assert (y[row][checked] == expected[checked]).all()
        first = starts[0]  # before it: the tail of a block cut by the stream start
        assert (w[row, first:] == 1).all()
        for t in range(first):  # a scored echo there copies a visible input, one lag in range earlier
            if w[row, t] > 0 and y[row, t] != 0:
                assert any(t - d >= 0 and x[row, t - d] == y[row, t] for d in range(min_lag, lag + 1))


@pytest.mark.parametrize("params", [{"lag": 6}, {"lag": 3, "n_symbols": 4},
                                    {"layout": "blocks", "lag": 10}, {"layout": "blocks", "lag": 10, "min_lag": 5}])
def test_baseline_is_the_best_memoryless_accuracy(params):
    """Estimate the best predictor that sees only the current input from a long stream: for each input value,
    the most frequent target among scored metric steps; its accuracy must match the closed form."""
    task = make_task("copy-stream", length=20000, **params)
    s = task.stream(16, "train")
    scored = s.weights > 0
    if task.layout == "blocks":
        scored &= s.targets != 0
    x, y = s.inputs[scored].numpy(), s.targets[scored].numpy()
    counts = np.zeros((task.n_symbols, task.n_symbols))
    np.add.at(counts, (x, y), 1)
    best = counts.max(axis=1).sum() / counts.sum()
    se = math.sqrt(best * (1 - best) / counts.sum())
    assert abs(best - task.baseline(0)) < 5 * se + 1e-3


def test_metric_counts_only_scored_steps():
    for layout in ("delay", "blocks"):
        task = make_task("copy-stream", layout=layout, lag=4, length=200)
        s = task.stream(3, "test")
        perfect = F.one_hot(s.targets, task.n_symbols).double()
        assert task.metric(perfect, s) == 1.0
        wrong_unscored = perfect.clone()
        unscored = s.weights == 0 if layout == "delay" else (s.targets == 0)
        wrong_unscored[unscored] = perfect[unscored].roll(1, dims=-1)
        assert task.metric(wrong_unscored, s) == 1.0


def test_streams_are_fixed_per_seed_and_split_and_samples_follow_the_generator():
    task = make_task("copy-stream", lag=3, length=50, valid_length=30)
    a, b = task.stream(2, "train"), task.stream(2, "train")
    assert torch.equal(a.inputs, b.inputs) and a.length == 50 and task.stream(2, "valid").length == 30
    assert not torch.equal(task.stream(2, "valid").inputs[:, :30], task.stream(2, "test").inputs[:, :30])
    assert not torch.equal(a.inputs, make_task("copy-stream", lag=3, length=50, seed=1).stream(2, "train").inputs)
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    assert torch.equal(task.sample(3, 20, g1).inputs, task.sample(3, 20, g2).inputs)


def test_trains_as_a_stream_with_state_carried():
    cfg = TrainConfig(task="copy-stream", method="tbptt:k1=3,k2=5", steps=10, seq_len=12, batch_size=4,
                      hidden_size=8, eval_every=5, eval_batches=2,
                      task_params={"lag": 2, "length": 60, "valid_length": 24})
    result = train(cfg)
    assert result.baseline == pytest.approx(1 / 6)
    assert all(0.0 <= row["eval_metric"] <= 1.0 for row in result.curve)


@pytest.mark.parametrize("params,needle", [
    ({"layout": "spiral"}, "unknown layout"),
    ({"lag": 4, "min_lag": 6}, "min_lag ≤ lag"),
    ({"lag": 6, "min_lag": 3}, "needs layout=blocks"),
    ({"n_symbols": 2, "layout": "blocks"}, "n_symbols"),
    ({"length": 0}, "length"),
])
def test_bad_parameters_are_usage_errors(params, needle):
    with pytest.raises(UsageError, match=needle):
        make_task("copy-stream", **params)


def test_bad_parameter_on_the_command_line_exits_2(capsys):
    args = ["train", "--task", "copy-stream", "--task-param", "layout=spiral", "--steps", "1", "--quiet"]
    assert main(args) == 2
    assert "unknown layout" in capsys.readouterr().err
