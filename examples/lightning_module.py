"""TBPTT(k1, k2) in Lightning 2: manual optimisation, every update through ``self.manual_backward``.

The state is carried across the batches of a stream (reset at each epoch), the loss of every update
is logged, and Lightning's precision plugin (here bf16-mixed) and strategy apply to every update.

    python examples/lightning_module.py            # one epoch over Tiny Shakespeare
    python examples/lightning_module.py --small    # seconds (used by the tests)
"""

from __future__ import annotations

import argparse

import lightning
import torch
from torch import nn
from torch.utils.data import DataLoader

import tbptt_bench as tb
from tbptt_bench.lightning import TBPTTMixin


class CharModel(TBPTTMixin, lightning.LightningModule):
    tbptt_method = "tbptt:k1=16,k2=32"

    def __init__(self, vocab: int, hidden: int) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.net = tb.wrap_rnn(nn.LSTM(32, hidden, batch_first=True), nn.Linear(hidden, vocab), nn.Embedding(vocab, 32))

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        for _ in self.tbptt_updates(batch, self.net):
            self.clip_gradients(opt, gradient_clip_val=1.0, gradient_clip_algorithm="norm")
            opt.step()
            opt.zero_grad()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny sizes (for tests)")
    args = parser.parse_args(argv)
    pieces, seq_len, hidden = (2, 40, 16) if args.small else (100, 128, 128)
    task = tb.make_task("char-lm")
    stream = task.stream(8, "train")
    data = [(p.inputs, p.targets) for p in (stream.slice(i * seq_len, (i + 1) * seq_len) for i in range(pieces))]
    model = CharModel(task.input_size, hidden)
    precision = "bf16-mixed" if tb.autocast_supported(torch.bfloat16) else "32-true"  # bf16 LSTM needs AVX-512
    trainer = lightning.Trainer(accelerator="cpu", max_epochs=1, precision=precision, logger=False,
                                enable_checkpointing=False, enable_progress_bar=not args.small,
                                enable_model_summary=False)
    trainer.fit(model, DataLoader(data, batch_size=None, shuffle=False))
    loss = float(trainer.callback_metrics["tbptt_loss_epoch"])
    print(f"{model.tbptt.updates_done} updates; epoch mean loss per step {loss:.3f} nats")
    return loss


if __name__ == "__main__":
    main()
