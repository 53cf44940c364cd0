"""TBPTT(k1, k2) in your own training loop: AdamW, a cosine schedule, gradient clipping, bfloat16 autocast.

A character language model on the bundled Tiny Shakespeare, B parallel streams read in consecutive
pieces: the recurrent state is carried from one piece to the next, and every update of
tbptt(k1=16, k2=32) backpropagates 32 steps from its end (windows recomputed from stored states).

    python examples/own_training_loop.py            # a few hundred updates
    python examples/own_training_loop.py --small    # seconds (used by the tests)
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import nn

import tbptt_bench as tb


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny sizes (for tests)")
    args = parser.parse_args(argv)
    pieces, seq_len, hidden = (3, 40, 16) if args.small else (200, 128, 128)
    task = tb.make_task("char-lm")
    stream = task.stream(8, "train")  # [B, N] tokens; consecutive pieces of seq_len steps
    torch.manual_seed(0)
    model = tb.wrap_rnn(nn.LSTM(32, hidden, batch_first=True), nn.Linear(hidden, task.output_size),
                        nn.Embedding(task.input_size, 32))
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    # bfloat16 where this CPU has a bf16 LSTM kernel (oneDNN needs AVX-512), float32 elsewhere
    autocast = torch.bfloat16 if tb.autocast_supported(torch.bfloat16) else None
    runner = tb.TBPTT(model, "tbptt:k1=16,k2=32", loss="cross_entropy", autocast=autocast)
    total_updates = pieces * math.ceil(seq_len / 16)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=total_updates)
    batches = (stream.slice(i * seq_len, (i + 1) * seq_len) for i in range(pieces))
    last = math.nan
    for step in runner.stream(batches):
        step.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        optimiser.zero_grad(set_to_none=True)
        schedule.step()
        last = step.loss_per_step()
        if step.index % 25 == 0:
            print(f"update {step.index:4d}  batch {step.batch_index:3d}  loss/step {last:.3f} nats  "
                  f"lr {schedule.get_last_lr()[0]:.2e}")
    print(f"{runner.updates_done} updates over {runner.batches_done} pieces; last loss/step {last:.3f} nats")
    return last


if __name__ == "__main__":
    main()
