"""Cost of an update on a CUDA GPU: synchronised time per update and peak allocated memory, at :data:`SIZES`.

Skipped without a GPU: ``setup`` raises ``NotImplementedError``, which asv records as a skipped
benchmark (shown as n/a). Both figures are ``track_`` values taken with ``tbptt-bench perf``'s own
instruments rather than asv's timer, because GPU work is asynchronous: ``perf.time_sequence``
synchronises the device before and after one sequence (and nowhere inside it), and
``perf.MemoryProbe.sequence_peak`` reads the allocator's peak over one sequence.
"""

from __future__ import annotations

import statistics

import torch

from asv_bench import grid

#: Timed sequences per measurement (after one warm-up sequence in setup); the median is reported.
REPEATS = 5
#: Sizes of every cell: long enough and wide enough that the GPU's kernels, not launch latency, set the time.
SIZES = {"seq_len": 1024, "batch_size": 32, "hidden_size": 512}


class GPUUpdate:
    """track_ GPU time per update and peak GPU memory, per (task, method family)."""

    params = grid.grid()
    param_names = grid.PARAM_NAMES

    def setup(self, task: str, method: str) -> None:
        if not torch.cuda.is_available():
            raise NotImplementedError("needs a CUDA GPU")
        from tbptt_bench.errors import UsageError

        sizes = (SIZES["seq_len"], SIZES["batch_size"], SIZES["hidden_size"])
        try:
            self.work, self.updates = grid.workload(task, method, device="cuda", sizes=sizes)
            self.work.sequence(self.updates)
        except UsageError as exc:  # e.g. RTRL's influence matrix at these sizes: no number, not a failure
            raise NotImplementedError(f"{method} on {task} at {SIZES}: {exc}") from None
        torch.cuda.synchronize()

    def track_gpu_time_per_update(self, task: str, method: str) -> float:
        """Median over sequences of (synchronised seconds for one sequence) / (its number of updates)."""
        from tbptt_bench.perf.harness import time_sequence

        per_update = []
        for _ in range(REPEATS):
            seconds, updates = time_sequence(self.work, self.work.device)
            per_update.append(seconds / max(updates, 1))
        return statistics.median(per_update)

    track_gpu_time_per_update.unit = "seconds"  # type: ignore[attr-defined]

    def track_gpu_peakmem(self, task: str, method: str) -> float:
        """Peak allocated GPU memory during one sequence above what was allocated before it (bytes)."""
        try:
            from tbptt_bench.perf.memory import MemoryProbe
        except ModuleNotFoundError:  # versions before the perf package was split
            from tbptt_bench.perf.harness import MemoryProbe  # type: ignore[attr-defined, no-redef]

        peak = MemoryProbe(self.work.device).sequence_peak(lambda: self.work.sequence(self.updates))
        if peak is None:
            raise RuntimeError("the CUDA allocator gave no peak")
        return float(peak)

    track_gpu_peakmem.unit = "bytes"  # type: ignore[attr-defined]
