"""Each family's mask against its definition in DESIGN.md §2, written out independently (1-based)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tbptt_bench.core.mask import mask_matrix, step_counts, update_owner
from tbptt_bench.methods.base import parse_method


def tbptt_definition(T: int, k1: int, k2: int) -> np.ndarray:
    """m[t, s] for 1-based t, s: ℓ_t in (u-k1, u] belongs to update u = k1·⌈t/k1⌉ and reaches s ≥ u-k2+1.

    In a trailing segment (u > T) the rule is kept for k2 ≥ k1 (the nominal window) and, for k2 < k1,
    the last k2 steps before T get recurrent gradient (docs/methods.md).
    """
    m = np.zeros((T, T))
    for t in range(1, T + 1):
        u = k1 * -(-t // k1)
        end = u if k2 >= k1 else min(u, T)
        for s in range(1, t + 1):
            m[t - 1, s - 1] = 1.0 if s >= end - k2 + 1 else 0.0
    return m


@pytest.mark.parametrize("T", [1, 5, 8, 13])
@pytest.mark.parametrize("k1,k2", [(1, 1), (2, 2), (3, 5), (4, 2), (5, 1), (3, 20), (20, 3), (7, 7)])
def test_tbptt_mask_matches_definition(T, k1, k2):
    updates = parse_method(f"tbptt:k1={k1},k2={k2}").updates(T)
    np.testing.assert_array_equal(mask_matrix(updates, T), tbptt_definition(T, k1, k2))
    ends = [u.loss_end for u in updates]
    assert ends == sorted(set(list(range(k1, T + 1, k1)) + [T]))  # updates at k1, 2k1, …, and T


@pytest.mark.parametrize("T", [1, 5, 9])
@pytest.mark.parametrize("k", [1, 3, 4, 12])
@pytest.mark.parametrize("k1", [None, 1, 2])
def test_sliding_gives_every_loss_exactly_k_lags(T, k, k1):
    spec = f"sliding:k={k}" + (f",k1={k1}" if k1 else "")
    m = mask_matrix(parse_method(spec).updates(T), T)
    t, s = np.indices((T, T))
    np.testing.assert_array_equal(m, ((s <= t) & (t - s < k)).astype(float))


@pytest.mark.parametrize("T,k", [(9, 4), (8, 4), (3, 5)])
def test_chunked_detaches_at_multiples_of_k(T, k):
    m = mask_matrix(parse_method(f"chunked:k={k}").updates(T), T)
    t, s = np.indices((T, T))
    np.testing.assert_array_equal(m, ((s <= t) & (s // k == t // k)).astype(float))
    np.testing.assert_array_equal(update_owner(parse_method(f"chunked:k={k}").updates(T), T), np.arange(T) // k)


def test_full_is_lower_triangle():
    np.testing.assert_array_equal(mask_matrix(parse_method("full").updates(7), 7), np.tril(np.ones((7, 7))))


# -- the compute proxy: steps forwarded and backpropagated ----------------------------------------


@pytest.mark.parametrize(("spec", "T", "expected"), [
    ("full", 12, lambda: (12, 12)),
    ("chunked:k=5", 12, lambda: (12, 12)),
    # update j covers losses [(j-1)k1, j k1) and reaches back to max(0, j k1 - k2): min(j k1, k2) steps
    ("tbptt:k1=3,k2=7", 12, lambda: (sum(min(3 * j, 7) for j in range(1, 5)),) * 2),
    # k2 < k1: every segment runs all k1 steps forward, the gradient passes through its last k2
    ("tbptt:k1=4,k2=2", 12, lambda: (12, 3 * 2)),
    # sliding(k) with k1 = k: the first update is one window of k; each later loss is its own window
    # of k steps (forward and backward) on top of advancing the state one step
    ("sliding:k=3", 12, lambda: (3 + 9 * 4, 3 + 9 * 3)),
])
def test_step_counts_closed_form(spec, T, expected) -> None:
    assert step_counts(parse_method(spec).updates(T)) == expected()


class _CountingCore(torch.nn.Module):
    """Wraps a model's core and counts the steps it runs, weighted by rows / batch size."""

    def __init__(self, model: torch.nn.Module, batch: int) -> None:
        super().__init__()
        self.inner, self.batch, self.steps = model, batch, 0.0

    def initial_state(self, b):
        return self.inner.initial_state(b)

    def core(self, inputs, state):
        self.steps += inputs.shape[1] * inputs.shape[0] / self.batch
        return self.inner.core(inputs, state)

    def readout(self, f):
        return self.inner.readout(f)

    def forward(self, inputs, state):
        f, s = self.core(inputs, state)
        return self.readout(f), s


@pytest.mark.parametrize("spec", ["full", "chunked:k=4", "tbptt:k1=3,k2=7", "tbptt:k1=5,k2=2", "tbptt:k1=4,k2=4"])
def test_forward_steps_are_what_the_engine_runs_in_training(spec) -> None:
    """In training (θ may change after every update, so nothing is reused) the engine runs exactly
    the forward steps the proxy counts."""
    from test_engine import make_model, token_batch

    from tbptt_bench.core.engine import Engine

    T, B = 13, 3
    model = _CountingCore(make_model("gru"), B)
    batch = token_batch(B=B, T=T)
    updates = parse_method(spec).updates(T)
    Engine(model, "cross_entropy", max_fused_steps=0).run(batch, updates, model.initial_state(B),
                                                         on_update=lambda i, u, loss: None)
    assert model.steps == step_counts(updates)[0]
