"""Online training with forward-mode estimators (docs/online.md, "Online training").

Checks against independent computations: one update over a whole sequence equals one optimiser step
with the full-BPTT gradient (trained through the engine); RTRL with an update every step equals a
hand-written loop (cell written out, Jacobians by autograd, SGD, influence carried); a stream walked in
short segments equals the same stream in one segment (state and influence carried across segments).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tbptt_bench.cli import main
from tbptt_bench.core.build import make_task
from tbptt_bench.core.forward_mode import OnlineEngine, run_forward_mode
from tbptt_bench.core.mask import Update
from tbptt_bench.errors import UsageError
from tbptt_bench.methods.base import parse_method
from tbptt_bench.perf.config import PerfConfig
from tbptt_bench.training.loop import TrainConfig, train
from tbptt_bench.training.run import build_run

from test_engine import make_model, token_batch

EXACT: dict[str, Any] = {"dtype": "float64", "optimizer": "sgd", "lr": 0.5, "clip": None}


def snapshots(cfg: TrainConfig) -> tuple[list[dict[str, torch.Tensor]], Any]:
    """θ after every evaluation (``eval_every`` updates, and at the start), and the training result."""
    seen: list[dict[str, torch.Tensor]] = []

    def grab(update: int, model: torch.nn.Module) -> dict[str, Any]:
        seen.append({n: p.detach().clone() for n, p in model.named_parameters()})
        return {}

    return seen, train(cfg, on_eval=grab)


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tol: float = 1e-10) -> None:
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=tol, atol=tol, msg=n)


def distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[n] - b[n]).abs().max()) for n in a)


@pytest.mark.parametrize("model", ["rnn", "lstm"])
def test_one_update_over_the_sequence_is_one_full_bptt_step(model: str) -> None:
    T = 7
    common = dict(task="copy-stream", task_params={"lag": 2, "length": 40}, model=model, seq_len=T,
                  batch_size=3, hidden_size=3, steps=1, eval_every=1, **EXACT)
    online, r_online = snapshots(TrainConfig(method=f"rtrl:every={T}", **common))
    full, r_full = snapshots(TrainConfig(method="full", **common))
    assert_same(online[0], full[0])
    assert distance(online[1], online[0]) > 1e-3  # the step moved θ
    assert_same(online[1], full[1])
    assert r_online.final["train_loss"] == pytest.approx(r_full.final["train_loss"], rel=1e-12)
    assert r_online.final["tokens"] == r_full.final["tokens"] == 3 * T
    assert r_online.final["compute_steps"] == 3 * T  # forward steps only (docs/online.md)


def hand_rtrl_training(model: torch.nn.Module, tokens: torch.Tensor, targets: torch.Tensor,
                       weights: torch.Tensor, lr: float) -> list[dict[str, torch.Tensor]]:
    """Online RTRL with SGD after every step for a one-layer tanh RNN with an embedding, written out:
    h = tanh(W_ih E[x] + b_ih + W_hh h + b_hh), y = W_o h + b_o, cross-entropy summed over rows / B."""
    names = ["encoder.weight", "rnn.weight_ih_l0", "rnn.weight_hh_l0", "rnn.bias_ih_l0", "rnn.bias_hh_l0"]
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    B, T = tokens.shape
    H = theta["rnn.weight_hh_l0"].shape[0]

    def cell(flat: torch.Tensor, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        p, at = {}, 0
        for n in names:
            k = theta[n].numel()
            p[n] = flat[at:at + k].view(theta[n].shape)
            at += k
        u = p["encoder.weight"][x]
        return torch.tanh(p["rnn.weight_ih_l0"] @ u + p["rnn.bias_ih_l0"] + p["rnn.weight_hh_l0"] @ h + p["rnn.bias_hh_l0"])

    h = torch.zeros(B, H, dtype=torch.float64)
    J = [torch.zeros(H, sum(theta[n].numel() for n in names), dtype=torch.float64) for _ in range(B)]
    out = []
    for t in range(T):
        flat = torch.cat([theta[n].reshape(-1) for n in names])
        new_h = torch.stack([cell(flat, tokens[b, t], h[b]) for b in range(B)])
        for b in range(B):
            I_t, D_t = torch.autograd.functional.jacobian(lambda f, s: cell(f, tokens[b, t], s), (flat, h[b]))
            J[b] = D_t @ J[b] + I_t
        h = new_h.detach()
        leaf = h.clone().requires_grad_(True)
        Wo = theta["readout.weight"].clone().requires_grad_(True)
        bo = theta["readout.bias"].clone().requires_grad_(True)
        logits = leaf @ Wo.T + bo
        per = torch.nn.functional.cross_entropy(logits, targets[:, t], reduction="none")
        loss = (per * weights[:, t]).sum() / B
        dh, dWo, dbo = torch.autograd.grad(loss, (leaf, Wo, bo))
        g = sum(dh[b] @ J[b] for b in range(B))
        at = 0
        for n in names:
            k = theta[n].numel()
            theta[n] = theta[n] - lr * g[at:at + k].view(theta[n].shape)
            at += k
        theta["readout.weight"] = theta["readout.weight"] - lr * dWo
        theta["readout.bias"] = theta["readout.bias"] - lr * dbo
        out.append({n: v.clone() for n, v in theta.items()})
    return out


def test_rtrl_every_step_equals_a_hand_written_online_loop() -> None:
    T, B = 3, 2
    task_params = {"lag": 1, "length": 30, "n_symbols": 3}
    cfg = TrainConfig(task="copy-stream", task_params=task_params, model="rnn", method="rtrl:every=1", seq_len=T,
                      batch_size=B, hidden_size=3, steps=T, eval_every=1, **EXACT)
    seen, _ = snapshots(cfg)
    model = build_run(cfg.run).model  # θ at initialisation, from the same seed
    stream = make_task("copy-stream", **task_params).stream(B, "train").slice(0, T)
    hand = hand_rtrl_training(model, stream.inputs, stream.targets, stream.weights.double(), cfg.lr)
    assert_same(seen[0], {n: p.detach() for n, p in model.named_parameters()})
    for t in range(T):
        moved = distance(seen[t + 1], seen[t])
        assert moved == 0.0 if t == 0 else moved > 1e-4  # step 0 is unscored at lag 1
        assert_same(seen[t + 1], hand[t])


def test_state_and_influence_are_carried_across_stream_segments() -> None:
    """Two segments of 3 steps (one update each) train exactly as one segment of 6 with an update every
    3 steps; resetting the influence at the segment start (= chunked:k=3 here) would differ."""
    common = dict(task="char-lm", model="rnn", batch_size=2, hidden_size=3, steps=2, eval_every=1, eval_batches=1,
                  **EXACT)
    short, _ = snapshots(TrainConfig(method="rtrl:every=3", seq_len=3, **common))
    long, _ = snapshots(TrainConfig(method="rtrl:every=3", seq_len=6, **common))
    chunked, _ = snapshots(TrainConfig(method="chunked:k=3", seq_len=3, **common))
    assert_same(short[1], long[1])
    assert_same(short[1], chunked[1])  # the first update sees no earlier segment
    assert_same(short[2], long[2])
    assert distance(short[2], chunked[2]) > 1e-6


def test_uoro_training_is_reproducible_for_a_seed_and_differs_across_seeds() -> None:
    common = dict(task="adding", model="gru", method="uoro:every=2", seq_len=6, batch_size=2, hidden_size=4,
                  steps=6, eval_every=3, dtype="float64")
    a, ra = snapshots(TrainConfig(seed=1, **common))
    b, rb = snapshots(TrainConfig(seed=1, **common))
    c, _ = snapshots(TrainConfig(seed=2, **common))
    untimed = [[{k: v for k, v in row.items() if k != "wall_time"} for row in r.curve] for r in (ra, rb)]
    assert untimed[0] == untimed[1] and ra.diverged_at is None
    for x, y in zip(a, b):
        assert_same(x, y, 0.0)
    assert len(ra.curve) == 3 and all(row["eval_loss"] > 0 for row in ra.curve)
    assert distance(a[-1], c[-1]) > 1e-6


def test_online_engine_at_fixed_theta_accumulates_the_forward_mode_estimate() -> None:
    model = make_model("gru", layers=2)
    batch = token_batch(B=2, T=5)
    method = parse_method("snap:n=1")
    engine = OnlineEngine(model, "cross_entropy", method.estimator)
    seen: list[int] = []
    result = engine.run(batch, method.updates(5), model.initial_state(2), lambda i, u, loss: seen.append(i))
    ref = run_forward_mode(model, batch, "cross_entropy", model.initial_state(2), method.estimator)
    assert seen == [0, 1, 2, 3, 4] and len(result.update_losses) == 5
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref.gradient[n], rtol=1e-10, atol=1e-10)
    for x, y in zip(result.final_state, ref.final_state):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)
    with pytest.raises(UsageError, match="consecutive losses"):
        engine.run(batch, [Update(0, 2, 0), Update(3, 5, 0)], model.initial_state(2))


def test_the_cost_harness_times_online_methods_on_their_own_engine() -> None:
    """The perf workload runs an online method through its forward-mode engine: without an optimiser
    one timed sequence accumulates RTRL's estimate, which is the full gradient (docs/online.md)."""
    import torch

    from tbptt_bench.analysis.gradients import true_gradient
    from tbptt_bench.core.forward_mode import OnlineEngine
    from tbptt_bench.perf.harness import Workload

    cfg = PerfConfig(task="adding", model="rnn", method="rtrl", seq_len=6, batch_size=2, hidden_size=3,
                     optimizer="none", dtype="float64", threads=1)
    cfg.validate()
    work = Workload(cfg, torch.device("cpu"), torch.float64)
    assert isinstance(work.engine, OnlineEngine)
    work.sequence(work.prepare())
    truth = true_gradient(work.model, work.batch.to("cpu", torch.float64), work.task.loss_kind)
    for name, p in work.model.named_parameters():
        torch.testing.assert_close(p.grad, truth[name], rtol=1e-10, atol=1e-12)
    code = main(["train", "--task", "adding", "--model", "rnn", "--method", "rflo", "--seq-len", "6", "--hidden", "3",
                 "--steps", "2", "--batch", "2", "--quiet"])
    assert code == 0
