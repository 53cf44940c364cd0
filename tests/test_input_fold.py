"""The input fold (docs/design.md §3.9): same outputs, gradients pulled back equal autograd's, K curves equal."""

from __future__ import annotations

import pytest
import torch

from tbptt_bench.analysis.gradients import method_gradient
from tbptt_bench.analysis.kcurve import kcurve_gradients
from tbptt_bench.models.protocol import input_fold

from test_engine import assert_close, make_model, real_batch, token_batch

CASES = [("rnn", "tokens"), ("lstm", "tokens"), ("gru", "tokens"), ("lstm", "real"), ("gru", "real")]


def narrow_model(cell: str, kind: str):  # type: ignore[no-untyped-def]
    """Inputs narrower than the hidden state (V = 5 tokens or 2 real features, H = 6): the fold applies."""
    return make_model(cell, kind, layers=2, H=6, V=5)


def batch_for(kind: str, T: int = 11):  # type: ignore[no-untyped-def]
    return token_batch(T=T) if kind == "tokens" else real_batch(T=T)


@pytest.mark.parametrize("cell, kind", CASES)
def test_folded_model_computes_the_same_outputs_and_pulls_gradients_back(cell: str, kind: str) -> None:
    model = narrow_model(cell, kind)
    fold = input_fold(model)
    assert fold is not None
    batch = batch_for(kind)
    state = model.initial_state(batch.batch_size)
    out, new = model(batch.inputs, state)
    f_out, f_new = fold.model(batch.inputs, state)
    torch.testing.assert_close(f_out, out, rtol=0, atol=1e-12)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=out.dtype)
    names = [n for n, _ in model.named_parameters()]
    expected = dict(zip(names, torch.autograd.grad((out * probe).sum(), list(model.parameters()))))
    f_names = [n for n, _ in fold.model.named_parameters()]
    f_grads = dict(zip(f_names, torch.autograd.grad((f_out * probe).sum(), list(fold.model.parameters()))))
    pulled = fold.pullback(f_grads)
    assert list(pulled) == names
    assert_close(pulled, expected)


def test_no_fold_where_it_cannot_help_or_is_not_exact() -> None:
    assert input_fold(make_model("lstm", H=4, V=5)) is None  # vocabulary wider than the hidden state
    assert input_fold(make_model("lstm", H=6, V=5, path="cell")) is None
    frozen = narrow_model("lstm", "tokens")
    frozen.encoder.weight.requires_grad_(False)
    assert input_fold(frozen) is None


@pytest.mark.parametrize("cell, kind", CASES)
def test_k_curve_on_the_fold_equals_the_engine(cell: str, kind: str) -> None:
    """chunked and TBPTT (extensions reused from the rung above and pushed alone) through the fold."""
    model = narrow_model(cell, kind)
    batch = batch_for(kind, T=13)
    loss = "cross_entropy" if kind == "tokens" else "mse"
    specs = ["chunked:k=1", "chunked:k=2", "chunked:k=4", "chunked:k=8", "tbptt:k1=2,k2=3", "tbptt:k1=4,k2=7",
             "tbptt:k1=4,k2=11", "tbptt:k1=8,k2=15"]
    folded = kcurve_gradients(model, batch, loss, specs)
    plain = kcurve_gradients(model, batch, loss, specs, fold=False)
    for method, g in folded.items():
        assert_close(g, method_gradient(model, batch, method, loss))
        assert_close(g, plain[method])
