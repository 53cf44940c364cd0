"""The measurement harness: throughput, time per update and peak memory of a method's training updates.

A **timed update** is one optimiser update of a method in steady state, taken as the engine runs it:
forward, backward, optimiser step. Times are taken over **whole sequences** (every update of the method
over one batch of ``B`` sequences of ``T`` steps), after ``warmup`` untimed sequences, ``repeats``
times; a row reports the median and the 10th/90th percentiles over the repeats of

* ``tokens_per_s``  = ``B·T / (seconds for the sequence)``;
* ``ms_per_update`` = ``1000 · (seconds for the sequence) / (updates in it)``.

The timed region holds nothing but the sequence: the batch is drawn before it (and stays on the CPU;
the engine streams it to the device chunk by chunk), methods that estimate something between sequences
(``observe``) do it before the region, and evaluation and bias analysis never run here. On CUDA the
region is bracketed by ``torch.cuda.synchronize`` before and after, and nothing inside it waits on the
device. The thread count is set with ``torch.set_num_threads`` and recorded.

**Peak memory** (``mem_*`` columns, bytes). ``mem_delta_bytes`` is the peak over the whole run
(warm-up and timed sequences) above a baseline taken after the model, the optimiser and the batch
exist: what training adds, optimiser state included. ``mem_sequence_bytes`` is the peak of one more
sequence above the memory in use just before it: what one sequence of updates needs (activations,
gradients, workspaces), the number that scales with the method. On CPU both are resident-set
high-water marks (Linux ``VmHWM``, reset with ``/proc/self/clear_refs``; elsewhere ``ru_maxrss``: KiB
on Linux, bytes on macOS) minus the resident set at the baseline, less the growth of file-backed pages
(library code paged in when a kernel first runs is not memory the run allocates). In a fresh process
(:func:`measure_in_fresh_process`) the sequence pass first makes glibc serve large allocations by
``mmap``, so freed tensors leave the resident set and the high-water mark follows live memory rather
than the heap's history; only a fresh process per configuration makes the CPU numbers independent of
what ran before. On CUDA the numbers come from the caching allocator: ``max_memory_allocated`` after
``reset_peak_memory_stats`` minus the allocation at the baseline, with ``max_memory_reserved`` beside.

Column names are listed in docs/perf.md; :data:`COLUMNS` is the same list.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import functools
import gc
import json
import logging
import os
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import torch

from tbptt_bench.atomic import atomic_path, write_text
from tbptt_bench.core.engine import Engine
from tbptt_bench.errors import UsageError
from tbptt_bench.core.mask import Update
from tbptt_bench.methods.base import parse_method
from tbptt_bench.provenance import provenance
from tbptt_bench.models import MODELS
from tbptt_bench.seeding import derive_seed, generator
from tbptt_bench.core.build import make_model, make_task, resolve_device, resolve_dtype

log = logging.getLogger(__name__)

#: ``none``: θ fixed, update gradients summed over the sequence: the cost of a gradient estimate ĝ.
OPTIMIZERS = ("adam", "sgd", "none")
PATHS = ("fused", "cell")
#: ``ok`` measured; ``oom`` out of memory (CPU allocator, CUDA, or the process killed by SIGKILL, as
#: the kernel's out-of-memory killer does); ``failed`` any other error; ``timeout`` a fresh process
#: that gave no result in time.
STATUSES = ("ok", "oom", "failed", "timeout")

CONFIG_COLUMNS = [
    "task", "model", "method", "seq_len", "batch_size", "hidden_size", "num_layers", "dtype", "path",
    "threads", "warmup", "repeats", "seed", "optimizer", "lr", "compile", "task_params", "memory_limit",
]
RESULT_COLUMNS = [
    "status", "error", "fresh_process", "pid", "updates_per_sequence", "tokens_per_sequence",
    "tokens_per_s", "tokens_per_s_p10", "tokens_per_s_p90",
    "ms_per_update", "ms_per_update_p10", "ms_per_update_p90",
    "seconds_per_sequence", "repeat_seconds", "first_sequence_s", "compile_s", "setup_s",
    "mem_baseline_bytes", "mem_peak_bytes", "mem_delta_bytes", "mem_sequence_bytes",
    "mem_reserved_peak_bytes", "mem_source",
]
PROVENANCE_COLUMNS = list(provenance("cpu"))
#: Every column of a result row, in table order (provenance's ``device`` is the device type used).
COLUMNS = CONFIG_COLUMNS + RESULT_COLUMNS + [c for c in PROVENANCE_COLUMNS if c not in CONFIG_COLUMNS]


@dataclass
class PerfConfig:
    """One cost measurement: what to train, how large, where, and how often to time it.

    ``threads`` None means all the CPUs this process may use (``os.sched_getaffinity`` where it exists).
    ``memory_limit`` (bytes) caps what the measured run may add on top of the memory in use when it
    starts; beyond it the run is recorded as ``oom``. CPU: an address-space limit (``RLIMIT_AS``, coarse:
    it counts reserved, not resident, memory) set in a fresh process only; CUDA: the caching
    allocator's per-process memory fraction.
    """

    task: str = "copy"
    model: str = "lstm"
    method: str = "chunked:k=64"
    seq_len: int = 1024
    batch_size: int = 32
    hidden_size: int = 128
    num_layers: int = 1
    device: str = "cpu"
    dtype: str = "float32"
    path: str = "fused"
    threads: int | None = None
    warmup: int = 1
    repeats: int = 5
    seed: int = 0
    optimizer: str = "adam"
    lr: float = 1e-3
    compile: bool = False
    task_params: dict[str, Any] = field(default_factory=dict)
    memory_limit: int | None = None

    def validate(self) -> None:
        """Raise UsageError, saying what is accepted, for anything that cannot be measured."""
        for name in ("seq_len", "batch_size", "hidden_size", "num_layers", "repeats"):
            if int(getattr(self, name)) < 1:
                raise UsageError(f"perf: {name} must be ≥ 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise UsageError(f"perf: warmup must be ≥ 0 sequences, got {self.warmup}")
        if self.threads is not None and self.threads < 1:
            raise UsageError(f"perf: threads must be ≥ 1 (or unset for all CPUs), got {self.threads}")
        if self.optimizer not in OPTIMIZERS:
            raise UsageError(f"perf: unknown optimizer {self.optimizer!r}; accepted: {', '.join(OPTIMIZERS)}")
        if not self.lr > 0:
            raise UsageError(f"perf: learning rate must be > 0, got {self.lr}")
        if self.path not in PATHS:
            raise UsageError(f"perf: unknown path {self.path!r}; accepted: {', '.join(PATHS)}")
        if self.compile and self.path != "cell":
            raise UsageError("perf: compile applies to the per-step cell path only; use path cell (or no compile)")
        if self.memory_limit is not None and self.memory_limit < 1:
            raise UsageError(f"perf: memory_limit must be a positive number of bytes, got {self.memory_limit}")
        resolve_dtype(self.dtype)
        resolve_device(self.device)
        if parse_method(self.method).forward_mode:  # online training: docs/online.md, not done yet
            raise UsageError(f"perf: {self.method} is an online (forward-mode) method, measured by grad and bias "
                             "only so far; train it with a mask method such as tbptt:k1=1,k2=K")
        MODELS.get(self.model)
        task = make_task(self.task, **self.task_params)
        task.sample(1, self.seq_len, generator(0))  # a length the task rejects is a UsageError now

    def resolved_threads(self) -> int:
        """The thread count the measurement sets (``threads`` or every CPU available to the process)."""
        if self.threads is not None:
            return int(self.threads)
        try:
            return len(os.sched_getaffinity(0))
        except AttributeError:
            return os.cpu_count() or 1

    def columns(self) -> dict[str, Any]:
        """The configuration as result columns (``method`` canonical, ``task_params`` as JSON text)."""
        out = dataclasses.asdict(self)
        del out["device"]
        out["method"] = parse_method(self.method).spec
        out["threads"] = self.resolved_threads()
        out["task_params"] = json.dumps(self.task_params, sort_keys=True)
        return out


# --------------------------------------------------------------------------------------- memory

def maxrss_bytes(raw: int, system: str | None = None) -> int:
    """``ru_maxrss`` in bytes: the kernel reports KiB on Linux (and BSDs), bytes on macOS."""
    system = platform.system() if system is None else system
    return int(raw) if system == "Darwin" else int(raw) * 1024


def peak_rss_bytes() -> int:
    """This process's resident-set high-water mark (since start, or since the last reset), bytes.

    Linux: ``VmHWM``, the mark :func:`reset_peak_rss` resets (``ru_maxrss`` also keeps the peak of
    exited threads, which a reset does not clear). Elsewhere: ``ru_maxrss``.
    """
    hwm = _proc_status_bytes("VmHWM")
    return hwm if hwm is not None else maxrss_bytes(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def _proc_status_bytes(key: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024  # the file says "kB" and means KiB
    except OSError:
        pass
    return None


def current_rss_bytes() -> int | None:
    """The resident set now (Linux ``VmRSS``), or None where the system does not say."""
    return _proc_status_bytes("VmRSS")


def reset_peak_rss() -> bool:
    """Reset the high-water mark to the current resident set (Linux ≥ 4.0); False where impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def release_free_memory() -> None:
    """Return freed heap pages to the system (glibc ``malloc_trim``), so a baseline is not inflated."""
    gc.collect()
    if platform.system() == "Linux":
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers


def _mallopt(param: int, value: int) -> bool:
    if platform.system() != "Linux":
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(param, value))
    except (OSError, AttributeError):
        return False


def set_heap_mode(exact: bool) -> bool:
    """Choose how glibc serves large allocations for the rest of this process (False: not glibc).

    ``exact``: every allocation of 64 KiB or more by its own ``mmap``, so freeing a tensor shrinks the
    resident set at once and the high-water mark follows live memory, not the heap's history (large
    allocations get slower: for memory passes). Otherwise: up to 32 MiB from the heap, trimmed above
    64 MiB free — the state glibc's adaptive threshold settles in once it has warmed up (for timing).
    Either setting ends the adaptive threshold, so only fresh measuring processes call this.
    """
    if exact:
        return _mallopt(_M_MMAP_THRESHOLD, 64 * 2**10)
    return _mallopt(_M_MMAP_THRESHOLD, 32 * 2**20) and _mallopt(_M_TRIM_THRESHOLD, 64 * 2**20)


class MemoryProbe:
    """Peak memory above baselines (bytes): over the whole run, and over one sequence from rest.

    :meth:`start` takes the baseline before the first sequence (model, optimiser and batch exist);
    :meth:`run_peak` reads the peak since then. :meth:`sequence_peak` measures one more sequence from a
    fresh baseline: the extra memory one sequence of updates needs once optimiser state and one-time
    workspaces exist (activations, gradients, workspaces).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.baseline = 0
        self.file_baseline = 0
        self.source = ""

    def _file_backed(self) -> int:
        """Resident pages of mapped files (library code paged in as new kernels first run), or 0.

        They are not memory the run allocates; their growth is taken off the high-water mark.
        """
        if self.device.type == "cuda":
            return 0
        return _proc_status_bytes("RssFile") or 0

    def _now(self) -> int | None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.memory_allocated(self.device)
        return current_rss_bytes()

    def _peak(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        return peak_rss_bytes()

    def _reset(self) -> bool:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return True
        return reset_peak_rss()

    def start(self) -> None:
        release_free_memory()
        self.file_baseline = self._file_backed()
        now = self._now()
        if now is not None and self._reset():
            self.baseline = now
            self.source = "cuda_allocator" if self.device.type == "cuda" else "rss_hwm_reset"
        else:  # no reset: the lifetime high-water mark, meaningful in a fresh process only
            self.baseline, self.source = (now if now is not None else peak_rss_bytes()), "ru_maxrss"

    def run_peak(self) -> dict[str, Any]:
        peak = self._peak()
        reserved = torch.cuda.max_memory_reserved(self.device) if self.device.type == "cuda" else None
        paged_in = max(self._file_backed() - self.file_baseline, 0)
        return {"mem_baseline_bytes": int(self.baseline), "mem_peak_bytes": int(peak),
                "mem_delta_bytes": int(max(peak - self.baseline - paged_in, 0)), "mem_reserved_peak_bytes": reserved,
                "mem_source": self.source}

    def sequence_peak(self, run: Callable[[], None]) -> int | None:
        """Peak above the memory in use just before ``run()`` (None where the peak cannot be reset)."""
        if self.source == "ru_maxrss":
            run()
            return None
        release_free_memory()
        file_before = self._file_backed()
        before = self._now()
        self._reset()
        run()
        paged_in = max(self._file_backed() - file_before, 0)
        return None if before is None else int(max(self._peak() - before - paged_in, 0))


def is_out_of_memory(exc: BaseException, limited: bool = False) -> bool:
    """Whether an exception says the allocator ran out of memory (CPU, CUDA or Python).

    ``limited``: a memory limit is in force; oneDNN then reports a failed workspace allocation only
    as a primitive it could not create or execute, which counts as out of memory too.
    """
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(exc).lower()
    if not isinstance(exc, RuntimeError):
        return False
    if "out of memory" in text or "can't allocate memory" in text:
        return True
    return limited and ("could not execute a primitive" in text or "could not create a primitive" in text)


# --------------------------------------------------------------------------------------- the run

class Workload:
    """Model, optimiser, engine and one batch of a configuration; :meth:`sequence` is the timed unit.

    Benchmark scripts use it to time the project's updates exactly as :func:`measure` does:
    ``updates = w.prepare()`` outside the timed region, then ``w.sequence(updates)`` inside it.
    """

    def __init__(self, cfg: PerfConfig, device: torch.device, dtype: torch.dtype) -> None:
        self.cfg = cfg
        self.device = device
        self.task = make_task(cfg.task, **cfg.task_params)
        self.method = parse_method(cfg.method)
        self.model = make_model(cfg.model, self.task, cfg.hidden_size, cfg.num_layers, seed=cfg.seed,
                                dtype=dtype, device=device, path=cfg.path)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer: torch.optim.Optimizer | None = None
        if cfg.optimizer == "adam":
            self.optimizer = torch.optim.Adam(params, lr=cfg.lr)
        elif cfg.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(params, lr=cfg.lr)
        self.engine = Engine(self.model, self.task.loss_kind, device=device, dtype=dtype,
                             checkpoint=self.method.checkpoint, non_blocking=device.type == "cuda")
        # The batch stays on the CPU: the engine moves one chunk at a time, as in training.
        self.batch = self.task.sample(cfg.batch_size, cfg.seq_len, generator(derive_seed("perf-data", cfg.seed)))
        self.rng = np.random.default_rng(derive_seed("perf-method", cfg.seed))
        self.updates_done = 0

    def compile(self) -> float:
        """Compile the per-step cell and run it once forward and backward; seconds this took."""
        compile_cell = getattr(self.model, "compile_cell", None)
        if not callable(compile_cell):
            raise UsageError(f"perf: model {self.cfg.model!r} has no compile_cell(); compile needs a built-in model")
        t0 = time.perf_counter()
        compile_cell()
        probe = self.batch.slice(0, 2).to(self.device)
        features, _ = self.model.core(probe.inputs, self.model.initial_state(self.cfg.batch_size))  # type: ignore[operator]
        features.sum().backward()
        self.model.zero_grad(set_to_none=True)
        synchronize(self.device)
        return time.perf_counter() - t0

    def prepare(self) -> list[Update]:
        """Outside the timed region: let the method look at θ, and list this sequence's updates."""
        observe = getattr(self.method, "observe", None)
        if callable(observe):
            observe(self.updates_done, self.model, self.batch, self.model.initial_state(self.cfg.batch_size),
                    self.task.loss_kind)
        return self.method.updates(self.cfg.seq_len, first_update=self.updates_done, rng=self.rng)

    def sequence(self, updates: Sequence[Update]) -> None:
        """Every update of the method over the batch, an optimiser step after each (the timed unit).

        Without an optimiser (``none``) the update gradients accumulate over the sequence, θ fixed —
        the gradient estimate ĝ of bias analysis — and are cleared at the start of the next sequence.
        """
        state = self.model.initial_state(self.cfg.batch_size)
        if self.optimizer is None:
            self.model.zero_grad(set_to_none=True)
            self.engine.run(self.batch, updates, state)
        else:
            self.engine.run(self.batch, updates, state, self._step)
        self.updates_done += len(updates)

    def _step(self, i: int, u: Update, loss: torch.Tensor) -> None:
        assert self.optimizer is not None
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def synchronize(device: torch.device) -> None:
    """Wait for the device (CUDA) to finish queued work; nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_sequence(run: Workload, device: torch.device) -> tuple[float, int]:
    """Seconds for one whole sequence (synchronised before and after on CUDA) and its update count.

    ``prepare`` (the method's between-sequence work) runs before the clock starts.
    """
    updates = run.prepare()
    synchronize(device)
    t0 = time.perf_counter()
    run.sequence(updates)
    synchronize(device)
    return time.perf_counter() - t0, len(updates)


def interleaved_times(
    fns: dict[str, Callable[[], Any]], rounds: int, *, warmup: int = 1, device: torch.device | str = "cpu"
) -> dict[str, list[float]]:
    """Seconds per call of each function, called in turn (A B C, then C B A, …) so drift cancels.

    For comparing implementations in one process: each gets ``warmup`` untimed calls first, then
    ``rounds`` timed calls; on CUDA each call is synchronised before and after.
    """
    dev = torch.device(device)
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    synchronize(dev)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            synchronize(dev)
            t0 = time.perf_counter()
            fns[name]()
            synchronize(dev)
            times[name].append(time.perf_counter() - t0)
    return times


def _percentiles(values: list[float]) -> tuple[float, float, float]:
    arr = np.asarray(values, dtype=float)
    return float(np.median(arr)), float(np.percentile(arr, 10)), float(np.percentile(arr, 90))


def summarise(seconds: list[float], updates: list[int], tokens_per_sequence: int) -> dict[str, Any]:
    """Median and 10th/90th percentiles of throughput and time per update over the timed sequences."""
    ms = [1000.0 * s / max(n, 1) for s, n in zip(seconds, updates)]
    tps = [tokens_per_sequence / s for s in seconds]
    ms_med, ms_p10, ms_p90 = _percentiles(ms)
    tps_med, tps_p10, tps_p90 = _percentiles(tps)
    return {
        "updates_per_sequence": int(np.median(updates)), "tokens_per_sequence": tokens_per_sequence,
        "tokens_per_s": tps_med, "tokens_per_s_p10": tps_p10, "tokens_per_s_p90": tps_p90,
        "ms_per_update": ms_med, "ms_per_update_p10": ms_p10, "ms_per_update_p90": ms_p90,
        "seconds_per_sequence": float(np.median(seconds)), "repeat_seconds": [float(s) for s in seconds],
    }


def _empty_row(cfg: PerfConfig, device: torch.device) -> dict[str, Any]:
    row: dict[str, Any] = {c: None for c in COLUMNS}
    row.update(provenance(device))
    row.update(cfg.columns())  # the configured thread count, also where this process runs another
    row.update({"status": "failed", "error": "", "fresh_process": False, "pid": os.getpid()})
    return row


def measure(cfg: PerfConfig, *, limit_memory: Callable[[], None] | None = None, isolated: bool = False) -> dict[str, Any]:
    """Measure one configuration in this process: one result row (see :data:`COLUMNS`).

    Out of memory gives status ``oom`` and any other error ``failed`` (with ``error``), so a grid goes
    on; a configuration that cannot be measured at all is a UsageError before anything runs. Memory
    columns are exact only in a fresh process (:func:`measure_in_fresh_process`, which passes
    ``isolated=True``: the C allocator's settings are then changed for good, see :func:`set_heap_mode`).

    Order: warm-up sequences, one sequence for ``mem_sequence_bytes``, then the timed repeats (in a
    fresh process, after switching the heap back to its timing setting and one untimed sequence).
    """
    cfg.validate()
    device, dtype = resolve_device(cfg.device), resolve_dtype(cfg.dtype)
    if cfg.memory_limit is not None and device.type != "cuda" and limit_memory is None:
        raise UsageError("perf: memory_limit on the CPU needs a fresh process (measure_in_fresh_process)")
    torch.set_num_threads(cfg.resolved_threads())
    row = _empty_row(cfg, device)
    run: Workload | None = None
    exact_heap = isolated and device.type == "cpu" and set_heap_mode(exact=True)
    t_setup = time.perf_counter()
    try:
        run = Workload(cfg, device, dtype)
        if cfg.compile:
            row["compile_s"] = run.compile()
        row["setup_s"] = time.perf_counter() - t_setup
        probe = MemoryProbe(device)
        probe.start()
        if cfg.memory_limit is not None:
            (limit_memory or (lambda: _limit_cuda_memory(device, probe.baseline, cfg.memory_limit)))()  # type: ignore[arg-type]
        for i in range(cfg.warmup):
            seconds, _ = time_sequence(run, device)
            if i == 0:
                row["first_sequence_s"] = seconds
        updates = run.prepare()
        row["mem_sequence_bytes"] = probe.sequence_peak(functools.partial(run.sequence, updates))
        row.update(probe.run_peak())
        if exact_heap:
            row["mem_source"] += "+mmap"
            set_heap_mode(exact=False)  # time with the heap glibc would have by now
            release_free_memory()
            time_sequence(run, device)
        seconds_list, update_counts = [], []
        for _ in range(cfg.repeats):
            seconds, n = time_sequence(run, device)
            seconds_list.append(seconds)
            update_counts.append(n)
        row.update(summarise(seconds_list, update_counts, cfg.batch_size * cfg.seq_len))
        row["status"] = "ok"
    except UsageError:
        raise
    except Exception as exc:  # recorded as data so that a grid goes on
        row["status"] = "oom" if is_out_of_memory(exc, limited=cfg.memory_limit is not None) else "failed"
        row["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
        log.warning("perf %s %s T=%d: %s", cfg.model, cfg.method, cfg.seq_len, row["error"])
    finally:
        del run
        gc.collect()
        if device.type == "cuda":
            torch.cuda.set_per_process_memory_fraction(1.0, device)
            torch.cuda.empty_cache()
    return row


def _limit_cuda_memory(device: torch.device, baseline: int, limit: int) -> None:
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, (baseline + limit) / total), device)


def _limit_address_space(limit: int) -> Callable[[], None]:
    """A callable that caps this process's address space at its current size plus ``limit`` bytes."""

    def apply() -> None:
        size = _proc_status_bytes("VmSize")
        if size is None:
            raise UsageError("perf: memory_limit on the CPU needs Linux (/proc/self/status)")
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        soft = size + limit if hard == resource.RLIM_INFINITY else min(size + limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))

    return apply


# --------------------------------------------------------------------------------------- fresh process

def _child_env(cfg: PerfConfig) -> dict[str, str]:
    from tbptt_bench import registry

    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    plugin_dirs = [p for p in env.get(registry.PLUGIN_ENV, "").split(os.pathsep) if p]
    plugin_dirs += [str(p) for p in sorted(registry._loaded_dirs)]
    if plugin_dirs:
        env[registry.PLUGIN_ENV] = os.pathsep.join(dict.fromkeys(plugin_dirs))
    threads = str(cfg.resolved_threads())
    env["OMP_NUM_THREADS"] = threads
    env["MKL_NUM_THREADS"] = threads
    return env


def measure_in_fresh_process(cfg: PerfConfig, timeout: float | None = None) -> dict[str, Any]:
    """Measure one configuration in a new Python process (so memory and caches start clean).

    The child runs :func:`measure` and writes its row to a file; a child that times out gives status
    ``timeout``, one killed by SIGKILL (the out-of-memory killer's signal) ``oom``, any other death
    ``failed`` with the end of its stderr.
    """
    cfg.validate()
    device = resolve_device(cfg.device)
    with tempfile.TemporaryDirectory(prefix="tbptt-perf-") as tmp:
        cfg_path, out_path = Path(tmp) / "config.json", Path(tmp) / "row.json"
        cfg_path.write_text(json.dumps(dataclasses.asdict(cfg)))
        cmd = [sys.executable, "-m", "tbptt_bench.perf.harness", "--child", str(cfg_path), str(out_path)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_child_env(cfg))
        except subprocess.TimeoutExpired:
            row = _empty_row(cfg, device)
            row.update(status="timeout", error=f"no result after {timeout} s", pid=None, fresh_process=True)
            return row
        if out_path.exists():
            row = json.loads(out_path.read_text())
            row["fresh_process"] = True
            return row
    row = _empty_row(cfg, device)
    row.update(fresh_process=True, pid=None)
    if proc.returncode == -signal.SIGKILL:
        row.update(status="oom", error="killed by SIGKILL (most likely the kernel's out-of-memory killer)")
    else:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        row.update(status="failed", error=f"child exited with status {proc.returncode}: {tail}"[:500])
    return row


def _child_main(cfg_path: str, out_path: str) -> int:
    cfg = PerfConfig(**json.loads(Path(cfg_path).read_text()))
    device = resolve_device(cfg.device)
    limiter = _limit_address_space(cfg.memory_limit) if cfg.memory_limit is not None and device.type != "cuda" else None
    row = measure(cfg, limit_memory=limiter, isolated=True)
    row["pid"] = os.getpid()
    write_json_atomic(Path(out_path), row)
    return 0


# --------------------------------------------------------------------------------------- grids and files

def expand_grid(base: PerfConfig | None = None, **axes: Iterable[Any]) -> list[PerfConfig]:
    """Every combination of the values in ``axes`` (field name → values) over ``base``, in order."""
    base = base or PerfConfig()
    names = {f.name for f in dataclasses.fields(PerfConfig)}
    unknown = sorted(set(axes) - names)
    if unknown:
        raise UsageError(f"perf: unknown configuration field {unknown[0]!r}; accepted: {', '.join(sorted(names))}")
    configs = [base]
    for name, values in axes.items():
        values = list(values)
        if not values:
            raise UsageError(f"perf: no values given for {name}")
        configs = [dataclasses.replace(c, **{name: v}) for c in configs for v in values]
    return configs


def perf_grid(
    configs: Sequence[PerfConfig],
    *,
    fresh: bool = True,
    timeout: float | None = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> pd.DataFrame:
    """Measure every configuration (each in its own process unless ``fresh`` is False); one row each.

    All configurations are checked before the first runs; a failing or out-of-memory one is recorded
    and the grid goes on.
    """
    for cfg in configs:
        cfg.validate()
    rows = []
    for cfg in configs:
        row = measure_in_fresh_process(cfg, timeout) if fresh else measure(cfg)
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return to_frame(rows)


def to_frame(rows: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Rows as a table with the documented columns first (extra columns kept after them)."""
    frame = pd.DataFrame(list(rows))
    for c in COLUMNS:
        if c not in frame.columns:
            frame[c] = None
    return frame[COLUMNS + [c for c in frame.columns if c not in COLUMNS]]


TABLE_SUFFIXES = (".csv", ".parquet", ".json")


def check_output_path(path: Path) -> None:
    """UsageError unless ``path`` can take a table: a known suffix in an existing folder."""
    if path.suffix not in TABLE_SUFFIXES:
        raise UsageError(f"cannot save {path}: unknown suffix {path.suffix!r}; accepted: {', '.join(TABLE_SUFFIXES)}")
    if not path.parent.exists():
        raise UsageError(f"cannot write {path}: folder {path.parent} does not exist")


def save_table(frame: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Write a result table as CSV, Parquet or JSON records, atomically (temp file, then rename)."""
    path = Path(path)
    check_output_path(path)
    out = frame.copy()
    if "repeat_seconds" in out.columns and path.suffix != ".json":
        out["repeat_seconds"] = out["repeat_seconds"].map(lambda v: json.dumps(v) if isinstance(v, list) else v)
    with atomic_path(path) as tmp:
        if path.suffix == ".csv":
            out.to_csv(tmp, index=False)
        elif path.suffix == ".parquet":
            out.to_parquet(tmp, index=False)
        else:
            tmp.write_text(json.dumps(out.to_dict("records"), indent=2, default=_json_default))
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def write_json_atomic(path: Path, obj: Any) -> None:
    """JSON to ``path`` through a temporary file in the same folder."""
    write_text(path, json.dumps(obj, default=_json_default))


def main(argv: list[str] | None = None) -> int:
    """Entry point of the measuring child: ``python -m tbptt_bench.perf.harness --child CONFIG.json ROW.json``."""
    parser = argparse.ArgumentParser(prog="python -m tbptt_bench.perf.harness")
    parser.add_argument("--child", nargs=2, metavar=("CONFIG", "ROW"), required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return _child_main(*args.child)
    except UsageError as exc:
        print(f"tbptt-bench perf: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
