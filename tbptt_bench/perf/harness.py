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

How busy the machine was during the timed repeats is recorded by :class:`tbptt_bench.provenance.LoadProbe`
(columns ``load_avg_1m``, ``load_avg_1m_end``, ``other_cpu_fraction``, ``busy``; :func:`refuse_if_busy`).
Memory is read by :mod:`tbptt_bench.perf.memory`, failures classified by :mod:`tbptt_bench.perf.failures`,
the fresh-process protocol is :mod:`tbptt_bench.perf.child`, grids and table files :mod:`tbptt_bench.perf.tables`.
Column names are listed in docs/perf.md; :data:`tbptt_bench.perf.config.COLUMNS` is the same list.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import logging
import os
import time
from typing import Any, Callable, Sequence

import numpy as np
import torch

from tbptt_bench.core.build import resolve_device, resolve_dtype
from tbptt_bench.core.mask import Update
from tbptt_bench.errors import UsageError
from tbptt_bench.perf.config import COLUMNS, PerfConfig
from tbptt_bench.perf.failures import is_out_of_memory
from tbptt_bench.perf.memory import MemoryProbe, limit_cuda_memory, release_free_memory, set_heap_mode
from tbptt_bench.provenance import BUSY_LOAD_MARGIN, BUSY_OTHER_CORES, LoadProbe, provenance
from tbptt_bench.seeding import derive_seed, generator, method_rng
from tbptt_bench.training.run import build_run

log = logging.getLogger(__name__)


class Workload:
    """Model, optimiser, engine and one batch of a configuration; :meth:`sequence` is the timed unit.

    Benchmark scripts use it to time the project's updates exactly as :func:`measure` does:
    ``updates = w.prepare()`` outside the timed region, then ``w.sequence(updates)`` inside it.
    """

    def __init__(self, cfg: PerfConfig, device: torch.device, dtype: torch.dtype) -> None:
        self.cfg = cfg
        self.device = device
        self.run = build_run(dataclasses.replace(cfg.run, device=str(device), dtype=str(dtype).removeprefix("torch.")))
        self.task, self.method, self.model = self.run.task, self.run.method, self.run.model
        self.optimizer = self.run.optimizer
        self.engine = self.run.engine
        # The batch stays on the CPU: the engine moves one chunk at a time, as in training.
        self.batch = self.task.sample(cfg.batch_size, cfg.seq_len, generator(derive_seed("perf-data", cfg.seed)))
        self.rng = method_rng(cfg.seed, "perf")
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
        self.run.step()


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


def timing_stats(seconds: list[float], updates: list[int], tokens_per_sequence: int) -> dict[str, Any]:
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


def busy_message(row: dict[str, Any]) -> str:
    """One line saying why a row's timed repeats count as measured on a busy machine."""
    other, load, threads = row.get("other_cpu_fraction"), row.get("load_avg_1m"), row.get("threads")
    if other is not None and other > BUSY_OTHER_CORES:
        why = f"other processes used {other:.2f} cores' worth of CPU time while it ran"
    else:
        loads = [v for v in (load, row.get("load_avg_1m_end")) if v is not None]
        why = f"1-minute load average {max(loads, default=float('nan')):.2f} above {threads} threads + {BUSY_LOAD_MARGIN}"
    return f"measured on a busy machine ({why}; using {threads} threads)"


def refuse_if_busy(row: dict[str, Any]) -> dict[str, Any]:
    """``--strict``: a row measured ``ok`` on a busy machine gets status ``busy`` (numbers kept, not to be used)."""
    if row.get("status") == "ok" and row.get("busy") is True:
        row = {**row, "status": "busy", "error": busy_message(row)}
    return row


def empty_row(cfg: PerfConfig, device: torch.device) -> dict[str, Any]:
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
    row = empty_row(cfg, device)
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
            (limit_memory or (lambda: limit_cuda_memory(device, cfg.memory_limit)))()  # type: ignore[arg-type]
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
        load = LoadProbe(cfg.resolved_threads())
        load.start()
        for _ in range(cfg.repeats):
            seconds, n = time_sequence(run, device)
            seconds_list.append(seconds)
            update_counts.append(n)
        row.update(load.stop())
        row.update(timing_stats(seconds_list, update_counts, cfg.batch_size * cfg.seq_len))
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
