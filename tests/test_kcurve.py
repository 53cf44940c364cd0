"""The nested K curve against the engine and the brute-force reference (float64)."""

from __future__ import annotations

import numpy as np
import pytest

from tbptt_bench.analysis.gradients import method_gradient
from tbptt_bench.analysis.kcurve import ChunkShape, _split_level, chunk_shape, kcurve_gradients, plan
from tbptt_bench.core.mask import mask_matrix

from reference import masked_reference
from test_engine import assert_close, make_model, real_batch, token_batch
from test_protocol import LeakyTwoState


def test_chunk_shapes_are_read_from_the_updates() -> None:
    assert chunk_shape("chunked:k=4", 10) == ChunkShape(4, 0)
    assert chunk_shape("tbptt:k1=3,k2=8", 10) == ChunkShape(3, 5)
    assert chunk_shape("full", 10) == ChunkShape(10, 0)
    assert chunk_shape("tbptt:k1=4,k2=2", 10) is None  # k2 < k1: part of each segment gets no recurrence
    assert chunk_shape("sliding:k=3", 10) is None  # per-loss windows


def test_plan_groups_nested_ks_into_ladders() -> None:
    ladders, others = plan(["chunked:k=1", "chunked:k=2", "chunked:k=3", "tbptt:k1=4,k2=7", "chunked:k=6",
                            "sliding:k=2"], 12)
    assert [lad.levels for lad in ladders] == [[1, 2, 4], [3, 6]]
    assert [m.spec for m in others] == ["sliding:k=2"]
    assert ladders[0].base == 1 and ladders[1].base == 3


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("T", [8, 13])
def test_ladder_equals_engine(cell: str, T: int) -> None:
    """Every chunked/tbptt spec of a mixed grid, T a multiple of the top K or not (padding)."""
    specs = ["chunked:k=1", "chunked:k=2", "chunked:k=4", "chunked:k=8", "tbptt:k1=2,k2=3", "tbptt:k1=4,k2=7",
             "tbptt:k1=4,k2=11", "chunked:k=3", "chunked:k=6", "tbptt:k1=3,k2=9"]
    model = make_model(cell, layers=2 if cell == "lstm" else 1)
    batch = token_batch(T=T)
    grads = kcurve_gradients(model, batch, "cross_entropy", specs)
    assert {m.spec for m in grads} == set(specs)
    for method, g in grads.items():
        assert_close(g, method_gradient(model, batch, method, "cross_entropy"))


def test_ladder_equals_brute_force_reference_real_inputs() -> None:
    rng = np.random.default_rng(1)
    model = make_model("gru", "real")
    for _ in range(3):
        T = int(rng.integers(6, 15))
        base = int(rng.integers(1, 3))
        specs = [f"chunked:k={base}", f"chunked:k={2 * base}", f"tbptt:k1={2 * base},k2={2 * base + int(rng.integers(1, 5))}"]
        batch = real_batch(T=T, seed=int(rng.integers(1000)))
        for method, g in kcurve_gradients(model, batch, "mse", specs).items():
            ref = masked_reference(model, batch, mask_matrix(method.updates(T), T), "mse")
            assert_close(g, ref)


def test_user_model_tuple_state_without_readout_split() -> None:
    import torch

    torch.manual_seed(1)
    model = LeakyTwoState()
    batch = real_batch(B=2, T=10, C=2, D=1)
    specs = ["chunked:k=1", "chunked:k=2", "chunked:k=4", "tbptt:k1=2,k2=5"]
    for method, g in kcurve_gradients(model, batch, "mse", specs).items():
        assert_close(g, method_gradient(model, batch, method, "mse"))


LAYOUTS = [
    (["chunked:k=1", "chunked:k=2", "chunked:k=4", "chunked:k=8", "chunked:k=16"], 4),
    (["chunked:k=1", "chunked:k=2", "tbptt:k1=2,k2=3", "chunked:k=8", "tbptt:k1=8,k2=12", "tbptt:k1=8,k2=10"], 2),
    # ext 7 is no multiple of the coarse segment: the coarse graph gets an extra cut point 7 steps before each chunk
    (["chunked:k=2", "chunked:k=4", "chunked:k=8", "tbptt:k1=8,k2=15"], 2),
    (["chunked:k=4", "tbptt:k1=8,k2=15", "tbptt:k1=8,k2=11", "tbptt:k1=16,k2=31", "chunked:k=16"], 4),
    (["chunked:k=1", "chunked:k=2", "tbptt:k1=2,k2=3"], None),  # no rung between: one stage
]


@pytest.mark.parametrize("specs, split", LAYOUTS)
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_one_and_two_stage_layouts_equal_engine(specs, split, cell: str) -> None:  # type: ignore[no-untyped-def]
    """Two stages (coarse segments above the split rung) and one stage give the engine's gradients."""
    T = 21  # not a multiple of any K > 1: the last blocks are padded
    ladders, _ = plan(specs, T)
    assert len(ladders) == 1
    levels = sorted(set(ladders[0].levels) | {ladders[0].base})
    assert _split_level(ladders[0], levels) == split
    model = make_model(cell, layers=2 if cell == "lstm" else 1)
    batch = token_batch(T=T)
    for method, g in kcurve_gradients(model, batch, "cross_entropy", specs).items():
        assert_close(g, method_gradient(model, batch, method, "cross_entropy"))


def test_two_stage_user_model() -> None:
    import torch

    torch.manual_seed(3)
    model = LeakyTwoState()
    batch = real_batch(B=2, T=19, C=2, D=1)
    specs = LAYOUTS[1][0]
    for method, g in kcurve_gradients(model, batch, "mse", specs).items():
        assert_close(g, method_gradient(model, batch, method, "mse"))


def test_non_chunk_shaped_methods_are_left_out() -> None:
    model, batch = make_model("rnn"), token_batch(T=6)
    out = kcurve_gradients(model, batch, "cross_entropy", ["sliding:k=2", "tbptt:k1=3,k2=1"])
    assert out == {}


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_chunked_ladder_in_spans_equals_engine(cell: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ladders run on spans of a multiple of the top K (here 8 steps, T = 21: three spans, the last one
    short); TBPTT windows reaching back past a span's start get a zero-weighted lead-in of whole top-K chunks."""
    import tbptt_bench.analysis.kcurve as kcurve

    monkeypatch.setattr(kcurve, "SPAN", 8)
    model = make_model(cell, layers=2 if cell == "lstm" else 1)
    batch = token_batch(T=21)
    calls = []
    real = kcurve._ladder_gradients
    monkeypatch.setattr(kcurve, "_ladder_gradients", lambda *a, **k: calls.append(a[1].length) or real(*a, **k))
    specs = ["chunked:k=1", "chunked:k=2", "chunked:k=4"]
    for method, g in kcurve_gradients(model, batch, "cross_entropy", specs).items():
        assert_close(g, method_gradient(model, batch, method, "cross_entropy"))
    assert calls == [8, 8, 5]
    calls.clear()
    specs = [*specs, "tbptt:k1=4,k2=6", "tbptt:k1=2,k2=11"]  # extensions 2 and 9: lead-ins of 12 steps
    for method, g in kcurve_gradients(model, batch, "cross_entropy", specs).items():
        assert_close(g, method_gradient(model, batch, method, "cross_entropy"))
    assert calls == [8, 8 + 8, 5 + 12]
