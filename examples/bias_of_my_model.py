"""Bias curve of your own model: how far chunked and sliding truncation are from the true gradient.

    python examples/bias_of_my_model.py            # LSTM with layer norm, T = 64, K = 1..32
    python examples/bias_of_my_model.py --small    # seconds (used by the tests)
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import tbptt_bench as tb


class LayerNormLSTM(nn.Module):
    """An LSTM cell with layer norm on the hidden state: the model protocol with a core/readout split."""

    def __init__(self, vocab: int, hidden: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.embed = nn.Embedding(vocab, hidden)
        self.cell = nn.LSTMCell(hidden, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, vocab)

    def initial_state(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.zeros(1, batch_size, self.hidden, dtype=self.head.weight.dtype, device=self.head.weight.device)
        return (z, z.clone())  # [layers, B, H]: the batch in dimension 1

    def core(self, inputs: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]):
        h, c = state[0][0], state[1][0]
        features = []
        for x in self.embed(inputs).unbind(1):
            h, c = self.cell(x, (h, c))
            h = self.norm(h)
            features.append(h)
        return torch.stack(features, 1), (h[None], c[None])

    def readout(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def forward(self, inputs: torch.Tensor, state):
        features, state = self.core(inputs, state)
        return self.readout(features), state


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny sizes (for tests)")
    args = parser.parse_args(argv)
    seq_len, ks, batches = (12, (1, 3, 12), 2) if args.small else (64, (1, 2, 4, 8, 16, 32), 8)
    task = tb.make_task("copy", n_remember=3 if args.small else 10)
    torch.manual_seed(0)
    model = LayerNormLSTM(task.input_size, 8 if args.small else 32).double()
    print(tb.explain_method("chunked:k=3", 6, picture=True))
    methods = [f"{family}:k={k}" for family in ("chunked", "sliding") for k in ks]
    curve = tb.bias_curve(model, task, methods, seq_len=seq_len, batch_size=4, n_batches=batches,
                          n_flips=50 if args.small else 1000, max_lag=0)
    print(curve[["spec", "relative_bias", "cosine_mean"]].to_string(index=False))


if __name__ == "__main__":
    main()
