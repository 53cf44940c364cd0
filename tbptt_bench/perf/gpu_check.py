"""The GPU check: on a machine with one CUDA GPU, run the CUDA tests and a small cost grid, write files.

    python -m tbptt_bench.perf.gpu_check --out DIR            # needs a CUDA GPU; about 3 minutes

It runs ``pytest -m cuda`` (log and JUnit XML), then a grid measured by the harness in
:mod:`tbptt_bench.perf.harness`, one fresh process per configuration: LSTM, hidden 128, batch 32; the fused
against the per-step cell path; ``chunked:k=64``, ``full``, ``tbptt:k1=16,k2=64`` and
``full:checkpoint=64`` at T = 256, 1024, 4096; and an out-of-memory probe (``full`` at T = 4096 with a
16 MiB memory limit) that must come back as status ``oom`` while the grid goes on. Files in DIR:

* ``pytest_cuda.log``, ``pytest_cuda.xml`` — the CUDA tests;
* ``perf.csv``, ``perf.json`` — one row per configuration (columns in docs/perf.md), rewritten after
  every row so that an interrupted check keeps what it measured;
* ``summary.json`` — provenance, test outcome, row statuses, headline ratios, elapsed time, ``ok``.

Without a GPU it exits with status 2 and says so. ``--device cpu`` runs the same logic on the CPU
(``--tiny`` sizes) so that the script itself can be tested anywhere. The check stops starting new
configurations once ``--budget`` seconds have passed (default 270, to finish within 5 minutes).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
import torch

import tbptt_bench
from tbptt_bench.errors import UsageError
from tbptt_bench.perf.child import measure_in_fresh_process
from tbptt_bench.perf.config import PerfConfig
from tbptt_bench.perf.harness import measure
from tbptt_bench.perf.tables import save_table, to_frame, write_json_atomic
from tbptt_bench.provenance import provenance
from tbptt_bench.core.build import resolve_device

log = logging.getLogger(__name__)

_ROOT = Path(tbptt_bench.__file__).resolve().parent.parent

METHODS = ("chunked:k=64", "full", "tbptt:k1=16,k2=64", "full:checkpoint=64")
SEQ_LENS = (256, 1024, 4096)
TINY_SEQ_LENS = (32,)
#: The memory limit of the out-of-memory probe (bytes); full BPTT at the probe's T needs far more.
PROBE_LIMIT = 16 * 2**20
#: Hidden size that no device can hold (2^42 LSTM weights, 16 TiB): the in-process out-of-memory probe.
IMPOSSIBLE_HIDDEN = 2**20


@dataclasses.dataclass(frozen=True)
class GridEntry:
    """A configuration of the check and what its status should be."""

    role: str
    config: PerfConfig
    expect: str = "ok"


def build_grid(device: str, *, tiny: bool = False, fresh: bool = True) -> list[GridEntry]:
    """The configurations of the check, in run order (``tiny``: sizes small enough for a CPU test)."""
    hidden, batch = (8, 2) if tiny else (128, 32)
    lens = TINY_SEQ_LENS if tiny else SEQ_LENS
    k, k1 = (16, 4) if tiny else (64, 16)
    methods = (f"chunked:k={k}", "full", f"tbptt:k1={k1},k2={k}", f"full:checkpoint={k}")
    base = PerfConfig(task="copy", model="lstm", hidden_size=hidden, batch_size=batch, device=device,
                      warmup=0 if tiny else 2, repeats=1 if tiny else 5, seq_len=lens[0], method=methods[0])
    entries = [GridEntry("fused_vs_cell", dataclasses.replace(base, path=p)) for p in ("fused", "cell")]
    entries += [GridEntry("methods", dataclasses.replace(base, method=m, seq_len=t)) for t in lens for m in methods]
    probe = dataclasses.replace(base, method="full", seq_len=lens[-1], repeats=1, warmup=0)
    if fresh:
        probe = dataclasses.replace(probe, memory_limit=PROBE_LIMIT)
    else:
        probe = dataclasses.replace(probe, hidden_size=IMPOSSIBLE_HIDDEN)
    entries.append(GridEntry("oom_probe", probe, expect="oom"))
    return entries


def run_pytest(out: Path, target: Path, timeout: float) -> dict[str, Any]:
    """``pytest -m cuda`` on ``target``; the log and JUnit XML go to ``out``."""
    log_path, xml_path = out / "pytest_cuda.log", out / "pytest_cuda.xml"
    if not target.exists():
        log_path.write_text(f"tests not found at {target}; the CUDA tests were not run\n")
        return {"pytest_rc": None, "pytest_note": f"no tests at {target}"}
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-o", "addopts=", "-p", "no:cacheprovider",
           "-rA", f"--junitxml={xml_path}", str(target)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=_ROOT)
        text, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        text, rc = f"{exc.stdout or ''}\npytest timed out after {timeout} s\n", None
    log_path.write_text(" ".join(cmd) + "\n\n" + (text if isinstance(text, str) else text.decode()))
    return {"pytest_rc": rc, "pytest_s": time.perf_counter() - t0}


def headline(frame: pd.DataFrame) -> dict[str, Any]:
    """Ratios measured in this run: fused/cell throughput, tbptt and full against chunked, checkpoint memory."""
    ok = frame[frame["status"] == "ok"]
    out: dict[str, Any] = {}
    pair = ok[ok["role"] == "fused_vs_cell"].set_index("path")["tokens_per_s"]
    if {"fused", "cell"} <= set(pair.index):
        out["fused_over_cell_throughput"] = float(pair["fused"] / pair["cell"])
    methods = ok[ok["role"] == "methods"]
    for t, group in methods.groupby("seq_len"):
        by = group.set_index("method")
        chunked = [m for m in by.index if m.startswith("chunked")]
        if chunked:
            for m in by.index:
                out[f"T{t}:{m}:throughput_vs_chunked"] = float(by.loc[m, "tokens_per_s"] / by.loc[chunked[0], "tokens_per_s"])
        ckpt = [m for m in by.index if m.startswith("full:checkpoint")]
        if "full" in by.index and ckpt and by.loc["full", "mem_sequence_bytes"]:
            out[f"T{t}:checkpoint_over_full_memory"] = float(
                by.loc[ckpt[0], "mem_sequence_bytes"] / by.loc["full", "mem_sequence_bytes"])
            out[f"T{t}:checkpoint_over_full_time"] = float(by.loc[ckpt[0], "ms_per_update"] / by.loc["full", "ms_per_update"])
    return out


def run_check(
    out: Path,
    device: str = "cuda",
    *,
    tiny: bool = False,
    fresh: bool = True,
    budget: float = 270.0,
    pytest_target: Path | None = None,
    run_tests: bool = True,
) -> dict[str, Any]:
    """Run the check and write its files into ``out``; return the summary (also in summary.json)."""
    dev = resolve_device(device)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    summary: dict[str, Any] = {"device": str(dev), "provenance": provenance(dev), "budget_s": budget}
    if run_tests:
        target = pytest_target or _ROOT / "tests"
        summary.update(run_pytest(out, target, timeout=max(30.0, budget * 0.4)))
    entries = build_grid(device, tiny=tiny, fresh=fresh)
    rows: list[dict[str, Any]] = []
    not_run = []
    for entry in entries:
        elapsed = time.perf_counter() - t0
        if elapsed > budget:
            not_run.append(f"{entry.role} {entry.config.method} T={entry.config.seq_len}")
            continue
        timeout = max(20.0, budget - elapsed + 30.0)
        row = measure_in_fresh_process(entry.config, timeout) if fresh else measure(entry.config)
        row.update(role=entry.role, expected_status=entry.expect)
        rows.append(row)
        log.info("%s %s %s T=%d: %s", entry.role, entry.config.path, entry.config.method, entry.config.seq_len, row["status"])
        frame = to_frame(rows)
        save_table(frame, out / "perf.csv")
        save_table(frame, out / "perf.json")
    frame = to_frame(rows)
    statuses = frame["status"].tolist() if rows else []
    unexpected = [f"{r['role']} {r['method']} T={r['seq_len']}: {r['status']} (expected {r['expected_status']}) {r['error']}"
                  for r in rows if r["status"] != r["expected_status"]]
    tests_ok = (not run_tests) or summary.get("pytest_rc") == 0  # 5, "no tests collected", is a failure
    summary.update({
        "rows": len(rows), "statuses": {s: statuses.count(s) for s in sorted(set(statuses))},
        "unexpected": unexpected, "not_run": not_run, "ratios": headline(frame) if rows else {},
        "elapsed_s": time.perf_counter() - t0, "ok": tests_ok and not unexpected and not not_run,
    })
    write_json_atomic(out / "summary.json", summary)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tbptt_bench.perf.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for the result files (created if missing)")
    parser.add_argument("--device", default="cuda", help="cuda or cuda:N; cpu only to test this script")
    parser.add_argument("--budget", type=float, default=270.0, help="seconds after which no new configuration starts")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (for testing the script on a CPU)")
    parser.add_argument("--in-process", action="store_true", help="measure in this process (testing only)")
    parser.add_argument("--no-tests", action="store_true", help="skip the pytest step")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise UsageError("no CUDA GPU is available here; the GPU check needs one (use --device cpu only to test the script)")
        if not args.budget > 0:
            raise UsageError(f"--budget must be > 0 seconds, got {args.budget}")
        summary = run_check(Path(args.out), args.device, tiny=args.tiny, fresh=not args.in_process,
                            budget=args.budget, run_tests=not args.no_tests)
    except UsageError as exc:
        print(f"gpu_check: error: {exc}", file=sys.stderr)
        return 2
    print(f"gpu_check: {'ok' if summary['ok'] else 'FAILED'}; {summary['rows']} rows {summary['statuses']}, "
          f"pytest rc {summary.get('pytest_rc')}; files in {args.out}")
    for line in summary["unexpected"] + [f"not run (budget): {n}" for n in summary["not_run"]]:
        print(f"  {line}")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
