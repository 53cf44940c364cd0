"""Cost of an update on a CUDA GPU: synchronised time per update and peak allocated memory.

Skipped without a GPU: ``setup`` raises ``NotImplementedError``, which asv records as a skipped
benchmark (shown as n/a). Both figures are ``track_`` values measured here rather than by asv's timer,
because GPU work is asynchronous: the time is taken between CUDA events recorded around one sequence,
read after the stream has finished, so no host-device synchronisation happens inside the region.
"""

from __future__ import annotations

import statistics

import torch

from asv_bench import grid

#: Timed sequences per measurement (after one warm-up sequence in setup); the median is reported.
REPEATS = 5


class GPUUpdate:
    """track_ GPU time per update and peak GPU memory, per (task, method family)."""

    params = grid.grid()
    param_names = grid.PARAM_NAMES

    def setup(self, task: str, method: str) -> None:
        if not torch.cuda.is_available():
            raise NotImplementedError("needs a CUDA GPU")
        self.trainer = grid.build(task, method, device="cuda").trainer()
        self.trainer.run()
        torch.cuda.synchronize()

    def track_gpu_time_per_update(self, task: str, method: str) -> float:
        """Median over sequences of (CUDA-event time of one sequence) / (its number of updates)."""
        times = []
        for _ in range(REPEATS):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            self.trainer.run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000.0 / len(self.trainer.cell.updates))
        return statistics.median(times)

    track_gpu_time_per_update.unit = "seconds"  # type: ignore[attr-defined]

    def track_gpu_peakmem(self, task: str, method: str) -> float:
        """Peak allocated GPU memory during one sequence, above what was allocated before it (bytes)."""
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
        self.trainer.run()
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated() - baseline)

    track_gpu_peakmem.unit = "bytes"  # type: ignore[attr-defined]
