"""A method family from a plugin file describes itself: its own K parameter (``window:len=K``) gives the
right K axis, series, order and labels in ``bias``, the result store, the report and the asv grid, with no
edit to the package (docs/design.md §2). Its numbers are checked against ``chunked:k=K``, which has the
same mask."""

from __future__ import annotations

import importlib
import json
import sys
import textwrap
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import pytest

from tbptt_bench import registry
from tbptt_bench.methods.base import grid
from tbptt_bench.cli import main
from tbptt_bench.errors import UsageError
from tbptt_bench.methods.base import METHODS, describe, order_specs, parse_method, split_specs

ROOT = Path(__file__).resolve().parent.parent
FAMILY = "window"

PLUGIN = textwrap.dedent(
    '''
    from tbptt_bench.methods.base import Method, positive_int, register_method
    from tbptt_bench.methods.truncation import segment_updates


    @register_method
    class Window(Method):
        """Windows of `len` losses, each backpropagated to the window's start (the mask of chunked:k=len)."""
        family = "window"
        summary = "windows of len losses, gradient cut at each window start"
        schema = {"len": positive_int(), "stride": positive_int(1, required=False)}
        k_param = "len"
        rank = 25

        def updates(self, length, first_update=0, rng=None):
            return segment_updates(length, self.params["len"], self.params["len"])
    '''
)

SUITE = """
[suite]
name = "plug"
seed = 3

[defaults]
seq_len = 8
batch_size = 2
hidden_size = 4

[[bias]]
task = "adding"
model = "rnn"
methods = ["window:len=2", "full", "window:len=4", "chunked:k=2", "chunked:k=4"]
dtype = "float64"
n_batches = 2
n_flips = 50
"""


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The plugin folder, loaded once; the family is unregistered afterwards so other tests see the built-ins."""
    folder = tmp_path_factory.mktemp("method_plugin")
    (folder / "window_method.py").write_text(PLUGIN)
    registry.add_plugin_dirs([folder])
    assert FAMILY in METHODS
    yield folder
    METHODS._items.pop(FAMILY, None)


def test_plugin_family_describes_itself(plugin_dir: Path) -> None:
    m = parse_method("window:len=4")
    assert (m.k_name(), m.grid_k, m.series, m.label) == ("len", 4, "window (stride=1)", "window (stride=1) K=4")
    assert [x.spec for x in grid([FAMILY, "full"], [2, 4])] == ["window:len=2,stride=1", "window:len=4,stride=1",
                                                                "full"]
    assert order_specs(["sliding:k=2", "window:len=4", "full", "chunked:k=8", "window:len=2"]) == \
        ["full", "chunked:k=8", "window:len=2", "window:len=4", "sliding:k=2"]
    assert describe("window:len=4")["fixed_k"] and not describe("hybrid:k1=4,every=2")["fixed_k"]
    assert split_specs("window:len=4,stride=2,full") == ["window:len=4,stride=2", "full"]


def test_grid_rules_of_the_built_in_families() -> None:
    specs = [m.spec for m in grid(["tbptt", "chunked", "sliding", "stepped", "full"], [3])]
    assert specs == ["tbptt:k1=3,k2=5", "chunked:k=3", "sliding:k=3", "stepped:k=3,family=chunked", "full"]
    for family, message in (("hybrid", "also needs every"), ("artbp", "no K parameter"),
                            ("adaptive", "no K parameter"), ("curriculum", "no K parameter")):
        with pytest.raises(UsageError, match=message):
            grid([family], [3])
    described = {s: describe(s) for s in ("full", "tbptt:k1=4,k2=7", "hybrid:k1=4,every=2", "artbp:c=0.5")}
    assert [d["k"] for d in described.values()] == [None, 4, 4, None]
    assert [d["series"] for d in described.values()] == ["full", "tbptt(K,2K-1)", "hybrid (k2=4, every=2, long=0)",
                                                         "artbp:c=0.5,min=1"]
    assert not parse_method("artbp:c=0.5").deterministic and parse_method("full").exact


def test_bias_command_table_and_json(plugin_dir: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["bias", "--task", "adding", "--seq-len", "8", "--batch", "2", "--hidden", "4", "--batches", "2",
            "--flips", "50", "--dtype", "float64", "--max-lag", "0", "--method", "window,chunked,full", "--k", "2,4"]
    assert main(argv + ["--json"]) == 0
    rows = pd.DataFrame(json.loads(capsys.readouterr().out)["rows"])
    rows = rows[rows["group"] == "all"].set_index("spec")
    win = rows.loc[["window:len=2,stride=1", "window:len=4,stride=1"]]
    assert list(win["series"]) == ["window (stride=1)"] * 2 and list(win["k"]) == [2, 4]
    assert list(win["label"]) == ["window (stride=1) K=2", "window (stride=1) K=4"]
    # same mask as chunked:k=K, so the same estimates (chunked goes through the K-curve ladder, window
    # through the engine: equal to rounding)
    for k in (2, 4):
        a, b = rows.loc[f"window:len={k},stride=1"], rows.loc[f"chunked:k={k}"]
        for col in ("relative_bias", "cosine_mean", "relative_error_mean", "variance_trace"):
            assert a[col] == pytest.approx(b[col], rel=1e-9, abs=1e-15)
    assert main(argv) == 0
    text = capsys.readouterr().out.splitlines()
    known = {"full", "chunked:k=2", "chunked:k=4", "window:len=2,stride=1", "window:len=4,stride=1"}
    order = [line.split()[0] for line in text if line.split() and line.split()[0] in known]
    assert order == ["full", "chunked:k=2", "chunked:k=4", "window:len=2,stride=1", "window:len=4,stride=1"]
    assert any(line.startswith("window:len=4,stride=1") and " window (stride=1) " in line and " 4 " in line
               for line in text)


def test_store_and_report(plugin_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from tbptt_bench.report.document import Options
    from tbptt_bench.report.load import load_tables
    from tbptt_bench.report.report import build_report
    from tbptt_bench.suites.store import read_results

    suite = tmp_path / "plug.toml"
    suite.write_text(SUITE)
    assert main(["--plugins", str(plugin_dir), "run", str(suite), "--results", str(tmp_path / "results"),
                 "--quiet"]) == 0
    capsys.readouterr()
    store = tmp_path / "results" / "plug"
    table = read_results(store, "bias")
    rows = table[table["group"] == "all"].set_index("spec")
    assert rows.loc["window:len=2,stride=1", "series"] == "window (stride=1)"
    assert rows.loc["window:len=4,stride=1", "k"] == 4 and pd.isna(rows.loc["full", "k"])
    for k in (2, 4):
        assert rows.loc[f"window:len={k},stride=1", "relative_bias"] == \
            pytest.approx(rows.loc[f"chunked:k={k}", "relative_bias"], rel=1e-9)
    files = build_report(load_tables(store), tmp_path / "report", Options(formats=(), n_resamples=200))
    bias = pd.read_csv(files.out / "tables" / "bias.csv")
    assert list(bias["method"]) == ["full", "chunked:k=2", "chunked:k=4", "window:len=2,stride=1",
                                    "window:len=4,stride=1"]
    assert list(bias["series"]) == ["full", "chunked", "chunked", "window (stride=1)", "window (stride=1)"]
    assert list(bias["K"].fillna(-1)) == [-1, 2, 4, 2, 4]
    assert "bias_vs_k" in files.figures


def test_asv_grid_lists_the_plugin_family(plugin_dir: Path) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        grid_module = importlib.import_module("asv_bench.grid")
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert FAMILY in grid_module.families()
    spec = grid_module.representative_spec(FAMILY, 24)
    assert spec == "window:len=6,stride=1" and parse_method(spec).grid_k == 6
