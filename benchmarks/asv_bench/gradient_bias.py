"""Gradient bias of each method family, as ``tbptt-bench bias`` measures it: track_ figures that cannot move by chance.

Each cell is one call of :func:`tbptt_bench.analysis.bias.measure_bias` for the cell's representative spec, in
float64 at the cell's fixed seeds and θ (no optimiser step) over :data:`N_BATCHES` batches, with
``expectation="exact"`` — what ``tbptt-bench bias --task T --model lstm --method SPEC --seq-len … --batch …
--hidden … --seed 0 --batches 64 --dtype float64 --expectation exact`` reports for the same cell. Lower is
better, as asv assumes.

* ``track_relative_bias``: ``exact_relative_bias`` = ‖Σ_n (E ĝ_n − g_n)‖ / ‖Σ_n g_n‖ at the fixed batches, E
  over the method's own random draws computed exactly (a deterministic method's ĝ is its expectation). No
  draw enters it: a change that only reorders random draws leaves it unchanged to rounding, and a
  weakened ARTBP compensation moves it from ~1e-16 to about 1e-2 at every seed (tests/test_bias_asv.py).
* ``track_bias_detected`` (estimators without an exact expectation, e.g. UORO): 1 when the sign-flip test
  rejects E(ĝ − g) = 0 at :data:`DETECT_LEVEL`, else 0. For an unbiased estimator a change of its draws
  turns 0 into 1 with probability ≈ DETECT_LEVEL (the test's level, measured in docs/statistics.md): the
  documented false-alarm rate per cell and change.
* ``track_one_minus_cosine`` (deterministic methods only: a random method's cosine depends on its draws).
"""

from __future__ import annotations

import math

from asv_bench import grid

DTYPE = "float64"
#: Independent batches (stream positions for streaming tasks) of every cell.
N_BATCHES = 64
#: Level of the test behind ``track_bias_detected``: its false-alarm rate for an unbiased estimator.
DETECT_LEVEL = 0.01
#: Random sign patterns of that test (p-values in steps of 1/(FLIPS + 1), well below DETECT_LEVEL).
FLIPS = 1999


def bias_figures(task: str, method: str, seed: int = grid.SEED) -> dict[str, float]:
    """The cell's draw-free ``relative_bias``, ``bias_detected`` and ``one_minus_cosine`` (NaN where not defined).

    All over all parameters (group ``all``) of the bias table, measured at ``seed`` (the cell's seed unless a
    test asks for another). Raises NotImplementedError (asv: skipped) for a tbptt-bench version without the
    bias module, since asv also benchmarks older commits.
    """
    try:
        from tbptt_bench.analysis.bias import measure_bias
        from tbptt_bench.methods.base import parse_method
    except ModuleNotFoundError as exc:
        if exc.name != "tbptt_bench.analysis.bias":
            raise
        raise NotImplementedError("this version of tbptt-bench has no tbptt_bench.analysis.bias") from None
    seq_len, batch_size, _ = grid.tiny_size(task)
    task_obj, model = grid.task_and_model(task, dtype=DTYPE)
    spec = grid.representative_spec(method, seq_len)
    m = parse_method(spec)
    exact = m.deterministic or m.expected_mask(seq_len) is not None
    table = measure_bias(task_obj, model, [spec], seq_len=seq_len, batch_size=batch_size, n_batches=N_BATCHES,
                         seed=seed, dtype=DTYPE, n_flips=0 if exact else FLIPS, ci_level=1.0 - DETECT_LEVEL,
                         max_lag=0, with_provenance=False, expectation="exact")
    row = table[table["group"] == "all"].iloc[0]
    nan = math.nan
    return {"relative_bias": float(row["exact_relative_bias"]) if exact else nan,
            "bias_detected": nan if exact else float(row["bias_p_value"] <= DETECT_LEVEL),
            "one_minus_cosine": 1.0 - float(row["cosine_mean"]) if m.deterministic else nan}


class _BiasFigure:
    """One bias figure per cell; a cell where the figure is not defined is skipped in ``setup`` (asv's way to skip
    a parameter combination: NotImplementedError there, not in the benchmark itself)."""

    params = grid.grid()
    param_names = grid.PARAM_NAMES
    figure = ""

    def setup(self, task: str, method: str) -> None:
        self.value = bias_figures(task, method)[self.figure]
        if math.isinf(self.value):
            raise ValueError(f"infinite {self.figure} for {task}/{method}")
        if math.isnan(self.value):
            raise NotImplementedError(f"{self.figure} is not tracked for this method (see the module doc)")


class GradientBias(_BiasFigure):
    """track_ the draw-free relative bias: mask methods (E over a random method's draws exactly)."""

    figure = "relative_bias"

    def track_relative_bias(self, task: str, method: str) -> float:
        """‖Σ(E ĝ − g)‖ / ‖Σ g‖ over the fixed batches, E over the method's draws exactly."""
        return self.value

    track_relative_bias.unit = "relative bias"  # type: ignore[attr-defined]


class BiasDetected(_BiasFigure):
    """track_ a bias test for estimators without an exact expectation (false-alarm rate DETECT_LEVEL)."""

    figure = "bias_detected"

    def track_bias_detected(self, task: str, method: str) -> float:
        """1 if the sign-flip test rejects E(ĝ − g) = 0 at DETECT_LEVEL (no exact expectation), else 0."""
        return self.value

    track_bias_detected.unit = "rejections"  # type: ignore[attr-defined]


class GradientAlignment(_BiasFigure):
    """track_ 1 − cosine of deterministic methods."""

    figure = "one_minus_cosine"

    def track_one_minus_cosine(self, task: str, method: str) -> float:
        """1 − mean over batches of cos(ĝ, g) (deterministic methods)."""
        return self.value

    track_one_minus_cosine.unit = "1 - cosine"  # type: ignore[attr-defined]
