"""Cost of an update on the CPU: time and peak memory of one sequence of each method family's updates.

The measured call is ``tbptt-bench perf``'s timed unit, ``Workload.sequence``: every update of the
cell's method over one batch, an optimiser step after each. Model, data, engine, optimiser and the
method's between-sequence work are set up in ``setup``, outside the measurement, which also runs one
warm-up sequence. Torch runs on one thread (:data:`asv_bench.grid.THREADS`) so that timings taken on
shared CI machines compare.
"""

from __future__ import annotations

from asv_bench import grid


class CPUUpdate:
    """time_ and peakmem_ of one sequence of updates, per (task, method family)."""

    params = grid.grid()
    param_names = grid.PARAM_NAMES

    def setup(self, task: str, method: str) -> None:
        self.work, self.updates = grid.workload(task, method)
        self.work.sequence(self.updates)

    def time_update(self, task: str, method: str) -> None:
        """Seconds for one sequence of updates (forward, backward, optimiser step per update)."""
        self.work.sequence(self.updates)

    def peakmem_update(self, task: str, method: str) -> None:
        """Peak resident memory of the benchmark process, which runs one sequence of updates (bytes)."""
        self.work.sequence(self.updates)
