"""The CUDA paths on a simulated device (tests/cuda_sim.py, fixture ``simulated_cuda``): run on every CI machine.

The simulation keeps torch.cuda's own Python layer (its argument checks included), computes on the CPU
and counts device memory and host syncs; these tests run every CUDA path of the project under it at tiny
sizes and check the numbers against the CPU's or against closed forms of the allocator model.
"""

from __future__ import annotations

import copy
import importlib
import sys
import tomllib
from pathlib import Path

import pytest
import torch

from cuda_sim import SEGMENT, TOTAL_MEMORY
from tbptt_bench.analysis.gradients import flatten, method_gradient, true_gradient
from tbptt_bench.analysis.truegrad import directional_derivatives, probe_compare, probe_directions
from tbptt_bench.core.build import CUDA_SETTINGS, resolve_device
from tbptt_bench.core.forward_mode import CellFunction, RankOne
from tbptt_bench.errors import UsageError
from tbptt_bench.methods.base import METHODS
from tbptt_bench.perf import gpu_check
from tbptt_bench.perf.config import PerfConfig
from tbptt_bench.perf.failures import is_out_of_memory
from tbptt_bench.perf.harness import Workload, measure, time_sequence
from tbptt_bench.perf.memory import MemoryProbe, limit_cuda_memory
from tbptt_bench.provenance import provenance

from test_engine import make_model, token_batch

BENCH_DIR = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH_DIR))
grid = importlib.import_module("asv_bench.grid")
MiB = 2**20
CUDA0 = torch.device("cuda", 0)
TINY = dict(task="copy", seq_len=24, batch_size=2, hidden_size=8, device="cuda", warmup=1, repeats=1, threads=1)


def on_device(sim, shape_bytes: int) -> torch.Tensor:
    return torch.empty(shape_bytes, dtype=torch.uint8, device="cuda:0")


# ---------------------------------------------------------------------------- the simulation itself

def test_simulation_keeps_torch_argument_checks_and_counts_memory_like_the_caching_allocator(simulated_cuda):
    with pytest.raises(ValueError, match="specified index"):
        torch.cuda.set_per_process_memory_fraction(1.0, torch.device("cuda"))
    x = on_device(simulated_cuda, 3 * MiB)
    assert x.device == CUDA0 and x.is_cuda
    assert torch.cuda.memory_allocated(CUDA0) == 3 * MiB and torch.cuda.memory_reserved(CUDA0) == 2 * SEGMENT
    assert (x + 1).device == CUDA0  # a temporary: the free 1 MiB of the cache is too small, a new segment
    assert torch.cuda.memory_allocated(CUDA0) == 3 * MiB and torch.cuda.memory_reserved(CUDA0) == 4 * SEGMENT
    del x
    assert torch.cuda.memory_allocated(CUDA0) == 0 and torch.cuda.memory_reserved(CUDA0) == 4 * SEGMENT
    assert torch.cuda.max_memory_allocated(CUDA0) == 6 * MiB  # x and the temporary
    torch.cuda.empty_cache()
    assert torch.cuda.memory_reserved(CUDA0) == 0 and torch.cuda.max_memory_reserved(CUDA0) == 4 * SEGMENT
    torch.cuda.set_per_process_memory_fraction(SEGMENT / TOTAL_MEMORY, CUDA0)
    with pytest.raises(torch.OutOfMemoryError):
        on_device(simulated_cuda, SEGMENT + 1)


def test_simulation_records_host_syncs(simulated_cuda):
    x = torch.ones(3, device="cuda:0")
    with simulated_cuda.counting() as seen:
        y = (x * 2).sum()
        pinned = torch.ones(3).pin_memory().to("cuda:0", non_blocking=True)
    assert seen == [] and pinned.is_cuda
    host = torch.zeros(3)
    with simulated_cuda.counting() as seen:
        y.item()
        torch.ones(3).to("cuda:0")
        x.cpu()
        host[0] = y
        torch.cuda.synchronize()
    assert seen == ["device-to-host read (item)", "host-to-device copy from pageable memory",
                    "device-to-host read (cpu)", "device-to-host read (__setitem__ into a host tensor)",
                    "torch.cuda.synchronize"]
    assert not host.is_cuda and host[0] == 6 and x.to(host).device.type == "cpu" and host.to(x).is_cuda


# ---------------------------------------------------------------------------- devices and settings

def test_cuda_resolves_to_an_indexed_device_with_the_settings_applied(simulated_cuda, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    assert resolve_device("cuda") == CUDA0 == resolve_device("auto") == resolve_device(torch.device("cuda"))
    assert resolve_device("cuda:0") == CUDA0
    with pytest.raises(UsageError, match="CUDA devices 0..0"):
        resolve_device("cuda:3")
    assert torch.backends.cudnn.benchmark is CUDA_SETTINGS["cudnn_benchmark"]
    assert torch.backends.cuda.matmul.allow_tf32 is CUDA_SETTINGS["tf32"] is torch.backends.cudnn.allow_tf32
    settings = provenance(CUDA0)["gpu_settings"]
    assert settings == ("tf32_matmul=0 tf32_cudnn=0 cudnn_benchmark=0 cudnn_deterministic=0")
    assert provenance("cpu")["gpu_settings"] == ""


# ---------------------------------------------------------------------------- the harness and its memory

def test_perf_measurement_on_cuda_is_a_row_and_resets_the_indexed_fraction(simulated_cuda):
    full = measure(PerfConfig(method="full", **TINY))
    chunked = measure(PerfConfig(method="chunked:k=4", **TINY))
    for row in (full, chunked):
        assert row["status"] == "ok", row["error"]
        assert row["mem_source"] == "cuda_allocator" and row["gpu_model"] == "Simulated CUDA device"
        assert row["mem_reserved_peak_bytes"] >= row["mem_peak_bytes"] >= row["mem_baseline_bytes"]
        assert row["gpu_settings"] and row["cuda_version"] == "simulated"
    assert simulated_cuda.fractions[-1] == (1.0, 0)
    features = 2 * 24 * 8 * 4  # [B, T, H] float32, kept for the read-out's backward by full BPTT
    assert full["mem_sequence_bytes"] >= features


def test_run_peak_covers_warm_up_and_the_memory_sequence_on_cuda(simulated_cuda):
    probe = MemoryProbe(CUDA0)
    kept = on_device(simulated_cuda, MiB)
    probe.start()
    warm = on_device(simulated_cuda, 8 * MiB)  # a warm-up that peaks higher than the memory sequence
    del warm
    assert probe.sequence_peak(lambda: on_device(simulated_cuda, 2 * MiB)) == 2 * MiB
    row = probe.run_peak()
    assert row["mem_baseline_bytes"] == MiB and row["mem_peak_bytes"] == 9 * MiB and row["mem_delta_bytes"] == 8 * MiB
    assert row["mem_reserved_peak_bytes"] == 5 * SEGMENT  # 1 MiB and 8 MiB in their own segments
    del kept


def test_run_peak_covers_warm_up_and_the_memory_sequence_on_cpu():
    probe = MemoryProbe(torch.device("cpu"))
    probe.start()
    if probe.source != "rss_hwm_reset":
        pytest.skip("needs a resettable resident-set high-water mark (Linux)")
    warm = torch.ones(64 * MiB, dtype=torch.uint8)
    del warm
    assert probe.sequence_peak(lambda: torch.ones(MiB, dtype=torch.uint8)) < 32 * MiB
    assert probe.run_peak()["mem_delta_bytes"] >= 60 * MiB


def test_cuda_memory_limit_counts_from_reserved_memory(simulated_cuda):
    """The fraction bounds reserved memory: blocks cached before the limit must not eat into it."""
    kept = on_device(simulated_cuda, MiB)
    cached = on_device(simulated_cuda, 10 * MiB)
    del cached
    assert torch.cuda.memory_reserved(CUDA0) == 6 * SEGMENT
    limit_cuda_memory(CUDA0, 16 * MiB)
    assert simulated_cuda.fractions[-1] == ((SEGMENT + 16 * MiB) / TOTAL_MEMORY, 0)
    within = on_device(simulated_cuda, 15 * MiB)  # the run adds 16 MiB of reserved memory: at the limit
    with pytest.raises(torch.OutOfMemoryError):
        on_device(simulated_cuda, 4 * MiB)
    del within, kept


def test_memory_limited_cuda_run_is_oom_not_failed(simulated_cuda):
    cfg = PerfConfig(method="full", task="copy", seq_len=512, batch_size=32, hidden_size=256, device="cuda",
                     warmup=0, repeats=1, threads=1, memory_limit=4 * MiB)  # full keeps 16 MiB of features alone
    row = measure(cfg)
    assert row["status"] == "oom" and "out of memory" in row["error"]
    assert simulated_cuda.fractions[-1] == (1.0, 0)
    assert measure(PerfConfig(method="chunked:k=4", **TINY))["status"] == "ok"


@pytest.mark.parametrize("message", [
    "cuDNN error: CUDNN_STATUS_ALLOC_FAILED",
    "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
    "CUDA error: out of memory",
    "cudaErrorMemoryAllocation: out of memory",
])
def test_cuda_library_allocation_failures_are_out_of_memory(message):
    assert is_out_of_memory(RuntimeError(message))
    assert is_out_of_memory(torch.AcceleratorError(message)) if hasattr(torch, "AcceleratorError") else True


@pytest.mark.parametrize("message", ["cuDNN error: CUDNN_STATUS_NOT_SUPPORTED", "CUBLAS_STATUS_EXECUTION_FAILED"])
def test_other_cuda_library_errors_are_failures(message):
    assert not is_out_of_memory(RuntimeError(message))


# ---------------------------------------------------------------------------- every family's update, no sync inside

def family_config(family: str) -> PerfConfig:
    model = "lstm" if "lstm" in (getattr(METHODS.get(family), "cells", None) or ["lstm"]) else "rnn"
    return PerfConfig(method=grid.representative_spec(family, TINY["seq_len"]), model=model, **TINY)


@pytest.mark.parametrize("family", METHODS.names())
def test_every_family_trains_on_cuda_without_a_sync_inside_the_timed_region(simulated_cuda, family):
    cfg = family_config(family)
    work = Workload(cfg, resolve_device(cfg.device), torch.float32)
    work.sequence(work.prepare())  # warm-up, as the harness does
    updates = work.prepare()
    with simulated_cuda.counting() as seen:
        work.sequence(updates)
    assert seen == [], f"{cfg.method}: the host waits for the device inside a sequence"
    with simulated_cuda.counting() as seen:
        time_sequence(work, work.device)  # prepare (the method's estimates between sequences) may sync
    assert seen[-2:] == ["torch.cuda.synchronize"] * 2  # before and after the sequence, nothing between
    assert all(p.device == CUDA0 and torch.isfinite(p).all() for p in work.model.parameters())


def is_online(family: str) -> bool:
    return METHODS.get(family).__module__ == "tbptt_bench.methods.online"


@pytest.mark.parametrize("family", [f if not is_online(f) else pytest.param(f, marks=pytest.mark.slow)
                                    for f in METHODS.names() if f != "uoro"])
def test_every_family_updates_on_cuda_as_on_the_cpu(simulated_cuda, family):
    """Same parameters (float64) after a sequence of updates; UORO draws its signs on the device: not equal."""
    import dataclasses

    cfg = dataclasses.replace(family_config(family), dtype="float64")
    runs = {}
    for device in ("cpu", "cuda"):
        work = Workload(dataclasses.replace(cfg, device=device), resolve_device(device), torch.float64)
        work.sequence(work.prepare())
        runs[device] = {n: p.detach().cpu() for n, p in work.model.named_parameters()}
    for name, p in runs["cpu"].items():
        torch.testing.assert_close(runs["cuda"][name], p, rtol=1e-12, atol=1e-14)


def test_uoro_draws_its_signs_on_the_device_from_a_seeded_device_generator(simulated_cuda):
    model = make_model("gru").float().cuda()
    cell = CellFunction(model)
    source = torch.Generator().manual_seed(7)
    seed = int(torch.randint(0, 2**62, (), generator=torch.Generator().manual_seed(7)))
    est = RankOne(cell, 3, source)
    x = torch.randint(0, 5, (3,), device="cuda:0")
    s = torch.randn(3, cell.S, device="cuda:0")
    with simulated_cuda.counting() as seen:
        est.advance(x, s)
    assert seen == [] and est.h.device == CUDA0
    nu = 2 * torch.randint(0, 2, s.shape, generator=torch.Generator().manual_seed(seed)) - 1
    # h̃ starts at 0, so after one step h̃ = ρ₁ ν with ρ₁ > 0: its signs are the draw
    assert torch.equal(torch.sign(est.h).cpu().long(), nu)


def test_sliding_windows_move_each_block_to_the_device_once(simulated_cuda, monkeypatch):
    from tbptt_bench.core.engine import Engine

    cpu = make_model("lstm")
    gpu = copy.deepcopy(cpu).cuda()
    batch = token_batch(B=2, T=30)
    k = 6
    fetched: list[int] = []
    original = Engine.fetch
    monkeypatch.setattr(Engine, "fetch", lambda self, source, a, b: fetched.append(b - a) or original(self, source, a, b))
    with simulated_cuda.counting() as seen:
        got = method_gradient(gpu, batch, f"sliding:k={k}", "cross_entropy")
    assert seen == []
    # Per update (every k steps): a few contiguous spans (the window's start state, the dense states, the
    # windows' steps once). Fetching the dense states step by step took ≥ T − k calls, and gathering the
    # windows on the host moved k steps per loss, ≥ k (T − k + 1) steps in all.
    assert len(fetched) <= 4 * (30 // k) < 30 - k, fetched
    assert sum(fetched) <= 4 * 30 < k * (30 - k + 1), fetched
    monkeypatch.setattr(Engine, "fetch", original)
    want = method_gradient(cpu, batch, f"sliding:k={k}", "cross_entropy")
    for name, g in want.items():
        torch.testing.assert_close(got[name].cpu(), g, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------- bias analysis in forward mode

@pytest.mark.parametrize("native_forward_ad, route", [(True, "jvp"), (False, "reverse")])
def test_probes_on_cuda_avoid_cudnn_and_say_which_route_ran(simulated_cuda, native_forward_ad, route):
    simulated_cuda.native_rnn_forward_ad = native_forward_ad
    cpu = make_model("lstm")
    gpu = copy.deepcopy(cpu).cuda()
    batch = token_batch(T=9)
    dirs = probe_directions(gpu, 3, seed=2)
    got, ran = directional_derivatives(gpu, batch, "cross_entropy", dirs, chunk=4, return_route=True)
    assert ran == route and got.device.type == "cpu"
    truth = true_gradient(cpu, batch, "cross_entropy")
    want = torch.stack([torch.dot(flatten({n: v.cpu() for n, v in d.items()}, list(truth)), flatten(truth))
                        for d in dirs])
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    est = method_gradient(gpu, batch, "chunked:k=3", "cross_entropy")
    assert probe_compare(gpu, batch, "cross_entropy", est, n_probes=4, chunk=4).route == route


def test_probes_with_cudnn_enabled_would_fail_as_on_a_gpu(simulated_cuda):
    """The simulation's cuDNN has no forward-mode derivative, so the route above is what makes probes work."""
    from torch.func import functional_call, jvp

    gpu = make_model("lstm").cuda()
    params = {n: p.detach() for n, p in gpu.named_parameters()}
    batch = token_batch(T=3).to(CUDA0, torch.float64)
    with pytest.raises(NotImplementedError, match="_cudnn_rnn"), torch.no_grad():
        jvp(lambda p: functional_call(gpu, p, (batch.inputs, gpu.initial_state(3)))[0].sum(), (params,),
            ({n: torch.ones_like(p) for n, p in params.items()},))


# ---------------------------------------------------------------------------- suites, asv, the GPU check

SUITE = """
[suite]
name = "simcuda"

[defaults]
device = "cuda"
hidden_size = 4
batch_size = 2
seq_len = 24
dtype = "float64"

[[train]]
task = "copy"
model = "lstm"
method = "chunked:k=4"
steps = 2
eval_every = 2
eval_batches = 1

[[bias]]
task = "copy"
model = "gru"
methods = ["chunked:k=4", "sliding:k=4"]
n_batches = 2
probes = 4
"""


def test_cuda_suite_cells_run_and_record_the_device(simulated_cuda):
    from tbptt_bench.suites.jobs import run_cell
    from tbptt_bench.suites.suite import parse_suite

    suite = parse_suite(tomllib.loads(SUITE), source="simcuda.toml")
    for cell in suite.cells:
        result = run_cell(cell)
        assert result.status == "ok", (cell.measure, result.error)
        rows = result.tables[cell.measure]
        assert rows and all(r["device"] == "cuda" and r["gpu_model"] == "Simulated CUDA device" for r in rows)
        assert all(r["gpu_settings"] for r in rows)


def test_asv_gpu_benchmarks_run_on_the_simulated_device(simulated_cuda, monkeypatch):
    gpu = importlib.import_module("asv_bench.gpu")
    monkeypatch.setattr(gpu, "SIZES", {"seq_len": 24, "batch_size": 2, "hidden_size": 8})
    bench = gpu.GPUUpdate()
    for method in ("full", "chunked"):  # no estimates between sequences (those may sync, before the clock)
        bench.setup("copy", method)
        assert bench.work.cfg.hidden_size == 8 and bench.work.device == CUDA0
        with simulated_cuda.counting() as seen:
            seconds = bench.track_gpu_time_per_update("copy", method)
        assert seconds > 0 and seen == ["torch.cuda.synchronize"] * (2 * gpu.REPEATS)
        assert bench.track_gpu_peakmem("copy", method) > 0


def test_gpu_check_runs_on_the_simulated_device(simulated_cuda, tmp_path):
    summary = gpu_check.run_check(tmp_path, "cuda", tiny=True, fresh=False, run_tests=False)
    assert summary["ok"], summary["unexpected"]
    assert summary["device"] == "cuda:0" and summary["statuses"].get("oom") == 1
    assert (tmp_path / "summary.md").read_text().startswith("# GPU check")


def test_gpu_check_fails_when_pytest_collects_no_tests(tmp_path):
    empty = tmp_path / "no_tests"
    empty.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    result = gpu_check.run_pytest(out, empty, timeout=120)
    assert result["pytest_rc"] == 5
    assert not gpu_check.tests_passed(result["pytest_rc"]) and gpu_check.tests_passed(0)
