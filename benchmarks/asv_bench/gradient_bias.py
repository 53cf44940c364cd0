"""Gradient bias of each method family, as ``tbptt-bench bias`` measures it: track_ figures.

Each cell is one call of :func:`tbptt_bench.analysis.bias.measure_bias` for the cell's representative spec, in
float64 at the cell's fixed seeds and θ (no optimiser step) over :data:`N_BATCHES` batches, so the
figures are deterministic — a change in them is a change in what a method computes, never noise — and
equal to what ``tbptt-bench bias --task T --model lstm --method SPEC --seq-len … --batch … --hidden …
--seed 0 --batches 64 --dtype float64`` reports for the same cell. Lower is better, as asv assumes.

``relative_bias`` is the noise-corrected estimate of ‖E(ĝ − g)‖/‖E g‖ (docs/statistics.md), not the
plug-in: the plug-in falls when a method gets *less noisy*, so a change that breaks an unbiased
method by weakening its compensation used to show as an improvement. With 64 batches the corrected
figure of ARTBP is 0 on every built-in task and rises when the compensation is weakened to
1/(1 − 0.9c) (tests/test_randomised.py), so asv reports that break as a regression.
"""

from __future__ import annotations

import math

from asv_bench import grid

DTYPE = "float64"
#: Independent batches (stream positions for streaming tasks) that the bias of the expectation averages.
N_BATCHES = 64


def bias_figures(task: str, method: str) -> dict[str, float]:
    """The cell's ``relative_bias`` (noise-corrected ‖E(ĝ − g)‖/‖E g‖) and ``one_minus_cosine`` 1 − mean cos(ĝ, g).

    Both over all parameters (group ``all``) of the bias table; no test of zero bias or lag profile,
    which do not enter these figures. Raises NotImplementedError (asv: skipped) for a tbptt-bench
    version without the bias module, since asv also benchmarks older commits.
    """
    try:
        from tbptt_bench.analysis.bias import measure_bias
    except ModuleNotFoundError as exc:
        if exc.name != "tbptt_bench.analysis.bias":
            raise
        raise NotImplementedError("this version of tbptt-bench has no tbptt_bench.analysis.bias") from None
    seq_len, batch_size, _ = grid.tiny_size(task)
    task_obj, model = grid.task_and_model(task, dtype=DTYPE)
    spec = grid.representative_spec(method, seq_len)
    table = measure_bias(task_obj, model, [spec], seq_len=seq_len, batch_size=batch_size, n_batches=N_BATCHES,
                         seed=grid.SEED, dtype=DTYPE, n_flips=0, max_lag=0, with_provenance=False)
    row = table[table["group"] == "all"].iloc[0]
    return {"relative_bias": float(row["relative_bias"]), "one_minus_cosine": 1.0 - float(row["cosine_mean"])}


class GradientBias:
    """track_ relative bias and 1 − cosine of the method's gradient, per (task, method family)."""

    params = grid.grid()
    param_names = grid.PARAM_NAMES

    def setup(self, task: str, method: str) -> None:
        self.figures = bias_figures(task, method)
        if not all(math.isfinite(v) for v in self.figures.values()):
            raise ValueError(f"non-finite bias figures for {task}/{method}: {self.figures}")

    def track_relative_bias(self, task: str, method: str) -> float:
        """Noise-corrected ‖E(ĝ − g)‖ / ‖E g‖ over the batches."""
        return self.figures["relative_bias"]

    track_relative_bias.unit = "relative bias"  # type: ignore[attr-defined]

    def track_one_minus_cosine(self, task: str, method: str) -> float:
        """1 − mean over batches of cos(ĝ, g)."""
        return self.figures["one_minus_cosine"]

    track_one_minus_cosine.unit = "1 - cosine"  # type: ignore[attr-defined]
