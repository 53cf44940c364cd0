"""Adaptive K: the rule on a model whose lag profile is exactly geometric, and its schedule in training."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from tbptt_bench.methods.adaptive import Adaptive
from tbptt_bench.cli import main
from tbptt_bench.errors import UsageError
from tbptt_bench.methods.base import parse_method
from tbptt_bench.tasks.base import Batch
from tbptt_bench.training.loop import TrainConfig, train


class LinearRecurrence(nn.Module):
    """``h_t = ρ h_{t-1} + x_t U``, read-out ``y_t = w·h_t + b``: ∂h_t/∂h_{t-1} = ρ I exactly."""

    def __init__(self, rho: float, hidden: int = 3, channels: int = 2) -> None:
        super().__init__()
        self.rho, self.hidden = rho, hidden
        g = torch.Generator().manual_seed(0)
        self.u = nn.Parameter(torch.randn(channels, hidden, generator=g, dtype=torch.float64))
        self.readout = nn.Linear(hidden, 1).double()

    def initial_state(self, batch_size: int) -> torch.Tensor:
        return torch.zeros(1, batch_size, self.hidden, dtype=torch.float64)

    def core(self, inputs: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, out = state[0], []
        for t in range(inputs.shape[1]):
            h = self.rho * h + inputs[:, t] @ self.u
            out.append(h)
        return torch.stack(out, 1), h[None]

    def forward(self, inputs: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features, state = self.core(inputs, state)
        return self.readout(features), state


def geometric_case(rho: float, T: int = 30, B: int = 4) -> tuple[LinearRecurrence, Batch]:
    """Targets sit 0.5 below the predictions, so ∂loss_t/∂h_t is the same vector a for every t and row,
    and ∂loss_t/∂h_{t-d} = ρ^d a: the lag profile is φ_d = ρ^d ‖a‖ exactly."""
    model = LinearRecurrence(rho)
    x = torch.randn(B, T, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        y, _ = model(x, model.initial_state(B))
    return model, Batch(x, y - 0.5, torch.ones(B, T, dtype=torch.float64))


def closed_form_k(rho: float, T: int, D: int, delta: float, kmin: int, kmax: int) -> int:
    """The K the rule must pick, from the bound of tbptt_bench.core.lags written out for φ_d = ρ^d‖a‖.

    With every step scored, a fraction (T-d)/T of the losses has a lag d, so the mass sliding(K) drops is
    ‖a‖·S(K), S(K) = Σ_{d=K}^{T-1} ρ^d (T-d)/T; the kept state-space gradient over lags 1..K-1 has norm
    ‖a‖(S(1) - S(K)) (all adjoints are parallel), and the lower norm max_{K ≤ D+1} of kept minus dropped is
    ‖a‖(S(1) - 2 S(D+1)). The bound is S(K) / (S(1) - 2 S(D+1)).
    """
    def s(k: int) -> float:
        return sum(rho**d * (T - d) / T for d in range(k, T))

    lower = s(1) - 2 * s(D + 1)
    return next((k for k in range(kmin, kmax + 1) if s(k) / lower <= delta), kmax)


@pytest.mark.parametrize("rho,delta,kmin,kmax", [
    (0.5, 0.1, 2, 20), (0.8, 0.1, 2, 20), (0.8, 0.5, 2, 20), (0.9, 0.05, 1, 25),
    (0.95, 0.01, 2, 12),  # no K in range reaches δ: kmax
    (0.3, 0.9, 4, 10),  # every K in range is below δ: kmin
])
def test_rule_picks_the_closed_form_k_on_a_geometric_profile(rho, delta, kmin, kmax):
    T = 30
    model, batch = geometric_case(rho, T)
    method = parse_method(f"adaptive:delta={delta},kmin={kmin},kmax={kmax},every=10,window={T}")
    method.observe(0, model, batch, model.initial_state(batch.batch_size), "mse")
    k = closed_form_k(rho, T, min(T - 1, kmax), delta, kmin, kmax)
    assert method.k_used(0) == k
    assert method.history[0]["rate"] == pytest.approx(rho, rel=1e-9)
    assert method.updates(50) == parse_method(f"tbptt:k1={k},k2={2 * k - 1}").updates(50)


class Spy(Adaptive):
    """Records every observation training makes (the update count at each segment start)."""

    calls: list[int]

    def observe(self, update, model, source, state, loss_kind):  # type: ignore[no-untyped-def]
        self.__dict__.setdefault("calls", []).append(update)
        super().observe(update, model, source, state, loss_kind)


@pytest.mark.parametrize("extra", ["", ",k0=3"])
def test_training_re_estimates_every_n_updates_and_logs_k(extra):
    spec = f"adaptive:delta=0.5,kmin=2,kmax=6,every=7,window=16{extra}"
    method = Spy(**parse_method(spec).params)
    cfg = TrainConfig(task="copy-stream", method=spec, steps=30, seq_len=16, batch_size=2, hidden_size=4,
                      eval_every=30, eval_batches=1, lr=0.01,
                      task_params={"lag": 3, "length": 160, "valid_length": 16})
    result = train(cfg, method=method)
    due, last = [], None  # an estimate at the first segment start at least `every` updates after the last
    for c in method.calls:
        if (last is None and (not extra or c >= 7)) or (last is not None and c - last >= 7):
            due.append(c)
            last = c
    assert [h["update"] for h in method.history] == due
    k_at = {h["update"]: h["k"] for h in method.history}
    current = 3 if extra else None
    for n, k in enumerate(result.k_used):
        current = k_at.get(n, current)
        assert k == current
    assert len(result.k_used) == 30


def test_outside_training_it_uses_k0_or_kmax(caplog):
    with caplog.at_level(logging.WARNING):
        assert parse_method("adaptive:delta=0.1,kmin=2,kmax=9").k_used(0) == 9
    assert "no lag profile estimated" in caplog.text
    assert parse_method("adaptive:delta=0.1,k0=4,family=chunked").updates(8) == parse_method("chunked:k=4").updates(8)


@pytest.mark.parametrize("spec,needle", [
    ("adaptive:delta=0", "delta=0.0 must be a relative bias > 0"),
    ("adaptive:delta=-0.5", "delta=-0.5"),
    ("adaptive:delta=0.1,kmin=9,kmax=4", "kmin=9 must be ≤ kmax=4"),
    ("adaptive:delta=0.1,every=0", "every=0 must be an integer ≥ 1"),
    ("adaptive:delta=0.1,k0=1", "k0=1 must lie in [kmin, kmax]"),
    ("adaptive:kmin=2", "needs delta="),
])
def test_bad_specs_are_usage_errors(spec, needle, capsys):
    with pytest.raises(UsageError) as info:
        parse_method(spec)
    assert needle in str(info.value)
    assert main(["explain", spec, "--seq-len", "8"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
