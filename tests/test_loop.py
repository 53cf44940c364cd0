"""The TBPTT utility for users' loops against the brute-force reference and against the engine (float64)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from tbptt_bench.core.engine import Engine
from tbptt_bench.core.mask import mask_matrix
from tbptt_bench.errors import UsageError
from tbptt_bench.loop import TBPTT, as_batch, autocast_supported, wrap_rnn
from tbptt_bench.methods.base import parse_method
from tbptt_bench.models.recurrent import RecurrentNet
from tbptt_bench.seeding import derive_seed
from tbptt_bench.tasks.base import Batch

from reference import masked_reference


def model_of(cell: str = "lstm", seed: int = 0, H: int = 4, V: int = 5) -> RecurrentNet:
    torch.manual_seed(seed)
    model = RecurrentNet(cell, "tokens", V, V, H, 1).double()
    with torch.no_grad():  # larger recurrent weights so that long lags matter
        for n, p in model.named_parameters():
            if "weight_hh" in n:
                p.mul_(3.0)
    return model


def batches(n: int, B: int = 3, T: int = 9, V: int = 5, seed: int = 0) -> list[Batch]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randint(0, V, (B, T), generator=g)
        y = torch.randint(0, V, (B, T), generator=g)
        w = (torch.rand(B, T, generator=g, dtype=torch.float64) > 0.2).to(torch.float64)
        out.append(Batch(x, y, w))
    return out


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}


def assert_close(a: dict, b: dict, tol: float = 1e-10) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=tol, atol=tol, msg=lambda m: f"{k}: {m}")


def stream_reference(model, data: list[Batch], spec: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Σ over batches of the masked brute-force gradient, each batch from the carried true state."""
    method = parse_method(spec)
    rng = np.random.default_rng(derive_seed("method", seed))
    total = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    state, count = model.initial_state(data[0].batch_size), 0
    for batch in data:
        updates = method.updates(batch.length, first_update=count, rng=rng)
        count += len(updates)
        ref = masked_reference(model, batch, mask_matrix(updates, batch.length), "cross_entropy", state)
        for n in total:
            total[n] += ref[n]
        with torch.no_grad():
            _, state = model(batch.inputs, state)
    return total


def run_utility(model, data: list[Batch], spec: str, boundary: str = "cut") -> tuple[dict[str, torch.Tensor], TBPTT]:
    model.zero_grad(set_to_none=True)
    tb = TBPTT(model, spec, boundary=boundary)
    for step in tb.stream(data):
        step.loss.backward()
    return grads(model), tb


FAMILIES = [
    "full", "chunked:k=3", "tbptt:k1=4,k2=2", "tbptt:k1=2,k2=5", "tbptt:k1=3,k2=3", "sliding:k=3",
    "sliding:k=4,k1=2", "hybrid:k1=2,k2=2,every=2,long=5", "artbp:c=0.3,min=2",
    "stepped:k=2,then=3@3", "curriculum:start=1,end=4,over=5", "full:checkpoint=2",
]


@pytest.mark.parametrize("spec", FAMILIES)
def test_every_family_over_a_stream_equals_the_brute_force_reference(spec):
    """boundary='cut', two batches of T = 9 (not a multiple of k1) with the state carried: the
    accumulated gradient is the sum of each batch's masked reference from its carried state, update
    counts running on."""
    model = model_of("lstm")
    data = batches(2)
    got, tb = run_utility(model, data, spec)
    assert_close(got, stream_reference(model, data, spec))
    assert tb.batches_done == 2


def test_adaptive_uses_the_k_it_estimated():
    model = model_of("gru")
    data = batches(1, T=12)
    got, tb = run_utility(model, data, "adaptive:delta=0.2,kmin=1,kmax=6,every=100,window=8,family=chunked")
    assert len(tb.method.history) == 1  # estimated once, before the first update
    updates = tb.method.updates(12)
    ref = masked_reference(model, data[0], mask_matrix(updates, 12), "cross_entropy")
    assert_close(got, ref)


def test_random_k1_k2_and_lengths_against_the_reference():
    rng = np.random.default_rng(1)
    model = model_of("gru")
    for i in range(5):
        T = int(rng.integers(3, 11))
        k1, k2 = (int(v) for v in rng.integers(1, 8, size=2))
        data = batches(2, T=T, seed=i)
        spec = f"tbptt:k1={k1},k2={k2}"
        got, _ = run_utility(model, data, spec)
        assert_close(got, stream_reference(model, data, spec))


@pytest.mark.parametrize("spec", ["tbptt:k1=2,k2=5", "tbptt:k1=4,k2=1", "sliding:k=3", "artbp:c=0.4,min=1"])
def test_training_with_the_callers_optimiser_equals_the_engines_training(spec):
    """SGD stepped by the caller after every update: the same parameters as the engine's own run with
    an on_update callback (windows recomputed with the current θ, state carried across batches)."""
    data = batches(3)
    a, b = model_of("lstm"), model_of("lstm")
    opt_a = torch.optim.SGD(a.parameters(), lr=0.1)
    tb = TBPTT(a, spec, boundary="cut", seed=3)
    losses_a = []
    for step in tb.stream(data):
        step.loss.backward()
        opt_a.step()
        opt_a.zero_grad()
        losses_a.append(float(step.loss.detach()))
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1)
    method, engine = parse_method(spec), Engine(b, "cross_entropy")
    rng = np.random.default_rng(derive_seed("method", 3))
    state, count, losses_b = b.initial_state(3), 0, []

    def on_update(i, u, loss):
        opt_b.step()
        opt_b.zero_grad()
        losses_b.append(float(loss))

    for batch in data:
        updates = method.updates(batch.length, first_update=count, rng=rng)
        count += len(updates)
        state = engine.run(batch, updates, state, on_update).final_state
    assert losses_a == losses_b
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), n
    for sa, sb in zip(tb.state, state):
        assert torch.equal(sa, sb)


def test_the_utility_never_touches_the_optimiser_or_scheduler():
    model = model_of("rnn").float()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    before = [p.detach().clone() for p in model.parameters()]
    tb = TBPTT(model, "chunked:k=3")
    n = 0
    for step in tb.steps(batches(1)[0]):
        step.loss.backward()
        n += 1
    assert n == 3
    assert opt.state_dict()["state"] == {} and sched.last_epoch == 0 and opt.param_groups[0]["lr"] == 1e-2
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.skipif(not autocast_supported(torch.bfloat16), reason="this CPU has no bf16 LSTM kernel (oneDNN needs AVX-512)")
def test_bfloat16_autocast_on_cpu_gives_finite_gradients_and_a_float32_carried_state():
    torch.manual_seed(0)
    model = wrap_rnn(nn.LSTM(6, 8, batch_first=True), nn.Linear(8, 5), nn.Embedding(5, 6))
    tb = TBPTT(model, "tbptt:k1=3,k2=5", autocast=torch.bfloat16)
    data = [(b.inputs, b.targets) for b in batches(2, T=10)]
    dtypes = set()
    for step in tb.stream(data):
        step.loss.backward()
        dtypes.add(step.state[0].dtype)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert all(p.grad.abs().sum() > 0 for p in model.parameters())
    assert tb.state[0].dtype == torch.float32
    assert dtypes == {torch.float32}


def test_wrap_rnn_equals_the_built_in_model():
    """wrap_rnn(nn.LSTM, head, embedding) is the same model as the built-in lstm: same gradients."""
    ours = model_of("lstm")
    theirs = wrap_rnn(ours.rnn, ours.readout, ours.encoder)
    data = batches(2)
    a, _ = run_utility(ours, data, "tbptt:k1=2,k2=4")
    b, _ = run_utility(theirs, data, "tbptt:k1=2,k2=4")
    assert_close({k.replace("head", "readout"): v for k, v in b.items()}, a, tol=0)


def test_reset_and_early_break_carry_the_right_state():
    model = model_of("gru")
    data = batches(2)
    tb = TBPTT(model, "chunked:k=4", boundary="cut")
    for step in tb.steps(data[0]):
        if step.update.loss_end == 4:
            break
    with torch.no_grad():
        _, h4 = model(data[0].inputs[:, :4], model.initial_state(3))
    torch.testing.assert_close(tb.state, h4, rtol=0, atol=0)
    tb.reset()
    assert tb.state is None
    list(tb.steps(data[1]))
    with torch.no_grad():
        _, h = model(data[1].inputs, model.initial_state(3))
    torch.testing.assert_close(tb.state, h, rtol=1e-12, atol=1e-12)


def test_bad_input_is_a_usage_error():
    model = model_of("gru")
    with pytest.raises(UsageError, match="unknown loss"):
        TBPTT(model, "chunked:k=2", loss="nll")
    with pytest.raises(UsageError, match="batch_first"):
        wrap_rnn(nn.GRU(3, 4), nn.Linear(4, 2))
    with pytest.raises(UsageError, match="bidirectional"):
        wrap_rnn(nn.GRU(3, 4, batch_first=True, bidirectional=True), nn.Linear(8, 2))
    with pytest.raises(UsageError, match="weights"):
        as_batch((torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 4)))
    tb = TBPTT(model, "chunked:k=2")
    list(tb.steps(batches(1, B=3)[0]))
    with pytest.raises(UsageError, match="reset"):
        list(tb.steps(batches(1, B=2)[0]))


def test_one_engine_over_two_sources_forgets_the_first_sources_states():
    """Regression: the per-loss window states of sliding(K) were kept across runs of one engine, so a
    second segment reused the first segment's states (training over a stream with sliding)."""
    model = model_of("rnn")
    first, second = batches(2)
    updates = parse_method("sliding:k=3").updates(9)
    engine = Engine(model, "cross_entropy")
    engine.run(first, updates, model.initial_state(3))
    model.zero_grad(set_to_none=True)
    engine.run(second, updates, model.initial_state(3))
    reused = grads(model)
    model.zero_grad(set_to_none=True)
    Engine(model, "cross_entropy").run(second, updates, model.initial_state(3))
    assert_close(reused, grads(model), tol=0)


def test_autocast_supported_answers_from_a_real_forward_and_backward():
    """The cached answer for bf16 is what a direct attempt with another LSTM shape gives."""
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, _ = nn.LSTM(3, 4, batch_first=True)(torch.ones(2, 5, 3))
        out.float().sum().backward()
        works = True
    except RuntimeError:
        works = False
    assert autocast_supported(torch.bfloat16) is works
