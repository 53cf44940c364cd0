"""The report: every figure drawn and non-empty, valid self-contained HTML, known statistics, bad input."""

from __future__ import annotations

import base64
import io
import json
import re
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tbptt_bench.report import stats
from tbptt_bench.cli import main
from tbptt_bench.provenance import provenance
from tbptt_bench.report.common import method_axes, order_methods
from tbptt_bench.report.document import Options
from tbptt_bench.report.load import load_tables
from tbptt_bench.report.report import build_report
from tbptt_bench.report.sections.learning import time_to_target, training_bias
from tbptt_bench.suites.store import ResultStore

TASKS = {"copy": ("accuracy", 0.125, True), "adding": ("mse", 1 / 6, False), "char-lm": ("bpc", 4.77, False)}
MODELS = ("rnn", "lstm", "gru")
METHODS = ("full", "tbptt:k1=4,k2=8", "chunked:k=4", "sliding:k=4")
BIAS_METHODS = ("full", "chunked:k=2", "chunked:k=4", "chunked:k=8", "tbptt:k1=2,k2=3", "tbptt:k1=4,k2=7",
                "sliding:k=2", "sliding:k=4", "sliding:k=8")
FAST = Options(n_resamples=300, formats=("png",), dpi=40)
EXPECTED_FIGURES = {
    "bias_vs_k", "cosine_vs_k", "lag_profile", "bias_extrapolation", "cost_tokens_vs_k", "cost_ms_vs_k",
    "cost_ratio", "cost_tokens_vs_t", "cost_ms_vs_t", "memory_vs_t", "learning_curves", "bias_over_training", "final_metric",
    "time_to_target", "tradeoff_metric_cost", "tradeoff_bias_cost", "tradeoff_bias_compute",
}


# --------------------------------------------------------------------------- a quick-suite-shaped table

def _common(key: str, measure: str, replicate: int, status: str = "ok") -> dict[str, object]:
    now = pd.Timestamp("2026-01-01", tz="UTC")
    return {**provenance("cpu"), "key": key, "suite": "quick", "measure": measure, "replicate": replicate,
            "status": status, "error": "", "diverged_at": None, "started": now, "finished": now, "duration_s": 0.1,
            "executor": "local", "concurrency": 1}


def _key(*parts: object) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def quick_tables(seeds: int = 2, *, failed: int = 0, diverged: int = 0, rng_seed: int = 0,
                 tasks: tuple[str, ...] = tuple(TASKS), models: tuple[str, ...] = MODELS) -> dict[str, pd.DataFrame]:
    """Tables shaped like `tbptt-bench run quick` writes them, with synthetic measurement values."""
    rng = np.random.default_rng(rng_seed)
    results, curves, lags = [], [], []
    sizes = {"seq_len": 24, "batch_size": 4, "hidden_size": 8, "num_layers": 1, "dtype": "float32", "path": "fused",
             "task_params": "{}", "device": "cpu"}
    bad = iter(["failed"] * failed + ["diverged"] * diverged)
    for task in tasks:
        metric, baseline, higher = TASKS[task]
        for model in models:
            for r in range(seeds):
                seed = 1000 * r + len(task) + len(model)
                for mi, method in enumerate(METHODS):
                    key = _key("train", task, model, method, r)
                    params = {**sizes, "task": task, "model": model, "method": method, "steps": 24, "lr": 0.01,
                              "optimizer": "adam", "clip": 1.0, "eval_every": 8, "eval_batches": 2, "seed": seed}
                    status = next(bad, "ok")
                    if status != "ok":
                        row = {**params, **_common(key, "train", r, status)}
                        row["error"] = "RuntimeError: boom" if status == "failed" else "loss became non-finite"
                        row["diverged_at"] = 16 if status == "diverged" else None
                        results.append(row)
                        continue
                    start = baseline * (0.7 if higher else 1.3)
                    gain = (0.5 - 0.1 * mi) * baseline
                    run = []
                    for u in (0, 8, 16, 24):
                        value = start + (1 if higher else -1) * gain * u / 24 + rng.normal(0, 0.02 * baseline)
                        run.append({"update": u, "train_loss": None if u == 0 else value,
                                    "wall_time": 0.002 * u * (1 + mi),
                                    "tokens": 96 * u, "eval_loss": value, "eval_metric": value, "metric_name": metric,
                                    "baseline": baseline, "relative_bias": 0.0 if method == "full" else 0.3 / (1 + u),
                                    "bias_method": method,
                                    "chunked:k=4/relative_bias": 0.2 / (1 + u) if method == "full" else None})
                    curves += [{**c, **params, **_common(key, "train", r)} for c in run]
                    results.append({**run[-1], **params, **_common(key, "train", r)})
        for method in BIAS_METHODS:
            for r in range(seeds):
                key = _key("bias", task, method, r)
                k = method_axes(method)[1]
                rel = 0.0 if method == "full" else 0.8 * 0.6 ** k * (1 + rng.normal(0, 0.05))
                for group in ("all", "recurrent"):
                    results.append({
                        **sizes, "task": task, "model": "lstm", "methods": json.dumps(list(BIAS_METHODS)),
                        "seed": 7 + r, "n_batches": 8, **_common(key, "bias", r), "family": method.split(":")[0],
                        "spec": method, "k": k, "group": group, "relative_bias": rel, "relative_bias_lo": rel * 0.8,
                        "relative_bias_hi": rel * 1.2, "cosine_mean": 1 - rel / 2, "cosine_se": 0.01,
                        "relative_error_mean": rel * 1.5, "extrapolation": 0.0 if method == "full" else 2 * rel + 0.01})
            if method == "full":
                for r in range(seeds):
                    for d in range(1, 13):
                        lags.append({**sizes, "task": task, "model": "lstm", "seed": 7 + r, "lag": d,
                                     "mean": 0.7 ** d, "q10": 0.5 * 0.7 ** d, "q50": 0.7 ** d, "q90": 1.5 * 0.7 ** d,
                                     "fitted": 0.7 ** d, "rate": 0.7,
                                     **_common(_key("bias", task, "full", r), "bias", r)})
    perf_sizes = [(task, model, t_len, 8, 4) for task in tasks for model in models for t_len in (24, 48)]
    perf_sizes += [("copy", "lstm", 128, 128, 32)]  # the realistic-size block
    for n, (task, model, t_len, hidden, batch) in enumerate(perf_sizes):
        for method in METHODS:
            key = _key("perf", task, model, method, t_len, hidden)
            updates = 1 if method == "full" else t_len // 4
            # tiny models: a fixed 0.5 ms per update dominates; at scale the arithmetic does
            seconds = (1e-5 * t_len * hidden * batch / 32 + 5e-4 * updates) * (1.5 if method.startswith("sliding") else 1)
            tokens = batch * t_len
            results.append({**sizes, "seq_len": t_len, "hidden_size": hidden, "batch_size": batch, "task": task,
                            "model": model, "method": method, "threads": 1, "warmup": 1, "repeats": 3, "seed": 3,
                            **_common(key, "perf", 0), "tokens_per_s": tokens / seconds,
                            "tokens_per_s_p10": 0.9 * tokens / seconds, "tokens_per_s_p90": 1.1 * tokens / seconds,
                            "ms_per_update": 1000 * seconds / updates, "ms_per_update_p10": 900 * seconds / updates,
                            "ms_per_update_p90": 1100 * seconds / updates, "busy": n % 3 == 1,
                            "mem_delta_bytes": 2**10 * hidden * batch * (t_len if method == "full" else 4)})
    return {"results": pd.DataFrame(results), "curves": pd.DataFrame(curves), "lags": pd.DataFrame(lags)}


def write_store(tables: dict[str, pd.DataFrame], root: Path) -> Path:
    """Commit the tables into a real result store, one cell per key."""
    with ResultStore(root) as store:
        for key, rows in tables["results"].groupby("key"):
            rows = rows.rename(columns={"update": "n_updates"})
            measure = str(rows["measure"].iloc[0])
            cell = {"cells": rows.iloc[:1].to_dict("records"), measure: rows.to_dict("records")}
            for name in ("curves", "lags"):
                frame = tables.get(name, pd.DataFrame()).rename(columns={"update": "n_updates"})
                if len(frame):
                    cell[name] = frame[frame["key"] == key].to_dict("records")
            store.commit(str(key), cell)
        store.compact()
    return root


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    out = tmp_path_factory.mktemp("report")
    tables = quick_tables(failed=1, diverged=1, tasks=("copy", "char-lm"), models=("lstm", "gru"))
    files = build_report(tables, out, Options(n_resamples=300, formats=("png", "pdf"), dpi=40))
    return out, files.figures


# --------------------------------------------------------------------------- figures and files

def test_every_figure_is_drawn_and_not_blank(report: tuple[Path, list[str]]) -> None:
    out, names = report
    assert set(names) == EXPECTED_FIGURES
    for name in names:
        png = out / "figures" / f"{name}.png"
        pdf = out / "figures" / f"{name}.pdf"
        assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 2000
        with Image.open(png) as image:
            pixels = np.asarray(image.convert("L"), dtype=float)
        assert pixels.shape[0] > 100 and pixels.shape[1] > 100
        # a drawn figure has dark ink (text, lines) on a light page, not one flat colour
        assert (pixels < 100).mean() > 0.002, name
        assert (pixels > 200).mean() > 0.5, name


def test_markdown_links_resolve_and_tables_are_written(report: tuple[Path, list[str]]) -> None:
    out, names = report
    md = (out / "report.md").read_text()
    links = re.findall(r"\]\(((?:figures|tables)/[^)]+)\)", md)
    assert links and all((out / link).is_file() for link in links)
    for name in names:
        assert f"figures/{name}.png" in md
    for table in ("provenance", "cells", "failed_cells", "bias", "cost", "final_metric", "time_to_target",
                  "statistics"):
        assert (out / "tables" / f"{table}.csv").is_file(), table
    for heading in ("Provenance", "Gradient bias", "Cost", "Learning", "Trade-off", "Statistics"):
        assert f"## {heading}" in md


class _Checker(HTMLParser):
    VOID = {"meta", "img", "br", "hr", "link", "input", "col", "source"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.tags: Counter[str] = Counter()
        self.ids: list[str] = []
        self.urls: list[str] = []
        self.images: list[str] = []
        self.doctype = ""
        self.text: list[str] = []

    def handle_decl(self, decl: str) -> None:
        self.doctype = decl

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags[tag] += 1
        a = dict(attrs)
        if "id" in a:
            self.ids.append(str(a["id"]))
        for name in ("src", "href"):
            if a.get(name) is not None:
                self.urls.append(str(a[name]))
        if tag == "img":
            self.images.append(str(a.get("src")))
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        if tag not in self.VOID:
            self.stack.pop()

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1] if self.stack else 'nothing'}")
            return
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def test_html_is_valid_self_contained_and_names_every_figure(report: tuple[Path, list[str]]) -> None:
    out, names = report
    checker = _Checker()
    checker.feed((out / "report.html").read_text(encoding="utf-8"))
    checker.close()
    assert checker.doctype.lower() == "doctype html"
    assert not checker.errors and not checker.stack
    for tag in ("html", "head", "body", "title", "h1"):
        assert checker.tags[tag] == 1, tag
    assert len(checker.ids) == len(set(checker.ids))
    assert not [u for u in checker.urls if re.match(r"^(https?:)?//", u, re.I)]
    assert all(u.startswith("#") or u.startswith("data:image/png;base64,") for u in checker.urls)
    assert checker.tags["img"] == checker.tags["figure"] == len(names)
    for src in checker.images:
        png = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        Image.open(io.BytesIO(png)).verify()
    text = " ".join(checker.text)
    for name in names:
        assert f"fig-{name}" in checker.ids and f"({name})" in text
    assert {"provenance", "bias", "cost", "learning", "tradeoff", "statistics"} <= set(checker.ids)


def test_failed_and_diverged_cells_are_listed(report: tuple[Path, list[str]]) -> None:
    out, _ = report
    failed = pd.read_csv(out / "tables" / "failed_cells.csv")
    assert sorted(failed["status"]) == ["diverged", "failed"]
    assert "RuntimeError: boom" in set(failed["error"])
    assert "did not finish" in (out / "report.md").read_text()


# --------------------------------------------------------------------------- statistics in the report

def _two_method_table(seeds: int, shift: float) -> dict[str, pd.DataFrame]:
    tables = quick_tables(seeds=seeds, rng_seed=1)
    res = tables["results"]
    keep = (res["measure"] == "train") & (res["task"] == "adding") & (res["model"] == "lstm") \
        & res["method"].isin(["full", "chunked:k=4"])
    res = res[keep].copy()
    noise = np.random.default_rng(5).normal(0, 0.01, size=seeds)
    for i, r in enumerate(sorted(res["replicate"].unique())):
        base = 0.2 + 0.05 * np.sin(i)
        res.loc[(res["replicate"] == r) & (res["method"] == "full"), "eval_metric"] = base
        res.loc[(res["replicate"] == r) & (res["method"] == "chunked:k=4"), "eval_metric"] = base + shift + noise[i]
    curves = tables["curves"][tables["curves"]["key"].isin(res["key"])].copy()
    last = curves["update"] == curves.groupby("key")["update"].transform("max")
    curves.loc[last, "eval_metric"] = curves.loc[last, "key"].map(res.set_index("key")["eval_metric"])
    return {"results": res, "curves": curves}


def test_report_statistics_known_difference_and_known_null(tmp_path: Path) -> None:
    out = build_report(_two_method_table(10, 0.05), tmp_path / "a", FAST).out
    table = pd.read_csv(out / "tables" / "statistics.csv")
    row = table[(table["treatment"] == "chunked:k=4") & (table["reference"] == "full")].iloc[0]
    assert row["n"] == 10 and row["p"] == pytest.approx(2 / 2**10)
    assert row["p_holm"] == pytest.approx(stats.holm(table["p"])[row.name])
    assert row["significant"] and row["diff_low"] <= 0.05 <= row["diff_high"]
    assert row["better on average"] == "full"  # a larger MSE is worse
    assert pd.isna(row["warning"]) or row["warning"] == ""

    out = build_report(_two_method_table(10, 0.0), tmp_path / "b", FAST).out
    null = pd.read_csv(out / "tables" / "statistics.csv")
    assert not null["significant"].any() and (null["p"] > 0.05).all()


def test_report_warns_when_seeds_are_too_few(tmp_path: Path) -> None:
    out = build_report(_two_method_table(4, 0.05), tmp_path, FAST).out
    table = pd.read_csv(out / "tables" / "statistics.csv")
    assert table["warning"].str.contains("cannot detect").all() and not table["significant"].any()
    assert "cannot detect any difference" in (out / "report.md").read_text()


def test_declared_comparisons_replace_the_default_family(tmp_path: Path) -> None:
    opts = Options(n_resamples=200, formats=("png",), dpi=40, comparisons=(("full", "chunked:k=4"),))
    out = build_report(_two_method_table(6, 0.05), tmp_path, opts).out
    table = pd.read_csv(out / "tables" / "statistics.csv")
    assert list(zip(table["treatment"], table["reference"])) == [("full", "chunked:k=4")]
    assert (table["mean_diff"] < 0).all()


# --------------------------------------------------------------------------- missing measurement kinds

def test_a_table_with_only_perf_rows_still_reports(tmp_path: Path) -> None:
    tables = quick_tables()
    res = tables["results"]
    only = {"results": res[res["measure"] == "perf"]}
    files = build_report(only, tmp_path, FAST)
    md = files.markdown.read_text()
    assert "No train measurements" in md and "No bias measurements" in md
    assert {"cost_tokens_vs_k", "memory_vs_t"} <= set(files.figures)
    assert files.html.is_file()


def test_cpu_and_gpu_rows_fall_in_separate_panels(tmp_path: Path) -> None:
    perf = quick_tables(tasks=("copy",), models=("lstm",))["results"].query("measure == 'perf'")
    gpu = perf.assign(device="cuda:0", gpu_model="NVIDIA H100", key=perf["key"].str[::-1],
                      tokens_per_s=perf["tokens_per_s"] * 20)
    files = build_report({"results": pd.concat([perf, gpu], ignore_index=True)}, tmp_path, FAST)
    cost = pd.read_csv(tmp_path / "tables" / "cost.csv")
    labels = set(cost["device_label"])
    assert len(labels) == 2 and "GPU NVIDIA H100" in labels and any(lb.startswith("CPU") for lb in labels)
    assert "cost_tokens_vs_k" in files.figures


def test_time_to_target_known_answer() -> None:
    curves = pd.DataFrame({
        "key": ["a"] * 4 + ["b"] * 4, "seed": [1] * 4 + [2] * 4, "method": ["m"] * 8,
        "n_updates": [0, 8, 16, 24] * 2, "wall_time": [0.0, 1.0, 2.0, 3.0] * 2,
        # run a beats 0.5 at 8, falls back at 16, stays from 24; run b never stays
        "eval_metric": [0.1, 0.6, 0.4, 0.7, 0.1, 0.2, 0.6, 0.3],
    })
    out = time_to_target(curves, target=0.5, higher=True, unit="seed").set_index("key")
    assert out.loc["a", "at"] == 24
    assert np.isnan(out.loc["b", "at"]) and out.loc["b", "last"] == 24
    seconds = time_to_target(curves, target=0.5, higher=True, unit="seed", x="wall_time").set_index("key")
    assert seconds.loc["a", "at"] == 3.0 and seconds.loc["b", "last"] == 3.0
    lower = time_to_target(curves.assign(eval_metric=-curves["eval_metric"]), target=-0.5, higher=False, unit="seed")
    assert lower.set_index("key").loc["a", "at"] == 24


def test_training_bias_melts_further_methods() -> None:
    curves = pd.DataFrame({"key": ["a", "a"], "panel": ["p", "p"], "method": ["full", "full"], "n_updates": [0, 8],
                           "bias_method": ["full", "full"], "relative_bias": [0.0, 0.0],
                           "chunked:k=4/relative_bias": [0.5, 0.25]})
    long = training_bias(curves, "relative_bias")
    assert len(long) == 4
    chunked = long[long["measured"] == "chunked:k=4"]
    assert list(chunked["value"]) == [0.5, 0.25]
    assert set(chunked["series"]) == {"chunked:k=4 (training full)"}
    assert set(long[long["measured"] == "full"]["series"]) == {"full"}


def test_method_axes_and_order() -> None:
    assert method_axes("full")[0] == "full" and np.isnan(method_axes("full")[1])
    assert method_axes("chunked:k=8") == ("chunked", 8.0)
    assert method_axes("sliding:k=4") == ("sliding", 4.0)
    assert method_axes("tbptt:k1=4,k2=7") == ("tbptt(K,2K-1)", 4.0)
    assert method_axes("tbptt:k1=4,k2=8") == ("tbptt(K,2K)", 4.0)
    assert order_methods(["sliding:k=4", "chunked:k=8", "full", "chunked:k=2"]) == \
        ["full", "chunked:k=2", "chunked:k=8", "sliding:k=4"]


# --------------------------------------------------------------------------- the command line

def test_cli_report_from_a_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tables = quick_tables(tasks=("adding",), models=("lstm",))
    res = tables["results"]
    small = {"results": res[res["measure"] != "bias"], "curves": tables["curves"], "lags": tables["lags"].iloc[0:0]}
    root = write_store(small, tmp_path / "results" / "quick")
    rc = main(["report", str(tmp_path / "results"), "--out", str(tmp_path / "rep"), "--formats", "svg",
               "--resamples", "200", "--dpi", "40", "--test", "permutation", "--target", "adding=0.15"])
    assert rc == 0
    assert "wrote" in capsys.readouterr().out
    assert (tmp_path / "rep" / "report.html").is_file()
    assert (tmp_path / "rep" / "figures" / "learning_curves.svg").is_file()
    loaded = load_tables(root)
    assert sum(loaded[m]["key"].nunique() for m in ("train", "perf")) == small["results"]["key"].nunique()
    assert "bias" not in loaded and "update" not in loaded["curves"] and "n_updates" in loaded["curves"]
    ttt = pd.read_csv(tmp_path / "rep" / "tables" / "time_to_target.csv")
    assert (ttt["target"] == 0.15).all() and (ttt["target source"] == "given with --target").all()


def _bad(tmp_path: Path) -> dict[str, Path]:
    cases = {}
    cases["missing path"] = tmp_path / "does-not-exist"
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    cases["directory without tables"] = empty_dir
    foreign = tmp_path / "foreign.parquet"
    pd.DataFrame({"a": [1, 2], "b": ["x", "y"]}).to_parquet(foreign)
    cases["foreign table"] = foreign
    empty = tmp_path / "empty.parquet"
    pd.DataFrame({"key": pd.Series([], dtype=str), "measure": pd.Series([], dtype=str),
                  "status": pd.Series([], dtype=str)}).to_parquet(empty)
    cases["empty table"] = empty
    lacking = tmp_path / "lacking.parquet"
    quick_tables()["results"].query("measure == 'train'").drop(columns="eval_metric").to_parquet(lacking)
    cases["missing column"] = lacking
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    cases["not a table"] = text
    return cases


@pytest.mark.parametrize("case", ["missing path", "directory without tables", "foreign table", "empty table",
                                  "missing column", "not a table"])
def test_bad_input_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str) -> None:
    path = _bad(tmp_path)[case]
    rc = main(["report", str(path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("tbptt-bench: error:") and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out" / "report.html").exists()


@pytest.mark.parametrize("argv, message", [
    (["--compare", "full"], "--compare"), (["--compare", "nope:k=1 vs full"], "nope"),
    (["--target", "copy"], "--target"), (["--formats", "png,gif"], "gif"), (["--alpha", "2"], "--alpha"),
])
def test_bad_options_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    root = write_store({"results": quick_tables()["results"].query("measure == 'perf'"), "curves": pd.DataFrame(),
                        "lags": pd.DataFrame()}, tmp_path / "store")
    rc = main(["report", str(root), "--out", str(tmp_path / "out"), *argv])
    assert rc == 2 and message in capsys.readouterr().err


@pytest.mark.slow
def test_quick_suite_end_to_end(tmp_path: Path) -> None:
    """Run the real quick suite, then report it: every section present, figures non-empty."""
    assert main(["run", "quick", "--results", str(tmp_path / "results"), "--quiet"]) == 0
    files = build_report(load_tables(tmp_path / "results" / "quick"), tmp_path / "rep", FAST)
    assert {"learning_curves", "final_metric", "time_to_target", "tradeoff_metric_cost"} <= set(files.figures)
    for name in files.figures:
        assert (tmp_path / "rep" / "figures" / f"{name}.png").stat().st_size > 1000


def test_panel_titles_show_whole_task_parameters_as_integers() -> None:
    """A store column with gaps reads back as float; titles still say lag=4, not lag=4.0."""
    from tbptt_bench.report.common import _params_text

    assert _params_text('{"lag": 4.0, "length": 4000.0, "rate": 0.5}') == "lag=4 length=4000 rate=0.5"
    assert _params_text("{}") == "" and _params_text(None) == ""


def test_alignment_figure_per_task_and_none_for_older_stores(tmp_path: Path) -> None:
    """A bias suite's alignment table becomes one figure per task of 1 − cos(ĝ, g) against K (the store's mean
    cosines against full BPTT), and one table per task × model of every pair's mean cosine, in the methods'
    own order; a store without the table (written before it existed) reports without them."""
    from tbptt_bench.report.sections.alignment import alignment_matrices, misalignment
    from tbptt_bench.suites.store import read_results

    suite = tmp_path / "al.toml"
    suite.write_text('[suite]\nname = "al"\n[[bias]]\ntask = "adding"\nmodel = "rnn"\nhidden_size = 4\n'
                     'methods = ["sliding:k=3", "full", "chunked:k=2"]\nseq_len = 10\nbatch_size = 2\nn_batches = 2\n'
                     'max_lag = 0\nn_flips = 0\n')
    assert main(["run", str(suite), "--results", str(tmp_path / "res"), "--quiet", "--jobs", "1"]) == 0
    tables = load_tables(tmp_path / "res" / "al")
    matrices = alignment_matrices(tables)
    assert list(matrices) == ["adding · rnn"]
    matrix = matrices["adding · rnn"]
    assert list(matrix.index) == list(matrix.columns) == ["full", "chunked K=2", "sliding K=3"]
    stored = read_results(tmp_path / "res" / "al", "alignment").set_index(["spec", "other"])["cosine_mean"]
    assert matrix.loc["chunked K=2", "full"] == pytest.approx(stored[("chunked:k=2", "full")], rel=1e-12)
    curve = misalignment(tables).set_index("series")
    assert set(curve.index) == {"chunked", "sliding"} and curve.loc["chunked", "K"] == 2
    assert curve.loc["sliding", "mean"] == pytest.approx(1 - stored[("sliding:k=3", "full")], rel=1e-12)
    doc = build_report(tables, tmp_path / "rep", Options(formats=("png",), dpi=40))
    assert "alignment_adding" in doc.figures and "alignment_1" in doc.tables
    older = build_report({k: v for k, v in tables.items() if k != "alignment"}, tmp_path / "rep2",
                         Options(formats=("png",), dpi=40))
    assert not [f for f in older.figures if f.startswith("alignment")]
