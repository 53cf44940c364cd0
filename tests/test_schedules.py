"""K schedules: K changes exactly at the specified update counts, in the method and in training."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch

from tbptt_bench.cli import main
from tbptt_bench.core.engine import Engine
from tbptt_bench.errors import UsageError
from tbptt_bench.core.mask import mask_matrix
from tbptt_bench.methods.base import parse_method
from tbptt_bench.methods.truncation import segment_updates
from tbptt_bench.models.recurrent import RecurrentNet
from tbptt_bench.methods.schedules import Window, per_update_windows, window_update
from tbptt_bench.tasks.base import Batch
from tbptt_bench.training.loop import TrainConfig, train

from reference import masked_reference


def walk(method, lengths):
    """(global update index, update) over consecutive sequences, as training calls the method."""
    out, n = [], 0
    for length in lengths:
        for u in method.updates(length, first_update=n):
            out.append((n, u))
            n += 1
    return out


@pytest.mark.parametrize("family,fixed", [("chunked", "chunked:k={k}"), ("overlap", "tbptt:k1={k},k2={k2}"),
                                          ("sliding", "sliding:k={k}")])
@pytest.mark.parametrize("k,T", [(1, 5), (3, 10), (4, 9), (5, 3)])
def test_constant_schedule_is_the_fixed_method(family, fixed, k, T):
    ours = parse_method(f"stepped:k={k},family={family}").updates(T, first_update=17)
    theirs = parse_method(fixed.format(k=k, k2=2 * k - 1)).updates(T)
    assert [(u.loss_start, u.loss_end) for u in ours] == [(u.loss_start, u.loss_end) for u in theirs]
    assert np.array_equal(mask_matrix(ours, T), mask_matrix(theirs, T))


def test_window_update_matches_segment_updates():
    rng = np.random.default_rng(0)
    for _ in range(50):
        T, k1, k2 = (int(v) for v in rng.integers(1, 12, size=3))
        expect = segment_updates(T, k1, k2)
        assert per_update_windows(T, 0, lambda n: Window(k1, k2)) == expect
        assert [window_update(u.loss_start, T, Window(k1, k2)) for u in expect] == expect


def test_stepped_changes_k_exactly_at_the_given_updates():
    method = parse_method("stepped:k=2,then=5@7:3@12,family=chunked")
    n = 0
    for length in (9, 4, 13, 6, 20):
        pos = 0
        for u in method.updates(length, first_update=n):
            k = 2 if n < 7 else (5 if n < 12 else 3)
            assert method.k_used(n) == k
            assert (u.loss_start, u.loss_end, u.window_start) == (pos, min(pos + k, length), pos)
            pos, n = u.loss_end, n + 1
        assert pos == length


@pytest.mark.parametrize("start,end,over", [(2, 6, 8), (8, 3, 5), (4, 64, 1000), (5, 5, 3)])
def test_curriculum_follows_its_formula(start, end, over):
    method = parse_method(f"curriculum:start={start},end={end},over={over},family=overlap")
    for n in range(over + 5):
        step = Fraction((end - start) * min(n, over), over)
        expected = start + (int(step) if step >= 0 else -int(-step))  # truncated towards the start
        assert method.k_used(n) == expected
    assert method.k_used(over) == end
    changes = [n for n in range(1, over + 5) if method.k_used(n) != method.k_used(n - 1)]
    assert all(n <= over for n in changes)


def test_overlap_windows_use_the_k_of_their_own_update():
    method = parse_method("curriculum:start=2,end=5,over=6,family=overlap")
    for n, u in walk(method, [11, 7, 30]):
        k = method.k_used(n)
        assert u.window_start == max(0, u.loss_start - (k - 1))


@pytest.mark.parametrize("cell,spec,first", [("lstm", "stepped:k=2,then=3@2:4@4,family=overlap", 0),
                                             ("gru", "curriculum:start=1,end=4,over=5,family=sliding", 2),
                                             ("rnn", "stepped:k=3,then=2@3,family=chunked", 1)])
def test_scheduled_estimate_equals_masked_reference(cell, spec, first):
    torch.manual_seed(0)
    model = RecurrentNet(cell, "tokens", 5, 5, 4, 1).double()
    g = torch.Generator().manual_seed(1)
    T, B = 11, 2
    batch = Batch(torch.randint(0, 5, (B, T), generator=g), torch.randint(0, 5, (B, T), generator=g),
                  torch.ones(B, T, dtype=torch.float64))
    updates = parse_method(spec).updates(T, first_update=first)
    Engine(model, "cross_entropy").run(batch, updates, model.initial_state(B))
    ref = masked_reference(model, batch, mask_matrix(updates, T), "cross_entropy")
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[name], rtol=1e-10, atol=1e-10)


def test_training_records_k_at_every_update_and_switches_mid_segment():
    cfg = TrainConfig(task="copy", method="stepped:k=3,then=6@4:2@9,family=chunked", steps=12, seq_len=24,
                      batch_size=2, hidden_size=4, eval_every=5, eval_batches=1,
                      task_params={"n_remember": 2})
    result = train(cfg)
    assert result.k_used == [3 if n < 4 else (6 if n < 9 else 2) for n in range(12)]
    assert [row.get("k_used") for row in result.curve] == [3, 6, 2, 2]  # at updates 0, 5, 10, 12
    assert result.as_dict()["k_used"] == result.k_used


@pytest.mark.parametrize("spec", ["chunked:k=3", "stepped:k=2,then=5@3,family=chunked"])
def test_a_token_budget_stops_methods_with_different_k_on_equal_data(spec):
    """16 rows x 15 losses = 240 tokens: training stops at the first update that reaches them."""
    method = parse_method(spec)
    updates, covered = 0, 0
    while covered < 15:
        covered += method.k_used(updates) or 3  # chunked:k=3 reports no K
        updates += 1
    cfg = TrainConfig(task="copy-stream", method=spec, steps=100, seq_len=30, batch_size=16, hidden_size=4,
                      eval_every=50, eval_batches=1, max_tokens=240, task_params={"lag": 2, "length": 90})
    result = train(cfg)
    assert len(result.k_used) == updates
    assert result.curve[-1]["update"] == updates and result.curve[-1]["tokens"] == 16 * covered
    with pytest.raises(UsageError, match="max_tokens"):
        train(TrainConfig(max_tokens=0))


@pytest.mark.parametrize("spec", ["stepped:k=4,then=8@0", "stepped:k=4,then=8@10:2@10", "stepped:k=0",
                                  "stepped:k=4,then=x@3", "stepped:k=4,then=0@5",
                                  "stepped:k=4,family=diagonal", "curriculum:start=0,end=4,over=3",
                                  "curriculum:start=2,end=4"])
def test_bad_schedules_are_usage_errors(spec, capsys):
    with pytest.raises(UsageError):
        parse_method(spec)
    assert main(["explain", spec, "--seq-len", "8"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
