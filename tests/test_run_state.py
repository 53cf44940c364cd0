"""One run, one state: interleaved runs on one engine, and the README loop for every built-in model."""

from __future__ import annotations

import pytest
import torch

from tbptt_bench.core.build import make_model, make_task
from tbptt_bench.core.engine import Engine
from tbptt_bench.loop import TBPTT
from tbptt_bench.methods.base import parse_method
from tbptt_bench.models import MODELS

from test_loop import batches, grads, model_of


def per_step(steps, model) -> list[tuple[float, dict]]:
    out = []
    for step in steps:
        model.zero_grad(set_to_none=True)
        step.backward()
        out.append((float(step.loss.detach()), grads(model)))
    return out


@pytest.mark.parametrize("spec", ["tbptt:k1=2,k2=5", "sliding:k=3", "tbptt:k1=4,k2=2"])
@pytest.mark.parametrize("fixed", [False, True])
def test_two_interleaved_runs_on_one_engine_equal_the_same_runs_one_after_the_other(spec, fixed):
    """Each run's stored states, kept graphs and links are its own: alternating next() between two
    runs gives, loss by loss and gradient by gradient, what running them in turn gives."""
    model = model_of("lstm")
    first, second = batches(2, T=11)
    updates = parse_method(spec).updates(11)
    engine = Engine(model, "cross_entropy")
    h0 = model.initial_state(3)
    alone = [per_step(engine.steps(b, updates, h0, fixed_params=fixed), model) for b in (first, second)]
    runs = [engine.steps(b, updates, h0, fixed_params=fixed) for b in (first, second)]
    mixed: list[list[tuple[float, dict]]] = [[], []]
    for _ in updates:
        for r, out in zip(runs, mixed):
            out.extend(per_step([next(r)], model))
    for got, want in zip(mixed, alone):
        assert [loss for loss, _ in got] == [loss for loss, _ in want]
        for (_, g), (_, w) in zip(got, want):
            for k in g:
                torch.testing.assert_close(g[k], w[k], rtol=0, atol=0, msg=k)


#: A model made for one task runs on that task at its size (the influence-balancing system); the others on copy.
OWN_TASK = {"influence-linear": ("influence-balancing", {}, 23)}


def task_for(name: str):
    task, params, _ = OWN_TASK.get(name, ("copy", {"n_symbols": 4, "n_remember": 2}, 8))
    return make_task(task, **params)


def built_in(name: str):
    return make_model(name, task_for(name), OWN_TASK.get(name, (None, None, 8))[2], seed=0, dtype="float64")


@pytest.mark.parametrize("name", MODELS.names())
@pytest.mark.parametrize("boundary", ["carry", "cut"])
def test_the_readme_loop_runs_with_a_plain_backward_for_every_built_in_model(name, boundary):
    """The README's loop — plain ``loss.backward()``, clipping, an optimiser step — over three pieces of a
    stream, for every registered model (``sab`` shares graph between updates); the first update's
    gradient is the engine's own for that update."""
    model = built_in(name)
    spec = "tbptt:k1=3,k2=5"
    task = task_for(name)
    runner = TBPTT(model, spec, loss=task.loss_kind, boundary=boundary)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.05)
    data = [task.sample(2, 8, torch.Generator().manual_seed(i), "train").to("cpu", torch.float64) for i in range(3)]
    reference = built_in(name)
    first = parse_method(spec).updates(8)[:1]
    Engine(reference, task.loss_kind).run(data[0], first, reference.initial_state(2))
    n = 0
    for batch in data:
        for step in runner.steps(batch):
            step.loss.backward()
            if n == 0:
                for (k, p), q in zip(model.named_parameters(), reference.parameters()):
                    torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-12, msg=k)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimiser.step()
            optimiser.zero_grad()
            n += 1
    n += sum(1 for step in runner.flush() if step.loss.backward() is None)
    assert n == (8 if boundary == "carry" else 9)
    assert all(torch.isfinite(p).all() for p in model.parameters())
