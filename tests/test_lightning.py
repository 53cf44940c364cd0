"""TBPTT in a real Lightning 2 Trainer on the CPU: gradients and training equal the engine's (float64)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

lightning = pytest.importorskip("lightning", reason="Lightning 2 is not installed (pip install 'tbptt-bench[lightning]')")

from torch.utils.data import DataLoader  # noqa: E402

from tbptt_bench.core.engine import Engine  # noqa: E402
from tbptt_bench.errors import UsageError  # noqa: E402
from tbptt_bench.lightning import TBPTTMixin  # noqa: E402
from tbptt_bench.loop import as_batch, autocast_supported  # noqa: E402
from tbptt_bench.methods.base import parse_method  # noqa: E402
from tbptt_bench.models.recurrent import RecurrentNet  # noqa: E402
from tbptt_bench.seeding import derive_seed  # noqa: E402


def net(seed: int = 0) -> RecurrentNet:
    torch.manual_seed(seed)
    return RecurrentNet("lstm", "tokens", 5, 5, 4, 1).double()


def stream(n: int = 3, B: int = 2, T: int = 7) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randint(0, 5, (B, T), generator=g), torch.randint(0, 5, (B, T), generator=g)) for _ in range(n)]


class Module(TBPTTMixin, lightning.LightningModule):
    tbptt_method = "tbptt:k1=2,k2=5"
    tbptt_boundary = "cut"  # each batch its own segment, as the engine runs it below

    def __init__(self, step: bool, manual: bool = True) -> None:
        super().__init__()
        self.automatic_optimization = not manual
        self.net = net()
        self.step_optimiser = step
        self.seen: list[torch.dtype] = []

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        for step in self.tbptt_updates(batch, self.net):
            self.seen.append(step.state[0].dtype)
            if self.step_optimiser:
                opt.step()
                opt.zero_grad()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(module: Module, data, precision: str = "64-true") -> None:
    trainer = lightning.Trainer(accelerator="cpu", devices=1, max_epochs=1, precision=precision, logger=False,
                                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DataLoader(data, batch_size=None, shuffle=False))


def engine_run(model, data, on_update=None):
    method, engine = parse_method(Module.tbptt_method), Engine(model, "cross_entropy")
    rng = np.random.default_rng(derive_seed("method", 0))
    state, count = model.initial_state(2), 0
    for x, y in data:
        batch = as_batch((x, y))
        updates = method.updates(batch.length, first_update=count, rng=rng)
        count += len(updates)
        state = engine.run(batch, updates, state, on_update).final_state


def test_accumulated_gradients_over_a_stream_equal_the_engines():
    data = stream()
    module = Module(step=False)
    fit(module, data)
    reference = net()
    engine_run(reference, data)
    for (n, p), q in zip(module.net.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-12, msg=lambda m: f"{n}: {m}")
    assert module.tbptt.updates_done == 12 and module.tbptt.batches_done == 3


def test_training_through_lightnings_optimiser_equals_the_engines_training():
    data = stream()
    module = Module(step=True)
    fit(module, data)
    reference = net()
    opt = torch.optim.SGD(reference.parameters(), lr=0.1)

    def on_update(i, u, loss):
        opt.step()
        opt.zero_grad()

    engine_run(reference, data, on_update)
    for (n, p), q in zip(module.net.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12, msg=lambda m: f"{n}: {m}")


@pytest.mark.skipif(not autocast_supported(torch.bfloat16), reason="this CPU has no bf16 LSTM kernel (oneDNN needs AVX-512)")
def test_bf16_mixed_precision_runs_the_forward_under_autocast():
    data = [(x, y) for x, y in stream(2)]
    module = Module(step=False)
    module.net = module.net.float()
    fit(module, data, precision="bf16-mixed")
    assert set(module.seen) == {torch.bfloat16}
    assert all(torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in module.net.parameters())


def test_automatic_optimisation_is_refused():
    module = Module(step=False, manual=False)
    with pytest.raises(UsageError, match="automatic_optimization"):
        next(module.tbptt_updates(stream(1)[0], module.net))
