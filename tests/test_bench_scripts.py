"""The benchmark scripts behind the numbers in docs/bias.md run end to end on tiny sizes (they are not
imported by the package, so nothing else would notice an import or argument that rots)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}


def run(script: str, *args: str, tmp_path: Path) -> dict:
    out = tmp_path / "out.json"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args, "--out", str(out)],
                         env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(out.read_text())


def test_kcurve_floor_section(tmp_path: Path) -> None:
    out = run("bench_kcurve.py", "--floor", "--seq-len", "64", "--hidden", "16", "--batch", "2", "--rounds", "1",
              tmp_path=tmp_path)["floor"]
    assert set(out["floor"]) == {"chunked", "tbptt"} and out["folded"]  # 10 symbols into 16 units: folded
    assert out["floor"]["tbptt"] > out["floor"]["chunked"] > 0
    assert "forward W=32 L=8" in out["ns_per_step_row"] and "forward W=128 L=8" not in out["ns_per_step_row"]


def test_long_curve_with_float64_spot_check(tmp_path: Path) -> None:
    out = run("bench_long.py", "--seq-len", "64", "--kmax", "8", "--hidden", "8", "--batch", "2",
              "--float64-spot", "2,8", tmp_path=tmp_path)["long"]
    assert sorted(int(k) for k in out["curve"]) == [1, 2, 4, 8]
    checks = out["float64_spot"]["checks"]
    assert checks["truth"] < 1e-5
    for k in ("2", "8"):
        assert checks[k]["float32_vs_float64"] < 1e-5
        assert checks[k]["relative_error_float64"] == pytest.approx(checks[k]["relative_error_float32"], rel=1e-3)


def test_long_lag_profile_with_training_and_figure(tmp_path: Path) -> None:
    figure = tmp_path / "lags.png"
    out = run("bench_long.py", "--lag-profile", "16", "--positions", "3", "--seq-len", "128", "--hidden", "8",
              "--batch", "2", "--train-steps", "2", "--train-seq-len", "16", "--figure", str(figure),
              tmp_path=tmp_path)["lag_profile"]
    assert set(out) == {"initial θ", "after 2 updates"}
    for res in out.values():
        assert [row["lag"] for row in res["profile"]] == list(range(1, 17))
        assert res["positions"] == 3 and res["float32_mean_within_1pct_to_lag"] == 16
    assert figure.is_file() and figure.stat().st_size > 1000
