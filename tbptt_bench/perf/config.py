"""The configuration of one cost measurement and the columns of its result row (docs/perf.md)."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from tbptt_bench.core.build import make_task, resolve_device, resolve_dtype
from tbptt_bench.errors import UsageError
from tbptt_bench.methods.base import parse_method
from tbptt_bench.models import MODELS
from tbptt_bench.provenance import provenance
from tbptt_bench.seeding import generator

#: ``none``: θ fixed, update gradients summed over the sequence: the cost of a gradient estimate ĝ.
OPTIMIZERS = ("adam", "sgd", "none")
PATHS = ("fused", "cell")
#: ``ok`` measured; ``oom`` out of memory (CPU allocator, CUDA, or the process killed by SIGKILL, as
#: the kernel's out-of-memory killer does); ``failed`` any other error; ``timeout`` a fresh process
#: that gave no result in time.

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
        parse_method(self.method)
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
