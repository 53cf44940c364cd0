"""Bias measurement: statistics against direct formulas, the debiased headline, built-in tasks, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from tbptt_bench.analysis.bias import analyse_bias, bias_batches, group_metrics, measure_bias
from tbptt_bench.methods.base import grid
from tbptt_bench.methods.base import split_specs
from tbptt_bench.errors import UsageError
from tbptt_bench.core.build import make_model, make_task

DOCUMENTED_COLUMNS = [
    "family", "spec", "series", "k", "label", "group", "relative_error_mean", "relative_error_se", "cosine_mean",
    "cosine_se", "norm_ratio_mean", "norm_ratio_se", "relative_bias", "relative_bias_lo", "relative_bias_hi",
    "bias_p_value", "relative_bias_plugin", "bias_norm", "bias_norm_lo", "bias_norm_hi", "true_mean_norm",
    "variance_trace", "variance_trace_true", "variance_trace_error", "snr", "extrapolation", "n_batches", "n_params", "task", "seq_len", "batch_size", "seed", "dtype", "true_method",
]


def test_group_metrics_match_direct_formulas() -> None:
    rng = np.random.default_rng(0)
    true = rng.normal(size=(6, 9)) + 2.0
    est = true + rng.normal(scale=0.3, size=(6, 9)) + 0.2
    m = group_metrics(est, true, n_flips=200, level=0.9, seed=0)
    rel = [np.linalg.norm(e - t) / np.linalg.norm(t) for e, t in zip(est, true)]
    cos = [e @ t / (np.linalg.norm(e) * np.linalg.norm(t)) for e, t in zip(est, true)]
    assert m["relative_error_mean"] == pytest.approx(np.mean(rel), rel=1e-12)
    assert m["relative_error_se"] == pytest.approx(np.std(rel, ddof=1) / math.sqrt(6), rel=1e-12)
    assert m["cosine_mean"] == pytest.approx(np.mean(cos), rel=1e-12)
    diff = est - true
    assert m["relative_bias_plugin"] == pytest.approx(np.linalg.norm(diff.mean(0)) / np.linalg.norm(true.mean(0)),
                                                      rel=1e-12)
    assert m["relative_bias_lo"] <= m["relative_bias"] <= m["relative_bias_hi"]
    assert m["variance_trace"] == pytest.approx(np.trace(np.cov(est.T)), rel=1e-12)
    assert m["variance_trace_error"] == pytest.approx(np.trace(np.cov(diff.T)), rel=1e-12)
    assert m["snr"] == pytest.approx(np.linalg.norm(est.mean(0)) / math.sqrt(np.trace(np.cov(est.T))), rel=1e-12)
    # the headline: unbiased ‖E D‖² and ‖E g‖² (the plug-in minus tr Cov/N), as a ratio of square roots
    num = np.linalg.norm(diff.mean(0)) ** 2 - np.trace(np.cov(diff.T)) / 6
    den = np.linalg.norm(true.mean(0)) ** 2 - np.trace(np.cov(true.T)) / 6
    assert m["relative_bias"] == pytest.approx(math.sqrt(num / den), rel=1e-10)
    assert m["bias_norm"] == pytest.approx(math.sqrt(num), rel=1e-10)
    assert 0.0 <= m["bias_p_value"] <= 1.0


def test_exact_method_has_zero_bias_and_does_not_reject() -> None:
    true = np.random.default_rng(1).normal(size=(8, 5)) + 2.0
    m = group_metrics(true.copy(), true, n_flips=99, level=0.95, seed=0)
    assert m["relative_bias"] == 0.0 and m["relative_bias_lo"] == 0.0 and m["bias_p_value"] == 1.0


def test_split_specs_and_grid_conventions() -> None:
    assert split_specs("chunked,sliding") == ["chunked", "sliding"]
    assert split_specs("chunked:k=8,tbptt:k1=4,k2=8,full") == ["chunked:k=8", "tbptt:k1=4,k2=8", "full"]
    with pytest.raises(UsageError):
        split_specs("k=3,chunked")
    # a piece whose value holds a colon still belongs to the spec before it
    assert split_specs("stepped:k=4,then=8@100:16@300,full") == ["stepped:k=4,then=8@100:16@300", "full"]
    for text in ("chunked,,full", "chunked,", ""):  # empty items: an error, not silently skipped
        with pytest.raises(UsageError, match="empty method spec"):
            split_specs(text)
    specs = [m.spec for m in grid(["chunked", "tbptt", "sliding", "full", "chunked:k=2"], [1, 2])]
    assert specs == ["chunked:k=1", "chunked:k=2", "tbptt:k1=1,k2=1", "tbptt:k1=2,k2=3", "sliding:k=1",
                     "sliding:k=2", "full"]
    with pytest.raises(UsageError, match="K grid"):
        grid(["chunked"], [])


@pytest.mark.parametrize("name", ["copy", "adding", "char-lm"])
def test_bias_vanishes_as_k_reaches_t_on_builtin_tasks(name: str) -> None:
    task = make_task(name)
    T = {"copy": 24, "adding": 12, "char-lm": 16}[name]
    model = make_model("lstm", task, 4, seed=1, dtype="float64")
    ks = [1, 2, T // 2, T]
    table = measure_bias(task, model, grid(["chunked", "tbptt"], ks), seq_len=T, batch_size=2, n_batches=2,
                         seed=0, n_flips=0, max_lag=0)
    rows = table[table.group == "all"].set_index("spec")
    for fam in ("chunked", "tbptt"):
        series = rows[rows.family == fam].sort_values("k")["relative_bias"].to_numpy()
        assert series[-1] < 1e-12 <= series[0]  # exact at K = T, biased at K = 1
        assert series[-2] < series[0]


def test_fast_routes_equal_the_engine() -> None:
    task = make_task("copy")
    model = make_model("gru", task, 5, seed=2, dtype="float64")
    methods = grid(["chunked", "sliding", "tbptt", "full"], [1, 2, 4])
    kwargs = dict(seq_len=22, batch_size=2, n_batches=2, seed=4, n_flips=0, max_lag=0)
    fast = analyse_bias(task, model, methods, **kwargs).table.set_index(["spec", "group"])
    slow = analyse_bias(task, model, methods, fast=False, **kwargs).table.set_index(["spec", "group"])
    for col in ("relative_error_mean", "cosine_mean", "relative_bias", "variance_trace"):
        np.testing.assert_allclose(fast[col], slow.loc[fast.index, col], rtol=1e-9, atol=1e-13)


def test_checkpointed_truth_gives_the_same_table() -> None:
    task = make_task("copy")
    model = make_model("lstm", task, 4, seed=3, dtype="float64")
    kw = dict(seq_len=22, batch_size=2, n_batches=2, seed=1, n_flips=0, max_lag=0)
    exact = measure_bias(task, model, ["chunked:k=2", "tbptt:k1=2,k2=5"], **kw).set_index(["spec", "group"])
    ckpt = measure_bias(task, model, ["chunked:k=2", "tbptt:k1=2,k2=5"], true_checkpoint=4, **kw)
    ckpt = ckpt.set_index(["spec", "group"])
    assert (ckpt["true_method"] == "full:checkpoint=4").all()
    for col in ("relative_error_mean", "cosine_mean", "relative_bias", "variance_trace_true"):
        np.testing.assert_allclose(ckpt[col], exact.loc[ckpt.index, col], rtol=1e-10, atol=1e-14)


def test_table_has_documented_columns_groups_and_lag_table() -> None:
    task = make_task("adding")
    model = make_model("lstm", task, 4, seed=0)
    rep = analyse_bias(task, model, ["chunked:k=2", "sliding:k=3"], seq_len=10, batch_size=2, n_batches=2, seed=0,
                       n_flips=50, max_lag=5)
    assert set(DOCUMENTED_COLUMNS) <= set(rep.table.columns)
    assert set(rep.table.group) == {"all", "input", "recurrent", "bias", "readout"}
    assert list(rep.lags["lag"]) == [1, 2, 3, 4, 5]
    assert rep.table["extrapolation"].notna().all()
    assert rep.table["git_commit"].iloc[0]


def test_probe_mode_agrees_with_the_exact_measurement() -> None:
    """No true gradient formed: forward-mode probes; exact values lie within 3 stated standard errors."""
    task = make_task("copy")
    model = make_model("lstm", task, 8, seed=0, dtype="float64")
    kw = dict(seq_len=24, batch_size=4, n_batches=4, seed=0, n_flips=0, max_lag=0)
    exact = measure_bias(task, model, ["chunked:k=2", "chunked:k=8"], **kw)
    exact = exact[exact.group == "all"].set_index("spec")
    probed = measure_bias(task, model, ["chunked:k=2", "chunked:k=8"], probes=64, **kw).set_index("spec")
    assert set(probed.group) == {"all"} and (probed.true_method == "probes:64").all()
    for spec in probed.index:
        se = (probed.loc[spec, "relative_bias_hi"] - probed.loc[spec, "relative_bias_lo"]) / (2 * 1.959964)
        assert abs(probed.loc[spec, "relative_bias"] - exact.loc[spec, "relative_bias"]) < 3 * se
        for col in ("relative_error", "cosine"):
            diff = abs(probed.loc[spec, f"{col}_mean"] - exact.loc[spec, f"{col}_mean"])
            assert diff < 3 * probed.loc[spec, f"{col}_se"], (spec, col)


def test_streaming_batches_start_from_the_warm_state() -> None:
    task = make_task("char-lm")
    model = make_model("rnn", task, 4, seed=0, dtype="float64")
    batches = bias_batches(task, model, seq_len=8, batch_size=2, n_batches=3, seed=0, warmup=5)
    stream = task.stream(2, "valid")
    positions = [5 + ((stream.length - 13) * n) // 2 for n in range(3)]
    for (batch, state), p in zip(batches, positions):
        assert torch.equal(batch.inputs, stream.slice(p, p + 8).inputs)
        with torch.no_grad():
            _, want = model(stream.slice(p - 5, p).inputs, model.initial_state(2))
        torch.testing.assert_close(state, want, rtol=0, atol=1e-12)
    cold = bias_batches(task, model, seq_len=8, batch_size=2, n_batches=1, seed=0, warmup=0)
    assert cold[0][1] is None


class ListState(nn.Module):
    """A model whose state is a list: not the documented protocol."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))

    def initial_state(self, batch_size: int):
        return [torch.zeros(1, batch_size, 1)]

    def forward(self, inputs, state):
        return inputs.float()[..., None] * self.w, state


@pytest.mark.parametrize("kwargs, message", [
    ({"methods": ["chunked:k=2"], "n_batches": 0}, "batches must be ≥ 1"),
    ({"methods": ["chunked:k=2"], "max_lag": 30}, "maximum lag D"),
    ({"methods": []}, "no methods"),
])
def test_bad_input_is_a_usage_error(kwargs, message) -> None:  # type: ignore[no-untyped-def]
    task = make_task("copy")
    model = make_model("rnn", task, 3)
    args = {"seq_len": 24, "batch_size": 2, "n_batches": 1, "seed": 0, **kwargs}
    methods = args.pop("methods")
    with pytest.raises(UsageError, match=message):
        measure_bias(task, model, methods, **args)


def test_model_state_outside_the_protocol_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="batch in dimension 1"):
        measure_bias(make_task("copy"), ListState(), ["chunked:k=2"], seq_len=24, batch_size=2, n_batches=1, seed=0)


def test_alignment_table_equals_cosines_computed_directly() -> None:
    """Every ordered pair's mean cosine over batches and its standard error, against numpy on gradients taken
    through the engine batch by batch (the measurement itself takes the fast routes)."""
    from tbptt_bench.analysis.bias import TRUE_SPEC
    from tbptt_bench.analysis.gradients import flatten, method_gradient, true_gradient

    task = make_task("adding")
    model = make_model("rnn", task, 4, seed=5, dtype="float64")
    specs = ["chunked:k=2", "sliding:k=3", "tbptt:k1=2,k2=4"]
    rep = analyse_bias(task, model, specs, seq_len=12, batch_size=2, n_batches=4, seed=3, n_flips=0, max_lag=0)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    vecs: dict[str, list[np.ndarray]] = {s: [] for s in [*specs, TRUE_SPEC]}
    for batch, state in bias_batches(task, model, seq_len=12, batch_size=2, n_batches=4, seed=3):
        for s in specs:
            vecs[s].append(flatten(method_gradient(model, batch, s, task.loss_kind, state), names).numpy())
        vecs[TRUE_SPEC].append(flatten(true_gradient(model, batch, task.loss_kind, state), names).numpy())
    table = rep.alignment.set_index(["spec", "other"])
    assert len(table) == 16 and (rep.alignment["group"] == "all").all()
    assert (rep.alignment["task"] == "adding").all()
    for a, b in [(a, b) for a in vecs for b in vecs]:
        cos = [x @ y / (np.linalg.norm(x) * np.linalg.norm(y)) for x, y in zip(vecs[a], vecs[b])]
        assert table.loc[(a, b), "cosine_mean"] == pytest.approx(np.mean(cos), rel=1e-10, abs=1e-13)
        assert table.loc[(a, b), "cosine_se"] == pytest.approx(np.std(cos, ddof=1) / 2, rel=1e-8, abs=1e-13)
        assert table.loc[(a, b), "n_finite"] == 4


def test_alignment_table_leaves_out_zero_estimates_and_names_full_not_true() -> None:
    from tbptt_bench.analysis.bias import alignment_table

    a = np.array([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    b = np.array([[1.0, 1.0], [2.0, 0.0], [1.0, -1.0]])
    t = alignment_table({"a": a, "b": b}, {"a": "A"}).set_index(["spec", "other"])
    assert t.loc[("a", "b"), "cosine_mean"] == pytest.approx((math.sqrt(0.5) + 0.0) / 2)
    assert t.loc[("a", "b"), "n_finite"] == 2 and t.loc[("b", "b"), "n_finite"] == 3
    assert t.loc[("a", "a"), "label"] == "A" and t.loc[("a", "b"), "other_label"] == "b"
    task = make_task("adding")
    model = make_model("rnn", task, 3, seed=0, dtype="float64")
    rep = analyse_bias(task, model, ["full", "chunked:k=2"], seq_len=6, batch_size=1, n_batches=2, seed=0,
                       n_flips=0, max_lag=0)
    assert set(rep.alignment["spec"]) == {"full", "chunked:k=2"}
    full = rep.alignment.set_index(["spec", "other"]).loc[("full", "full")]
    assert full["cosine_mean"] == pytest.approx(1.0, abs=1e-12)
