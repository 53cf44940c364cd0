"""Hand-written comparison baselines — NOT the project's engine.

Minimal PyTorch loops that a careful engineer would write by hand for each method, used by the
benchmark scripts as the yardstick for the engine (tbptt_bench/engine.py) and by tests to show that
they compute the same gradients. They work on the built-in ``RecurrentNet`` (encoder → fused
``nn.LSTM``/``GRU``/``RNN`` → read-out) of one layer, with the project's loss convention
``L = Σ_t (1/B) Σ_b w[b,t] · loss(b,t)`` written out here again, independently of the engine.

Each function runs one sequence (one batch of ``T`` steps) and calls ``step()`` after every update's
backward pass (an optimiser step, or a recorder in tests). tbptt(k1, k2) variants:

* ``tbptt_recompute``  — recompute each window from the stored state at ``u - k2`` with ``k2/k1``
  fused calls, storing (overwriting) every boundary state: the same math as the engine, in training too;
* ``tbptt_one_call``   — recompute each window in one fused call from the state stored at ``u - k2``,
  storing only the state at ``u`` (states of a window's interior are those of earlier updates);
* ``tbptt_keep_graphs`` — forward each k1-segment once and keep the graphs of the last ``k2/k1``
  segments, carrying state gradients back by hand (backward through stored history); parameters are
  snapshotted per segment so that optimiser steps do not invalidate kept graphs;
* ``tbptt_per_step``   — the widely copied per-step version: a list of per-step states, each step's
  input a leaf, and ``k2`` chained ``backward`` calls per update with ``retain_graph``.

At a fixed θ all four give the same gradient as the engine; once θ moves between updates only
``tbptt_recompute`` still does (the others use states or Jacobians from older θ).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from tbptt_bench.models.recurrent import lstm_step
from tbptt_bench.tasks.base import Batch

Step = Callable[[], None]


def loss_sum(model: nn.Module, features: torch.Tensor, batch: Batch, a: int, b: int) -> torch.Tensor:
    """``Σ_{t in [a, b)} ℓ_t`` from top-layer features of those steps (cross-entropy or squared error)."""
    logits = model.readout(features)
    w = batch.weights[:, a:b].to(logits.dtype)
    if batch.targets.dtype == torch.int64:
        per = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.targets[:, a:b].reshape(-1), reduction="none")
        per = per.view(w.shape)
    else:
        per = ((logits - batch.targets[:, a:b].to(logits.dtype)) ** 2).sum(-1)
    return (per * w).sum() / batch.batch_size


def _detach(state):  # type: ignore[no-untyped-def]
    return tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()


def chunked(model: nn.Module, batch: Batch, k: int, step: Step) -> None:
    """Detach every k steps: one fused call per chunk, an update after each chunk."""
    state = model.initial_state(batch.batch_size)
    for a in range(0, batch.length, k):
        b = min(a + k, batch.length)
        features, state = model.rnn(model.encoder(batch.inputs[:, a:b]), _detach(state))
        loss_sum(model, features, batch, a, b).backward()
        step()


def full(model: nn.Module, batch: Batch, step: Step) -> None:
    """Full BPTT: one fused call over the sequence, one update."""
    chunked(model, batch, batch.length, step)


def full_split(model: nn.Module, batch: Batch, k: int, step: Step) -> None:
    """Full BPTT as a chain of k-step fused calls (state not detached between them), one update."""
    state = model.initial_state(batch.batch_size)
    total = None
    for a in range(0, batch.length, k):
        b = min(a + k, batch.length)
        features, state = model.rnn(model.encoder(batch.inputs[:, a:b]), state)
        loss = loss_sum(model, features, batch, a, b)
        total = loss if total is None else total + loss
    assert total is not None
    total.backward()
    step()


def _check(batch: Batch, k1: int, k2: int) -> None:
    if batch.length % k1 or k2 % k1 or k2 < k1:
        raise ValueError("these baselines take T and k2 multiples of k1, k2 ≥ k1")


def tbptt_recompute(model: nn.Module, batch: Batch, k1: int, k2: int, step: Step) -> None:
    """Window ``[u-k2, u)`` recomputed from the stored state at ``u-k2``; every boundary state re-stored."""
    _check(batch, k1, k2)
    states = {0: model.initial_state(batch.batch_size)}
    for u in range(k1, batch.length + 1, k1):
        s = max(0, u - k2)
        state = states[s]
        for a in range(s, u, k1):
            features, state = model.rnn(model.encoder(batch.inputs[:, a : a + k1]), state)
            states[a + k1] = _detach(state)
        loss_sum(model, features, batch, u - k1, u).backward()
        step()
        states.pop(u - k2, None)


def tbptt_one_call(model: nn.Module, batch: Batch, k1: int, k2: int, step: Step) -> None:
    """Window ``[u-k2, u)`` in one fused call from the state stored at ``u-k2``; only ``u``'s state stored."""
    _check(batch, k1, k2)
    states = {0: model.initial_state(batch.batch_size)}
    for u in range(k1, batch.length + 1, k1):
        s = max(0, u - k2)
        features, state = model.rnn(model.encoder(batch.inputs[:, s:u]), states[s])
        states[u] = _detach(state)
        loss_sum(model, features[:, -k1:], batch, u - k1, u).backward()
        step()
        states.pop(u - k2, None)


def _leaf(state):  # type: ignore[no-untyped-def]
    if isinstance(state, tuple):
        return tuple(s.detach().requires_grad_(True) for s in state)
    return state.detach().requires_grad_(True)


def _parts(state):  # type: ignore[no-untyped-def]
    return state if isinstance(state, tuple) else (state,)


def _carry_back(history: list) -> None:  # type: ignore[type-arg]
    """Given (leaf input, output) per segment, oldest first, push input gradients into earlier segments."""
    for j in range(len(history) - 1, 0, -1):
        grads = [g.grad for g in _parts(history[j][0])]
        if any(g is None for g in grads):
            break
        torch.autograd.backward(list(_parts(history[j - 1][1])), grads, retain_graph=True)
    for leaf, _ in history:
        for g in _parts(leaf):
            g.grad = None


def tbptt_keep_graphs(model: nn.Module, batch: Batch, k1: int, k2: int, step: Step) -> None:
    """Each k1-segment forwarded once; graphs of the last k2/k1 segments kept and chained by hand."""
    _check(batch, k1, k2)
    n = k2 // k1
    history: list = []  # type: ignore[type-arg]
    state = model.initial_state(batch.batch_size)
    for u in range(k1, batch.length + 1, k1):
        theta = {name: p.clone() for name, p in model.named_parameters()}  # survives in-place optimiser steps
        leaf = _leaf(state)
        x = functional_call(model.encoder, {k[8:]: v for k, v in theta.items() if k.startswith("encoder.")},
                            (batch.inputs[:, u - k1 : u],))
        features, out = functional_call(model.rnn, {k[4:]: v for k, v in theta.items() if k.startswith("rnn.")},
                                        (x, leaf))
        history = (history + [(leaf, out)])[-n:]
        loss_sum(model, features, batch, u - k1, u).backward(retain_graph=True)
        _carry_back(history)
        step()
        state = out


def tbptt_per_step(model: nn.Module, batch: Batch, k1: int, k2: int, step: Step) -> None:
    """The common per-step recipe (LSTM, token inputs): per-step leaf states, k2 chained backward calls."""
    _check(batch, k1, k2)
    h, c = (s[0] for s in model.initial_state(batch.batch_size))
    rnn = model.rnn
    history: list = []  # type: ignore[type-arg]
    outputs: list[torch.Tensor] = []
    theta: list[torch.Tensor] = []
    for t in range(batch.length):
        if t % k1 == 0:  # a snapshot per update, so that optimiser steps do not invalidate kept graphs
            theta = [p.clone() for p in (rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0)]
        leaf = _leaf((h, c))
        h, c = lstm_step(model.encoder(batch.inputs[:, t]), leaf[0], leaf[1], *theta)
        history = (history + [(leaf, (h, c))])[-k2:]
        outputs.append(h)
        if (t + 1) % k1 == 0:
            features = torch.stack(outputs, dim=1)
            loss_sum(model, features, batch, t + 1 - k1, t + 1).backward(retain_graph=True)
            _carry_back(history)
            step()
            outputs = []
