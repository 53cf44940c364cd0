"""Cost of a whole K curve relative to one full forward + backward: track_ ratios (lower is better).

A cell is (task, method family) as in every benchmark here (:mod:`asv_bench.grid`); only families with
a nested K curve (``chunked``: K = 1, 2, 4, …, T/8; ``tbptt``: ``tbptt:k1=K,k2=2K−1`` over the same K)
are measured, the others are skipped (NotImplementedError, as asv expects). The figure is the median
over :data:`ROUNDS` interleaved rounds of (K-curve time) / (full BPTT time, the engine's ``full``)
at :data:`SEQ_LEN` steps, :data:`HIDDEN` hidden units and :data:`BATCH` rows, one thread, float32:
a ratio taken in the same process, so a slower machine moves both timings, not the figure.
"""

from __future__ import annotations

import math
import statistics
import time

import torch

from asv_bench import grid

SEQ_LEN = 256
HIDDEN = 32
BATCH = 8
ROUNDS = 5
CURVES = {"chunked": "chunked:k={k}", "tbptt": "tbptt:k1={k},k2={k2}"}


def curve_specs(family: str, seq_len: int) -> list[str]:
    """The family's dyadic K grid 1, 2, …, seq_len/8."""
    ks = [2**i for i in range(int(math.log2(seq_len // 8)) + 1)]
    return [CURVES[family].format(k=k, k2=2 * k - 1) for k in ks]


def cost_ratio(task: str, family: str, rounds: int = ROUNDS) -> float:
    """Median over interleaved rounds of t(K curve) / t(full forward + backward)."""
    try:
        from tbptt_bench.analysis.gradients import true_gradient
        from tbptt_bench.analysis.kcurve import kcurve_gradients
    except ModuleNotFoundError as exc:
        raise NotImplementedError(f"this version of tbptt-bench has no {exc.name}") from None
    from tbptt_bench.seeding import derive_seed, generator

    torch.set_num_threads(grid.THREADS)
    task_obj, _ = grid.task_and_model(task)
    from tbptt_bench.core.build import make_model

    model = make_model(grid.MODEL, task_obj, HIDDEN, seed=grid.SEED)
    data = task_obj.sample(BATCH, SEQ_LEN, generator(derive_seed("asv-kcurve", grid.SEED)))
    specs = curve_specs(family, SEQ_LEN)
    loss = task_obj.loss_kind
    calls = {"full": lambda: true_gradient(model, data, loss),
             "curve": lambda: kcurve_gradients(model, data, loss, specs)}
    for fn in calls.values():
        fn()
    ratios = []
    for r in range(rounds):
        seconds = {}
        for name in (list(calls) if r % 2 == 0 else list(calls)[::-1]):
            t0 = time.perf_counter()
            calls[name]()
            seconds[name] = time.perf_counter() - t0
        ratios.append(seconds["curve"] / seconds["full"])
    return float(statistics.median(ratios))


class KCurveCost:
    """track_ (K-curve time) / (one full forward + backward), per (task, family with a K curve)."""

    params = grid.grid()
    param_names = grid.PARAM_NAMES
    timeout = 300

    def setup(self, task: str, method: str) -> None:
        if method not in CURVES:
            raise NotImplementedError(f"family {method!r} has no nested K curve")
        self.ratio = cost_ratio(task, method)

    def track_cost_ratio(self, task: str, method: str) -> float:
        """Seconds for the whole dyadic K curve per second of full BPTT."""
        return self.ratio

    track_cost_ratio.unit = "x full fwd+bwd"  # type: ignore[attr-defined]
