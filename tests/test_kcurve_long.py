"""The streamed chunked K curve (long horizons) against the engine's per-K runs, in float64."""

from __future__ import annotations

import pytest

from tbptt_bench.analysis.gradients import method_gradient, true_gradient
from tbptt_bench.analysis.kcurve import effective_context, streamed_chunked_curve
from tbptt_bench.errors import UsageError
from tbptt_bench.tasks.base import Batch

from test_engine import assert_close, make_model, real_batch, token_batch


class RecordingSource:
    """A source that remembers every slice it handed out, and the longest (streaming: never the whole sequence)."""

    def __init__(self, batch: Batch) -> None:
        self.batch, self.longest, self.asked = batch, 0, []

    @property
    def batch_size(self) -> int:
        return self.batch.batch_size

    @property
    def length(self) -> int:
        return self.batch.length

    def slice(self, a: int, b: int) -> Batch:
        self.longest = max(self.longest, b - a)
        self.asked.append((a, b))
        return self.batch.slice(a, b)


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("T, ks, span", [(37, [1, 2, 4, 8, 16], 4), (40, [2, 4, 8, 16, 32], 8), (23, [3, 6, 12], 6)])
def test_streamed_curve_equals_engine_per_k(cell: str, T: int, ks: list[int], span: int) -> None:
    """Small K from the ladder on spans, large K chunk by chunk with checkpointing; T not a multiple of K."""
    model = make_model(cell, layers=2 if cell == "lstm" else 1)
    batch = token_batch(T=T)
    out = streamed_chunked_curve(model, batch, "cross_entropy", ks, span=span, checkpoint=3)
    assert sorted(out.gradients) == ks
    for k, g in out.gradients.items():
        assert_close(g, method_gradient(model, batch, f"chunked:k={k}", "cross_entropy"))
    assert out.truth is not None
    assert_close(out.truth, true_gradient(model, batch, "cross_entropy"))


def test_streamed_curve_from_a_carried_state_real_inputs() -> None:
    model = make_model("gru", "real")
    batch = real_batch(T=30, seed=4)
    h0 = model.initial_state(batch.batch_size) + 0.3
    out = streamed_chunked_curve(model, batch, "mse", [1, 2, 4, 8, 16], state=h0, span=4, checkpoint=5)
    for k, g in out.gradients.items():
        assert_close(g, method_gradient(model, batch, f"chunked:k={k}", "mse", state=h0))
    assert_close(out.truth, true_gradient(model, batch, "mse", state=h0))


def test_streamed_curve_reads_the_data_in_slices() -> None:
    """With span 8 and checkpoint 4, no slice longer than the largest chunk except the truth's segments."""
    model = make_model("lstm")
    source = RecordingSource(token_batch(T=64))
    streamed_chunked_curve(model, source, "cross_entropy", [1, 2, 4, 8, 16], span=8, checkpoint=4, with_truth=False)
    assert source.longest == 16


@pytest.mark.parametrize("ks, message", [([2, 3], "nested"), ([], "empty"), ([0, 2], "1..T"), ([4, 128], "1..T")])
def test_bad_grids_are_refused(ks: list[int], message: str) -> None:
    model, batch = make_model("rnn"), token_batch(T=16)
    with pytest.raises(UsageError, match=message):
        streamed_chunked_curve(model, batch, "cross_entropy", ks)


def test_span_must_be_a_multiple_of_the_ks_it_covers() -> None:
    with pytest.raises(UsageError, match="span"):
        streamed_chunked_curve(make_model("rnn"), token_batch(T=16), "cross_entropy", [2, 4, 8], span=6)


def test_effective_context_is_the_smallest_k_at_or_below_the_level() -> None:
    curve = {1: 0.9, 2: 0.4, 4: 0.06, 8: 0.04, 16: 0.009, 32: 0.02}
    assert effective_context(curve, 0.05) == 8
    assert effective_context(curve, 0.01) == 16
    assert effective_context(curve, 0.001) is None
