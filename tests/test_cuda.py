"""CUDA paths: same numbers as the CPU, no host-device sync in the update loop, memory and OOM rows.

Marked ``cuda`` (deselected by default; run with ``pytest -m cuda`` or ``python -m tbptt_bench.perf.gpu_check``)
and skipped without a GPU.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

from tbptt_bench.core.engine import Engine, _pinned
from tbptt_bench.analysis.gradients import flatten, method_gradient, true_gradient
from tbptt_bench.analysis.truegrad import PROBE_ROUTES, directional_derivatives, probe_directions
from tbptt_bench.core.build import resolve_device
from tbptt_bench.models.recurrent import RecurrentNet
from tbptt_bench.perf.child import measure_in_fresh_process
from tbptt_bench.perf.config import PerfConfig
from tbptt_bench.perf.harness import measure, Workload
from tbptt_bench.tasks.base import Batch

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

V = 5
SPECS = ["full", "full:checkpoint=3", "chunked:k=4", "tbptt:k1=2,k2=6", "tbptt:k1=4,k2=2", "sliding:k=3"]


def token_batch(B=3, T=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g),
                 torch.ones(B, T, dtype=torch.float64))


def make_model(cell, path="fused"):
    torch.manual_seed(0)
    return RecurrentNet(cell, "tokens", V, V, 4, 2, path).double()


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("spec", SPECS)
def test_cuda_gradient_equals_cpu(cell, spec):
    """The batch stays on the CPU; the engine streams chunks to the GPU (pinned, non-blocking)."""
    cpu = make_model(cell)
    gpu = copy.deepcopy(cpu).cuda()
    batch = token_batch()
    a = method_gradient(cpu, batch, spec, "cross_entropy")
    b = method_gradient(gpu, batch, spec, "cross_entropy")
    for k in a:
        torch.testing.assert_close(b[k].cpu(), a[k], rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_cuda_k_curve_and_long_lag_profile_equal_cpu(cell):
    """The K-curve ladder (with the input fold) and the sampled lag profile give the CPU's numbers."""
    from tbptt_bench.analysis.kcurve import kcurve_gradients
    from tbptt_bench.analysis.long_lags import long_lag_profile

    cpu = make_model(cell)
    gpu = copy.deepcopy(cpu).cuda()
    batch = token_batch(T=40)
    specs = ["chunked:k=1", "chunked:k=2", "chunked:k=4", "tbptt:k1=2,k2=3", "tbptt:k1=4,k2=7"]
    a = {m.spec: g for m, g in kcurve_gradients(cpu, batch, "cross_entropy", specs).items()}
    b = {m.spec: g for m, g in kcurve_gradients(gpu, batch, "cross_entropy", specs).items()}
    assert sorted(a) == sorted(b) == sorted(specs)
    for spec in specs:
        for k in a[spec]:
            torch.testing.assert_close(b[spec][k].cpu(), a[spec][k], rtol=1e-9, atol=1e-11)
    pa = long_lag_profile(cpu, batch, "cross_entropy", 12, n_positions=5)
    pb = long_lag_profile(gpu, batch, "cross_entropy", 12, n_positions=5)
    assert (pa.positions == pb.positions).all()
    torch.testing.assert_close(torch.from_numpy(pb.phi), torch.from_numpy(pa.phi), rtol=1e-9, atol=1e-14)


def test_cuda_fused_equals_cell():
    fused = make_model("lstm").cuda()
    cell = make_model("lstm", path="cell").cuda()
    batch = token_batch()
    a = method_gradient(fused, batch, "tbptt:k1=2,k2=6", "cross_entropy")
    b = method_gradient(cell, batch, "tbptt:k1=2,k2=6", "cross_entropy")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-9, atol=1e-11)


def test_chunks_go_through_pinned_memory():
    assert _pinned(torch.ones(2, 3), torch.float32).is_pinned()
    engine = Engine(make_model("gru").cuda(), "cross_entropy")
    assert engine.pin_memory
    data = engine.fetch(token_batch(), 2, 5)
    assert data.inputs.is_cuda and data.weights.dtype == torch.float64 and data.inputs.shape == (3, 3)


@pytest.mark.parametrize("spec", ["chunked:k=64", "full", "tbptt:k1=16,k2=64", "full:checkpoint=64", "sliding:k=32",
                                  "uoro", "snap:n=1"])
def test_no_host_device_sync_inside_a_sequence(spec):
    cfg = PerfConfig(method=spec, seq_len=256, batch_size=8, hidden_size=32, device="cuda")
    work = Workload(cfg, resolve_device("cuda"), torch.float32)
    work.sequence(work.prepare())  # warm-up: allocator, cuDNN plans, optimiser state
    torch.cuda.synchronize()
    updates = work.prepare()
    torch.cuda.set_sync_debug_mode("error")
    try:
        work.sequence(updates)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_cuda_memory_columns():
    base = dict(seq_len=512, batch_size=8, hidden_size=32, device="cuda", repeats=2)
    full = measure(PerfConfig(method="full", **base))
    chunked = measure(PerfConfig(method="chunked:k=32", **base))
    for row in (full, chunked):
        assert row["status"] == "ok" and row["mem_source"] == "cuda_allocator" and row["gpu_model"]
        assert row["mem_reserved_peak_bytes"] >= row["mem_peak_bytes"] >= row["mem_baseline_bytes"]
    features = 8 * 512 * 32 * 4  # [B, T, H] float32 kept for the read-out's backward
    assert full["mem_sequence_bytes"] >= features > chunked["mem_sequence_bytes"]


def test_cuda_out_of_memory_is_a_row_and_the_next_run_works():
    base = dict(method="full", seq_len=2048, batch_size=32, hidden_size=128, device="cuda", repeats=1, warmup=0)
    oom = measure(PerfConfig(memory_limit=2**20, **base))
    assert oom["status"] == "oom" and "memory" in oom["error"].lower()
    assert measure(PerfConfig(**base))["status"] == "ok"


def test_cuda_fresh_process():
    row = measure_in_fresh_process(PerfConfig(method="chunked:k=32", seq_len=128, batch_size=4, hidden_size=16,
                                              device="cuda", repeats=1), timeout=300)
    assert row["status"] == "ok" and row["pid"] != os.getpid() and row["cuda_version"]


def test_cuda_probes_equal_v_dot_g_and_say_which_route_ran():
    """cuDNN's RNN has no forward-mode derivative: the probes run without it, or in reverse mode."""
    cpu = make_model("lstm")
    gpu = copy.deepcopy(cpu).cuda()
    batch = token_batch(T=9)
    dirs = probe_directions(gpu, 3, seed=2)
    got, route = directional_derivatives(gpu, batch, "cross_entropy", dirs, chunk=4, return_route=True)
    assert route in PROBE_ROUTES
    truth = true_gradient(cpu, batch, "cross_entropy")
    want = torch.stack([torch.dot(flatten({n: v.cpu() for n, v in d.items()}, list(truth)), flatten(truth))
                        for d in dirs])
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


def test_cuda_rows_record_the_kernel_settings():
    row = measure(PerfConfig(method="chunked:k=32", seq_len=128, batch_size=4, hidden_size=16, device="cuda", repeats=1))
    assert row["status"] == "ok" and row["gpu_settings"] == (
        "tf32_matmul=0 tf32_cudnn=0 cudnn_benchmark=0 cudnn_deterministic=0")
