"""A stream fed in pieces (``TBPTT(boundary="carry")``) against the same stream fed whole (float64).

The whole stream is run by the engine directly with the method's updates over its full length — no
plan, no buffer, no horizon — and, for the summed gradient, by the brute-force masked reference.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tbptt_bench.core.engine import Engine
from tbptt_bench.core.mask import mask_matrix
from tbptt_bench.loop import TBPTT
from tbptt_bench.methods.base import parse_method
from tbptt_bench.seeding import method_rng
from tbptt_bench.tasks.base import Batch

from reference import masked_reference
from test_attention import sab
from test_loop import assert_close, grads, model_of

FAMILIES = [
    "full", "full:checkpoint=2", "chunked:k=3", "tbptt:k1=4,k2=2", "tbptt:k1=2,k2=5", "tbptt:k1=3,k2=7",
    "tbptt:k1=3,k2=3", "sliding:k=3", "sliding:k=4,k1=2", "hybrid:k1=2,k2=2,every=2,long=5",
    "hybrid:k1=3,every=2", "artbp:c=0.3,min=2", "stepped:k=2,then=3@3", "curriculum:start=1,end=4,over=5",
    "stepped:k=2,then=4@4,family=overlap", "curriculum:start=2,end=5,over=6,family=sliding",
]


def stream_batch(T: int, B: int = 3, V: int = 5, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (B, T), generator=g)
    y = torch.randint(0, V, (B, T), generator=g)
    w = (torch.rand(B, T, generator=g, dtype=torch.float64) > 0.2).to(torch.float64)
    return Batch(x, y, w)


def random_pieces(whole: Batch, rng: np.random.Generator, longest: int = 8) -> list[Batch]:
    """Consecutive pieces of random lengths 0..longest (empty pieces included)."""
    bounds, p = [0], 0
    while p < whole.length:
        p = min(whole.length, p + int(rng.integers(0, longest + 1)))
        bounds.append(p)
    return [whole.slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def per_update(steps, model) -> list[tuple]:
    """(update, loss, gradient) of each step, the gradient of that update alone."""
    out = []
    for step in steps:
        model.zero_grad(set_to_none=True)
        step.backward() if hasattr(step, "backward") else step.loss.backward()
        out.append((step.update, float(step.loss.detach()), grads(model)))
    return out


def whole_stream(model, whole: Batch, spec: str, seed: int) -> list[tuple]:
    updates = parse_method(spec).updates(whole.length, rng=method_rng(seed))
    engine = Engine(model, "cross_entropy")
    return per_update(engine.steps(whole, updates, model.initial_state(whole.batch_size)), model)


@pytest.mark.parametrize("spec", FAMILIES)
def test_pieces_of_random_lengths_give_the_updates_of_the_whole_stream(spec):
    """Every update (positions, loss, gradient) equals the whole stream's, to 1e-12, whatever the piece
    lengths (0, shorter than k1 and k2, longer); the summed gradient is the brute-force reference."""
    model = model_of("lstm")
    whole = stream_batch(37)
    reference = whole_stream(model, whole, spec, seed=5)
    for trial in range(3):
        pieces = random_pieces(whole, np.random.default_rng(trial))
        got = per_update(TBPTT(model, spec, seed=5).stream(pieces), model)
        assert [u for u, _, _ in got] == [u for u, _, _ in reference]
        for (_, loss, g), (_, loss_ref, g_ref) in zip(got, reference):
            assert abs(loss - loss_ref) <= 1e-12
            assert_close(g, g_ref, tol=1e-12)
    if spec in ("tbptt:k1=3,k2=7", "sliding:k=3", "artbp:c=0.3,min=2"):
        total = {n: sum(g[n] for _, _, g in got) for n in got[0][2]}
        updates = parse_method(spec).updates(whole.length, rng=method_rng(5))
        assert_close(total, masked_reference(model, whole, mask_matrix(updates, whole.length), "cross_entropy"))


@pytest.mark.parametrize("spec", ["tbptt:k1=2,k2=5", "tbptt:k1=4,k2=2", "sliding:k=4,k1=2", "artbp:c=0.3,min=2",
                                  "hybrid:k1=2,k2=2,every=2,long=5", "stepped:k=2,then=4@4,family=overlap"])
def test_training_over_pieces_equals_training_over_the_whole_stream(spec):
    """SGD stepped after every update: the same losses and parameters as the engine's own run over the
    whole stream (windows recomputed from the states stored at the same moments). The stream ends at a
    multiple of k1: a trailing tbptt(k1 > k2) update's window depends on where the stream ends, which
    the pieces cannot know before it does (docs/design.md §2.8)."""
    whole = stream_batch(40, seed=2)
    a, b = model_of("gru"), model_of("gru")
    opt_a = torch.optim.SGD(a.parameters(), lr=0.3)
    losses_a = []
    for step in TBPTT(a, spec, seed=4).stream(random_pieces(whole, np.random.default_rng(7))):
        step.loss.backward()
        opt_a.step()
        opt_a.zero_grad()
        losses_a.append(float(step.loss.detach()))
    opt_b = torch.optim.SGD(b.parameters(), lr=0.3)

    def on_update(i, u, loss):
        opt_b.step()
        opt_b.zero_grad()

    updates = parse_method(spec).updates(whole.length, rng=method_rng(4))
    run = Engine(b, "cross_entropy").run(whole, updates, b.initial_state(3), on_update)
    np.testing.assert_allclose(losses_a, run.update_losses.tolist(), rtol=0, atol=1e-12)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-12, msg=n)


def test_memory_and_planning_stay_bounded_by_the_window():
    """A long stream in short pieces: the data held and the plan's restart follow the window."""
    model = model_of("rnn")
    whole = stream_batch(400, seed=3)
    tb = TBPTT(model, "tbptt:k1=3,k2=7")
    held, behind = [], []
    for piece in random_pieces(whole, np.random.default_rng(0), longest=6):
        for step in tb.steps(piece):
            step.loss.backward()
        held.append(tb.held_steps)
        behind.append(tb._open.buffer.length - tb._open.plan.restart)
    # the oldest state needed is at most k2 - 1 steps before the last settled update's end; a
    # partial segment (< k1) and the newest piece (≤ 6) come on top
    assert max(held) <= 7 + 3 + 6
    assert max(behind) <= 7 + 3 + 6


def test_updates_fall_at_multiples_of_k1_along_the_stream_and_wait_for_the_next_piece():
    model = model_of("rnn")
    whole = stream_batch(10)
    tb = TBPTT(model, "tbptt:k1=4,k2=6")
    ends = [[s.update.loss_end for s in tb.steps(piece)] for piece in (whole.slice(0, 3), whole.slice(3, 9))]
    assert ends == [[], [4, 8]]
    closing = [s.update for s in tb.flush()]
    assert [(u.loss_start, u.loss_end) for u in closing] == [(8, 9)]
    cut = TBPTT(model, "tbptt:k1=4,k2=6", boundary="cut")
    assert [[s.update.loss_end for s in cut.steps(p)] for p in (whole.slice(0, 3), whole.slice(3, 9))] == [[3], [4, 6]]


def test_reset_closes_the_waiting_losses_and_starts_a_new_stream():
    model = model_of("gru")
    whole = stream_batch(12)
    tb = TBPTT(model, "chunked:k=5")
    assert [s.update.loss_end for s in tb.steps(whole.slice(0, 7))] == [5]
    tb.reset()
    steps = list(tb.steps(whole.slice(7, 12)))
    assert [(s.update.loss_start, s.update.loss_end) for s in steps] == [(5, 7), (0, 5)]
    with torch.no_grad():
        _, h = model(whole.inputs[:, 7:12], model.initial_state(3))
    torch.testing.assert_close(steps[-1].state, h, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("boundary", ["carry", "cut"])
@pytest.mark.parametrize("spec", ["full", "chunked:k=3", "tbptt:k1=2,k2=4", "sliding:k=2"])
def test_an_empty_batch_yields_no_step(spec, boundary):
    tb = TBPTT(model_of("rnn"), spec, boundary=boundary)
    assert list(tb.steps(stream_batch(0))) == []
    assert list(tb.flush()) == []


@pytest.mark.parametrize("spec", ["tbptt:k1=2,k2=5", "sliding:k=3", "artbp:c=0.3,min=2", "chunked:k=3"])
def test_a_model_whose_memory_crosses_cuts_streams_like_the_whole_stream(spec):
    """sab (memory differentiable across cuts, docs/design.md §7.1): fed in pieces, every update's loss
    and gradient equal the whole stream's, the cross-cut path included."""
    model = sab()
    whole = stream_batch(17, B=2)
    reference = whole_stream(model, whole, spec, seed=5)
    got = per_update(TBPTT(model, spec, seed=5).stream(random_pieces(whole, np.random.default_rng(1), longest=5)), model)
    assert [u for u, _, _ in got] == [u for u, _, _ in reference]
    for (_, loss, g), (_, loss_ref, g_ref) in zip(got, reference):
        assert abs(loss - loss_ref) <= 1e-12
        assert_close(g, g_ref, tol=1e-12)


@pytest.mark.parametrize("spec", ["tbptt:k1=2,k2=5", "sliding:k=3"])
def test_training_a_model_whose_memory_crosses_cuts_over_pieces_equals_the_whole_stream(spec):
    whole = stream_batch(18, B=2, seed=2)
    a, b = sab(), sab()
    opt_a, opt_b = torch.optim.SGD(a.parameters(), lr=0.3), torch.optim.SGD(b.parameters(), lr=0.3)
    losses = []
    for step in TBPTT(a, spec, seed=4).stream(random_pieces(whole, np.random.default_rng(7), longest=5)):
        step.loss.backward()
        opt_a.step()
        opt_a.zero_grad()
        losses.append(float(step.loss.detach()))

    def on_update(i, u, loss):
        opt_b.step()
        opt_b.zero_grad()

    updates = parse_method(spec).updates(whole.length, rng=method_rng(4))
    run = Engine(b, "cross_entropy").run(whole, updates, b.initial_state(2), on_update)
    np.testing.assert_allclose(losses, run.update_losses.tolist(), rtol=0, atol=1e-12)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-12, msg=n)
