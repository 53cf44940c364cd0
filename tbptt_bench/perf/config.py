"""The configuration of one cost measurement and the columns of its result row (docs/perf.md)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, ClassVar

from tbptt_bench.core.build import make_task, resolve_device
from tbptt_bench.errors import UsageError
from tbptt_bench.options import MAX_COUNT, option
from tbptt_bench.methods.base import parse_method
from tbptt_bench.models import MODELS
from tbptt_bench.provenance import provenance
from tbptt_bench.seeding import generator
from tbptt_bench.training.run import ComposedConfig, RunConfig
from tbptt_bench.validation import finite_float, integer

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)


def parse_size(text: str | None) -> int | None:
    """``"512M"`` → bytes (binary units: K = 1024); None stays None."""
    if text is None:
        return None
    match = _SIZE.match(text)
    if not match:
        raise UsageError(f"--memory-limit {text!r} is not a size; expected e.g. 2G, 512M or a number of bytes")
    scale = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[match.group(2).lower()]
    size = finite_float("--memory-limit", match.group(1), 0, lo_open=True) * scale
    return integer("--memory-limit", float(min(size, 2.0**62)) // 1, lo=1)

CONFIG_COLUMNS = [
    "task", "model", "method", "seq_len", "batch_size", "hidden_size", "num_layers", "dtype", "path",
    "threads", "warmup", "repeats", "seed", "optimizer", "lr", "compile", "task_params", "memory_limit",
    "optimizer_args", "lr_schedule", "lr_schedule_args", "clip", "model_params",
]
RESULT_COLUMNS = [
    "status", "error", "fresh_process", "pid", "updates_per_sequence", "tokens_per_sequence",
    "tokens_per_s", "tokens_per_s_p10", "tokens_per_s_p90",
    "ms_per_update", "ms_per_update_p10", "ms_per_update_p90",
    "seconds_per_sequence", "repeat_seconds", "first_sequence_s", "compile_s", "setup_s",
    "mem_baseline_bytes", "mem_peak_bytes", "mem_delta_bytes", "mem_sequence_bytes",
    "mem_reserved_peak_bytes", "mem_source", "load_avg_1m", "load_avg_1m_end", "other_cpu_fraction", "busy",
]
PROVENANCE_COLUMNS = list(provenance("cpu"))
#: Every column of a result row, in table order (provenance's ``device`` is the device type used).
COLUMNS = CONFIG_COLUMNS + RESULT_COLUMNS + [c for c in PROVENANCE_COLUMNS if c not in CONFIG_COLUMNS]


@dataclass(init=False)
class PerfConfig(ComposedConfig):
    """One cost measurement: a :class:`RunConfig` plus how often to time it and under what limits.

    Built from flat values as well (``PerfConfig(method="full", seq_len=512)``), run fields read
    directly. ``threads`` None means all the CPUs this process may use (``os.sched_getaffinity`` where
    it exists); optimizer ``none`` keeps θ fixed, the update gradients summed over the sequence: the
    cost of a gradient estimate ĝ. ``memory_limit`` (bytes) caps what the measured run may add on top
    of the memory in use when it starts; beyond it the run is recorded as ``oom``. CPU: an
    address-space limit (``RLIMIT_AS``, coarse: it counts reserved, not resident, memory) set in a
    fresh process only; CUDA: the caching allocator's per-process memory fraction.
    """

    RUN_DEFAULTS: ClassVar[dict[str, Any]] = {
        "method": "chunked:k=64", "seq_len": 1024, "batch_size": 32, "hidden_size": 128, "clip": None}

    run: RunConfig
    warmup: int = option(1, flag="--warmup", lo=0, hi=MAX_COUNT, help="untimed sequences before timing")
    repeats: int = option(5, flag="--repeats", lo=1, hi=MAX_COUNT,
                          help="timed sequences (median and p10/p90 reported)")
    compile: bool = option(False, flag="--compile", action="store_true",
                           help="torch.compile the per-step cell (cell path only)")
    memory_limit: int | None = option(None, flag="--memory-limit", metavar="SIZE", parse=lambda _, t: parse_size(t),
                                      lo=1, help="cap what each run may add, e.g. 2G or 512M; beyond it the cell is "
                                                 "recorded as oom")

    def validate(self) -> None:
        """Raise UsageError, saying what is accepted, for anything that cannot be measured."""
        if self.repeats < 1:
            raise UsageError(f"perf: repeats must be ≥ 1, got {self.repeats}")
        if self.warmup < 0:
            raise UsageError(f"perf: warmup must be ≥ 0 sequences, got {self.warmup}")
        if self.compile and self.path != "cell":
            raise UsageError("perf: compile applies to the per-step cell path only; use path cell (or no compile)")
        if self.memory_limit is not None and self.memory_limit < 1:
            raise UsageError(f"perf: memory_limit must be a positive number of bytes, got {self.memory_limit}")
        try:
            self.run.validate()
        except UsageError as exc:
            raise UsageError(f"perf: {exc}") from None
        resolve_device(self.device)
        MODELS.get(self.model)
        task = make_task(self.task, **self.task_params)
        task.sample(1, self.seq_len, generator(0))  # a length the task rejects is a UsageError now

    def resolved_threads(self) -> int:
        """The thread count the measurement sets (``threads`` or every CPU available to the process)."""
        return self.run.resolved_threads()

    def columns(self) -> dict[str, Any]:
        """The configuration as result columns (``method`` canonical, ``threads`` resolved, dicts as JSON text)."""
        out = self.flat()
        del out["device"]
        out["method"] = parse_method(self.method).spec
        out["threads"] = self.run.resolved_threads()
        for name in ("task_params", "model_params", "optimizer_args", "lr_schedule_args"):
            if out[name] is not None:
                out[name] = json.dumps(out[name], sort_keys=True)
        return out
