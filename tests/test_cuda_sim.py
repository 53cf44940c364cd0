"""CUDA paths run on a simulated device (tests/cuda_sim.py): every CI machine exercises them."""

from __future__ import annotations

import torch

from tbptt_bench.perf.config import PerfConfig
from tbptt_bench.perf.harness import measure


def test_try(simulated_cuda):
    row = measure(PerfConfig(method="chunked:k=4", seq_len=24, batch_size=2, hidden_size=8, device="cuda", repeats=1, warmup=1))
    print({k: row[k] for k in ("status", "error", "mem_sequence_bytes", "mem_delta_bytes", "gpu_model", "device")})
    print(simulated_cuda.syncs)
