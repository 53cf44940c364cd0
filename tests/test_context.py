"""Effective context over training: the cell's numbers against per-K engine runs, the store tables, the report
section and the suite's validation of bad values (docs/bias.md, "Long horizons"; docs/suites.md)."""

from __future__ import annotations

import copy
import math
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tbptt_bench.analysis.context import dyadic_grid
from tbptt_bench.analysis.expectation import expectation_bias
from tbptt_bench.analysis.gradients import flatten, method_gradient, true_gradient
from tbptt_bench.analysis.long_lags import lag_grid, long_lag_profile
from tbptt_bench.core.build import make_task
from tbptt_bench.errors import UsageError
from tbptt_bench.seeding import derive_seed
from tbptt_bench.report.load import load_tables
from tbptt_bench.report.report import build_report
from tbptt_bench.suites.jobs import run_cell
from tbptt_bench.suites.store import ResultStore, read_results, read_tables
from tbptt_bench.suites.suite import parse_suite
from tbptt_bench.training.context import ContextConfig, train_context
from tbptt_bench.training.loop import train

#: Tiny float64 sizes: T = 64 with kmax 32 exercises both routes of the streamed curve (K ≤ span = 16 by
#: the ladder, K = 32 by checkpointed chunks).
TINY = dict(task="char-lm", model="lstm", hidden_size=4, batch_size=2, method="chunked:k=4", seq_len=8, steps=2,
            eval_every=2, eval_batches=1, lr=0.05, dtype="float64", curve_seq_len=64, kmax=32, n_batches=4,
            curve_warmup=8, seed=3)

SUITE = """
[suite]
name = "ctx"

[defaults]
hidden_size = 4
batch_size = 2
seq_len = 8
dtype = "float64"

[[context]]
task = "char-lm"
model = "lstm"
method = "chunked:k=4"
steps = 2
eval_every = 2
eval_batches = 1
lr = 0.05
curve_seq_len = 32
kmax = 16
n_batches = 4
curve_warmup = 4
max_lag = 8
lag_positions = 2

[[train]]
task = "char-lm"
model = "lstm"
method = "chunked:k=4"
steps = 2
eval_every = 2
eval_batches = 1
"""


def _independent(model: torch.nn.Module, cfg: ContextConfig) -> dict[int, tuple[float, float, float]]:
    """Per K: (relative bias, its interval's upper end, mean per-batch relative error) from one engine run per
    K and per segment, the segments and warm-up states rebuilt by hand."""
    task = make_task("char-lm")
    stream = task.stream(cfg.batch_size, cfg.curve_split)
    T, N = cfg.curve_seq_len, cfg.n_batches
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    truths, ests = [], {k: [] for k in dyadic_grid(cfg.kmax)}
    for n in range(N):
        start = stream.length - (N - n) * T
        state = model.initial_state(cfg.batch_size)
        with torch.no_grad():
            _, state = model(stream.slice(start - cfg.curve_warmup, start).inputs, state)
        segment = stream.slice(start, start + T)
        truths.append(flatten(true_gradient(model, segment, task.loss_kind, state), names).numpy())
        for k in ests:
            ests[k].append(flatten(method_gradient(model, segment, f"chunked:k={k}", task.loss_kind, state),
                                   names).numpy())
    g = np.stack(truths)
    out = {}
    for k, rows in ests.items():
        d = np.stack(rows) - g
        u_d = (d.sum(0) @ d.sum(0) - (d * d).sum()) / (N * (N - 1))
        u_g = (g.sum(0) @ g.sum(0) - (g * g).sum()) / (N * (N - 1))
        hi = expectation_bias(d, g, n_flips=0, seed=derive_seed("context", cfg.seed, k)).relative_bias_hi  # the interval's bootstrap draws
        error = float(np.mean(np.linalg.norm(d, axis=1) / np.linalg.norm(g, axis=1)))
        out[k] = (math.sqrt(max(u_d, 0.0) / u_g), hi, error)
    return out


def _models_at_checkpoints(cfg: ContextConfig) -> dict[int, torch.nn.Module]:
    """θ at each evaluation of the same (deterministic) training run."""
    models: dict[int, torch.nn.Module] = {}

    def keep(update: int, model: torch.nn.Module) -> dict[str, float]:
        models[update] = copy.deepcopy(model)
        return {}

    train(cfg, on_eval=keep)
    return models


def _smallest(values: dict[int, float], level: float) -> int | None:
    return next((k for k in sorted(values) if values[k] <= level), None)


def test_effective_context_matches_per_k_engine_runs() -> None:
    cfg = ContextConfig(**TINY, levels=[0.05, 0.2])
    models = _models_at_checkpoints(cfg)
    result = train_context(cfg)
    assert sorted(models) == [0, 2] and sorted({r["n_updates"] for r in result.curve}) == [0, 2]
    for update, model in models.items():
        expected = _independent(model, cfg)
        rows = {r["k"]: r for r in result.curve if r["n_updates"] == update}
        assert sorted(rows) == [1, 2, 4, 8, 16, 32]
        for k, (bias, hi, error) in expected.items():
            assert rows[k]["relative_bias"] == pytest.approx(bias, rel=1e-8, abs=1e-12)
            assert rows[k]["relative_bias_hi"] == pytest.approx(hi, rel=1e-8, abs=1e-12)
            assert rows[k]["relative_error_mean"] == pytest.approx(error, rel=1e-8)
        for level_row in (r for r in result.levels if r["n_updates"] == update):
            level = level_row["level"]
            assert level_row["k_effective"] == _smallest({k: v[1] for k, v in expected.items()}, level)
            assert level_row["k_effective_point"] == _smallest({k: v[0] for k, v in expected.items()}, level)
            assert level_row["k_effective_error"] == _smallest({k: v[2] for k, v in expected.items()}, level)
    assert any(r["k_effective"] is not None for r in result.levels)  # the levels test something
    assert all(r["tokens"] == r["n_updates"] * 4 * 2 for r in result.curve)


def test_lag_profile_rows_are_the_pooled_profiles_of_the_held_out_segments() -> None:
    cfg = ContextConfig(**{**TINY, "curve_seq_len": 40}, max_lag=12, lag_positions=3)
    models = _models_at_checkpoints(cfg)
    result = train_context(cfg)
    task = make_task("char-lm")
    stream = task.stream(cfg.batch_size, cfg.curve_split)
    T, N = cfg.curve_seq_len, cfg.n_batches
    for update, model in models.items():
        per_position = []
        for n in range(N):  # segments and warm-up states rebuilt by hand
            start = stream.length - (N - n) * T
            with torch.no_grad():
                _, state = model(stream.slice(start - cfg.curve_warmup, start).inputs, model.initial_state(2))
            prof = long_lag_profile(model, stream.slice(start, start + T), task.loss_kind, 12, n_positions=3,
                                    state=state)
            per_position.append(np.nanmean(prof.phi, axis=1))
        per = np.concatenate(per_position)
        rows = [r for r in result.lags if r["n_updates"] == update]
        assert [r["lag"] for r in rows] == lag_grid(12)
        np.testing.assert_allclose([r["phi_mean"] for r in rows], per.mean(0), rtol=1e-10)
        np.testing.assert_allclose([r["phi_se"] for r in rows], per.std(0, ddof=1) / math.sqrt(len(per)), rtol=1e-8)
        assert all(r["n_positions"] == N * 3 for r in rows)
    assert {r["n_updates"] for r in result.lags} == {0, 2}


def test_context_tables_round_trip_through_the_store(tmp_path: Path) -> None:
    suite = parse_suite(tomllib.loads(SUITE), source="ctx.toml")
    cell = next(c for c in suite.cells if c.measure == "context")
    result = run_cell(cell)
    assert result.status == "ok", result.error
    with ResultStore(tmp_path) as store:
        store.commit(cell.key, result.tables)
        store.compact()
    curve = read_results(tmp_path, "context")
    levels = read_results(tmp_path, "effective_context")
    assert len(curve) == 2 * 5 and len(levels) == 2 * 2  # checkpoints 0 and 2; K = 1..16; levels 1%, 5%
    assert str(curve["k"].dtype) in ("int64", "Int64") and str(levels["k_effective"].dtype) == "Int64"
    assert curve["n_updates"].tolist() == [r["n_updates"] for r in result.tables["context"]]
    assert np.allclose(curve["relative_bias"], [r["relative_bias"] for r in result.tables["context"]])
    stored = [None if pd.isna(v) else int(v) for v in levels["k_effective_point"]]
    assert stored == [r["k_effective_point"] for r in result.tables["effective_context"]]
    assert set(curve["key"]) == set(levels["key"]) == {cell.key}
    assert "context" in read_tables(tmp_path) and (tmp_path / "context.parquet").is_file()
    lags = read_results(tmp_path, "context_lags")
    assert len(lags) == 2 * 8 and str(lags["lag"].dtype) in ("int64", "Int64")  # checkpoints 0 and 2; lags 1..8
    assert np.allclose(lags["phi_mean"], [r["phi_mean"] for r in result.tables["context_lags"]])


def test_report_section_appears_only_with_context_rows(tmp_path: Path) -> None:
    suite = parse_suite(tomllib.loads(SUITE), source="ctx.toml")
    store = tmp_path / "store"
    with ResultStore(store) as writer:
        for cell in suite.cells:
            writer.commit(cell.key, run_cell(cell).tables)
    tables = load_tables(store)
    files = build_report(tables, tmp_path / "with")
    text = files.markdown.read_text()
    assert "## Effective context over training" in text
    assert {"effective_context", "context_bias_vs_k", "context_lag_profile"} <= set(files.figures)
    assert "effective_context" in files.tables
    assert "upper end" in text and "conservative" in text  # the caption says what the interval rule is
    without = {name: frame for name, frame in tables.items() if name not in ("effective_context", "context")}
    text = build_report(without, tmp_path / "without").markdown.read_text()
    assert "Effective context" not in text


@pytest.mark.parametrize("change, expected", [
    ("kmax = 16", "kmax = 24"), ("kmax = 16", "kmax = 64"), ("n_batches = 4", "n_batches = 0"),
    ("curve_warmup = 4", "curve_warmup = -1"), ("kmax = 16", "kmax = 16\nlevels = [0.01, 1.5]"),
    ("kmax = 16", "kmax = 16\nlevels = []"), ("n_batches = 4", "n_batches = 100000"),
    ('task = "char-lm"\nmodel = "lstm"\nmethod = "chunked:k=4"\nsteps = 2', 'task = "copy"\nmodel = "lstm"\n'
     'method = "chunked:k=4"\nsteps = 2'),
    ("steps = 2", 'steps = 100000\ncurve_split = "train"'), ("max_lag = 8", "max_lag = 32"),
    ("max_lag = 8", "max_lag = -1"), ("lag_positions = 2", "lag_positions = 0"),
])
def test_bad_context_values_are_one_line_errors(change: str, expected: str) -> None:
    block = SUITE.split("[[train]]")[0]
    with pytest.raises(UsageError) as info:
        parse_suite(tomllib.loads(block.replace(change, expected, 1)), source="ctx.toml")
    message = str(info.value)
    assert "\n" not in message and "[[context]] block 1" in message
    assert any(word in message for word in ("power of two", "must be ≤", "must be ≥", "in (0, 1)", "levels = []",
                                            "steps per stream", "episodic", "not held out")), message
