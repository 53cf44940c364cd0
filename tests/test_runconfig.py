"""The shared run configuration: optimisers and schedules by name, clipping, one builder (training/run.py)."""

from __future__ import annotations

import math

import pytest
import torch

from tbptt_bench.cli import main as cli_main
from tbptt_bench.errors import UsageError
from tbptt_bench.perf.config import PerfConfig
from tbptt_bench.training.loop import TrainConfig, train
from tbptt_bench.training.run import RunConfig, build_run, parse_kwargs

SMALL = dict(task="copy", model="rnn", method="chunked:k=4", seq_len=24, batch_size=2, hidden_size=4, dtype="float64")


def test_optimizer_by_name_with_kwargs_and_schedule_matches_hand_built_torch() -> None:
    cfg = RunConfig(**SMALL, optimizer="SGD", lr=0.1, optimizer_args={"momentum": 0.9, "nesterov": True},
                    lr_schedule="steplr", lr_schedule_args={"step_size": 2, "gamma": 0.5}, clip=0.3)
    run = build_run(cfg)
    assert isinstance(run.optimizer, torch.optim.SGD) and run.optimizer.param_groups[0]["momentum"] == 0.9
    # an independent copy of θ stepped by torch directly: clip by global norm, step, schedule
    ref = [p.detach().clone().requires_grad_(True) for p in run.params]
    opt = torch.optim.SGD(ref, lr=0.1, momentum=0.9, nesterov=True)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    lrs = []
    for i in range(5):
        grads = [torch.full_like(p, float(i + 1)) for p in ref]
        for p, q, g in zip(run.params, ref, grads):
            p.grad, q.grad = g.clone(), g.clone()
        norm = math.sqrt(sum(float((g * g).sum()) for g in grads))
        for q in ref:
            q.grad.mul_(min(1.0, 0.3 / (norm + 1e-6)))
        opt.step()
        opt.zero_grad()
        sched.step()
        lrs.append(run.lr())
        run.step()
    for p, q in zip(run.params, ref):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-14)
    assert lrs == [0.1, 0.1, 0.05, 0.05, 0.025] and run.lr() == pytest.approx(0.025)


def test_bad_optimizer_or_schedule_is_one_line_usage_error() -> None:
    with pytest.raises(UsageError, match="unknown optimizer 'adamm'.*AdamW"):
        RunConfig(optimizer="adamm").validate()
    with pytest.raises(UsageError, match="closure"):
        RunConfig(optimizer="lbfgs").validate()
    with pytest.raises(UsageError, match="optimizer SGD does not accept .*momentum"):
        RunConfig(optimizer="sgd", optimizer_args={"momentum": -1}).validate()
    with pytest.raises(UsageError, match="optimizer AdamW does not accept"):
        RunConfig(optimizer="adamw", optimizer_args={"colour": 1}).validate()
    with pytest.raises(UsageError, match="steps on a metric"):
        RunConfig(lr_schedule="ReduceLROnPlateau").validate()
    with pytest.raises(UsageError, match="lr_schedule StepLR does not accept"):
        RunConfig(lr_schedule="StepLR").validate()
    with pytest.raises(UsageError, match="training needs an optimizer"):
        TrainConfig(optimizer="none").validate()


def test_parse_kwargs_json_and_key_values() -> None:
    assert parse_kwargs('{"betas": [0.8, 0.9]}', "x") == {"betas": [0.8, 0.9]}
    assert parse_kwargs("momentum=0.9,nesterov=true,mode=triangular", "x") == {
        "momentum": 0.9, "nesterov": True, "mode": "triangular"}
    with pytest.raises(UsageError, match="malformed item"):
        parse_kwargs("momentum", "--optimizer-args")


def test_composed_configs_share_the_run_and_keep_their_own_defaults() -> None:
    t, p = TrainConfig(method="full", steps=3), PerfConfig(method="full", repeats=2)
    assert t.run.method == p.run.method == "full" and t.steps == 3 and p.repeats == 2
    assert (t.clip, p.clip) == (1.0, None) and (t.seq_len, p.seq_len) == (64, 1024)
    assert PerfConfig(**p.flat()) == p and TrainConfig(run=t.run, steps=3) == t
    assert TrainConfig.schema()["clip"][1] == 1.0 and PerfConfig.schema()["clip"][1] is None
    with pytest.raises(TypeError, match="colour"):
        TrainConfig(colour="red")


def test_adamw_with_schedule_trains_and_records_the_rate(capsys: pytest.CaptureFixture) -> None:
    cfg = TrainConfig(**SMALL, steps=6, eval_every=3, optimizer="AdamW", lr=0.01,
                      optimizer_args={"weight_decay": 0.1}, lr_schedule="ExponentialLR",
                      lr_schedule_args={"gamma": 0.5})
    result = train(cfg)
    assert [r["update"] for r in result.curve] == [0, 3, 6] and result.diverged_at is None
    code = cli_main(["train", "--task", "copy", "--model", "rnn", "--method", "chunked:k=4", "--seq-len", "24",
                     "--batch", "2", "--hidden", "4", "--steps", "2", "--eval-every", "1", "--quiet", "--json",
                     "--optimizer", "rmsprop", "--optimizer-args", "alpha=0.9", "--lr-schedule", "StepLR",
                     "--lr-schedule-args", "step_size=1", "--clip-norm", "0.5"])
    assert code == 0 and '"optimizer": "rmsprop"' in capsys.readouterr().out
    assert cli_main(["train", "--optimizer", "adamm", "--steps", "1"]) == 2


def test_curves_record_equal_compute_axes() -> None:
    """Each curve row carries tokens and the compute proxy (recurrent steps forwarded + backpropagated,
    × batch), accumulated from the method's own updates (docs/design.md §3.7)."""
    from tbptt_bench.core.mask import update_steps
    from tbptt_bench.methods.base import parse_method
    from tbptt_bench.training.loop import TrainConfig, train

    cfg = TrainConfig(task="copy", model="rnn", method="tbptt:k1=4,k2=7", seq_len=24, batch_size=2, hidden_size=4,
                      steps=5, eval_every=1, eval_batches=1, seed=0)
    curve = train(cfg).curve
    per_sequence = parse_method("tbptt:k1=4,k2=7").updates(24)
    steps = [sum(update_steps(u)) * 2 for u in per_sequence]
    for row in curve:
        n = row["update"]
        assert row["tokens"] == sum(u.loss_end - u.loss_start for u in per_sequence[:n]) * 2
        assert row["compute_steps"] == sum(steps[:n])
