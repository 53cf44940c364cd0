"""The GPU check: on a machine with one CUDA GPU, run the CUDA tests and a small cost grid, write files.

    python -m tbptt_bench.perf.gpu_check --out DIR            # needs a CUDA GPU; under 8 minutes

It runs ``pytest -m cuda`` (log and JUnit XML; "no tests collected" counts as a failure), then a grid
measured by the harness in :mod:`tbptt_bench.perf.harness`, one fresh process per configuration, LSTM,
batch 32, on the ``copy`` task: the fused against the per-step cell path (hidden 256, T = 1024); at hidden
256 and 1024 and T = 1024, ``full``, ``chunked`` at three K (16, 64, 256) and ``tbptt:k1=64,k2=128``;
``uoro`` at T = 256 (it steps the cell one step at a time); and an out-of-memory probe (``full`` at
T = 1024, hidden 1024, with a 16 MiB memory limit) that must come back as status ``oom`` while the grid
goes on. Files in DIR:

* ``pytest_cuda.log``, ``pytest_cuda.xml`` — the CUDA tests;
* ``perf.csv``, ``perf.json`` — one row per configuration (columns in docs/perf.md), rewritten after
  every row so that an interrupted check keeps what it measured;
* ``summary.json`` — provenance, test outcome, row statuses, headline ratios, elapsed time, ``ok``;
* ``summary.md`` — the same in short: one line per row, the ratios, what went wrong.

Without a GPU it exits with status 2 and says so. ``--device cpu --tiny`` runs the same logic on the CPU
so that the script itself can be tested anywhere. The check stops starting new configurations once
``--budget`` seconds have passed (default 400; with the tests' 150 s limit it ends within 8 minutes).
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

#: Hidden sizes, sequence length and batch of the grid (``tiny``: a CPU test's).
HIDDEN, TINY_HIDDEN = (256, 1024), (8,)
SEQ_LEN, TINY_SEQ_LEN = 1024, 24
#: UORO steps the cell one step at a time: a shorter sequence keeps it within the budget.
UORO_SEQ_LEN, TINY_UORO_SEQ_LEN = 256, 24
BATCH, TINY_BATCH = 32, 2
#: The truncation lengths of ``chunked`` (three K), and tbptt's (k1, k2); scaled down for ``tiny``.
KS, TINY_KS = (16, 64, 256), (2, 4, 8)
#: The memory limit of the out-of-memory probe (bytes); full BPTT at the probe's size needs far more.
PROBE_LIMIT = 16 * 2**20
#: Hidden size that no device can hold (2^42 LSTM weights, 16 TiB): the in-process out-of-memory probe.
IMPOSSIBLE_HIDDEN = 2**20
#: Seconds after which no new configuration starts, and the CUDA tests' time limit.
BUDGET_S, PYTEST_TIMEOUT_S = 400.0, 150.0


@dataclasses.dataclass(frozen=True)
class GridEntry:
    """A configuration of the check and what its status should be."""

    role: str
    config: PerfConfig
    expect: str = "ok"


def grid_methods(tiny: bool = False) -> tuple[str, ...]:
    """``full``, ``chunked`` at three K and one ``tbptt`` (the grid's truncation methods)."""
    ks = TINY_KS if tiny else KS
    return ("full", *(f"chunked:k={k}" for k in ks), f"tbptt:k1={ks[1]},k2={2 * ks[1]}")


def build_grid(device: str, *, tiny: bool = False, fresh: bool = True) -> list[GridEntry]:
    """The configurations of the check, in run order (``tiny``: sizes small enough for a CPU test)."""
    hiddens, seq_len = (TINY_HIDDEN, TINY_SEQ_LEN) if tiny else (HIDDEN, SEQ_LEN)
    base = PerfConfig(task="copy", model="lstm", hidden_size=hiddens[0], batch_size=TINY_BATCH if tiny else BATCH,
                      device=device, warmup=0 if tiny else 2, repeats=1 if tiny else 5, seq_len=seq_len,
                      method=grid_methods(tiny)[1], threads=1 if tiny else None)
    entries = [GridEntry("fused_vs_cell", dataclasses.replace(base, path=p)) for p in ("fused", "cell")]
    for hidden in hiddens:
        entries += [GridEntry("methods", dataclasses.replace(base, method=m, hidden_size=hidden))
                    for m in grid_methods(tiny)]
        entries.append(GridEntry("online", dataclasses.replace(
            base, method="uoro", hidden_size=hidden, seq_len=TINY_UORO_SEQ_LEN if tiny else UORO_SEQ_LEN,
            repeats=1 if tiny else 3)))
    probe = dataclasses.replace(base, method="full", hidden_size=hiddens[-1], repeats=1, warmup=0)
    if fresh:
        probe = dataclasses.replace(probe, memory_limit=PROBE_LIMIT)
    else:
        probe = dataclasses.replace(probe, hidden_size=IMPOSSIBLE_HIDDEN)
    entries.append(GridEntry("oom_probe", probe, expect="oom"))
    return entries


def tests_passed(rc: int | None) -> bool:
    """pytest's exit status 0 only: 5 ("no tests collected") means the CUDA tests did not run."""
    return rc == 0


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
    """Ratios measured in this run: fused/cell throughput; per hidden size, each method's throughput and
    sequence memory against ``full``'s (UORO's throughput is per token, at its own T)."""
    ok = frame[frame["status"] == "ok"]
    out: dict[str, Any] = {}
    pair = ok[ok["role"] == "fused_vs_cell"].set_index("path")["tokens_per_s"]
    if {"fused", "cell"} <= set(pair.index):
        out["fused_over_cell_throughput"] = float(pair["fused"] / pair["cell"])
    for hidden, group in ok[ok["role"].isin(["methods", "online"])].groupby("hidden_size"):
        by = group.set_index("method")
        if "full" not in by.index:
            continue
        for m in by.index.drop("full"):
            out[f"H{hidden}:{m}:throughput_vs_full"] = float(by.loc[m, "tokens_per_s"] / by.loc["full", "tokens_per_s"])
            if by.loc["full", "mem_sequence_bytes"] and m != "uoro":
                out[f"H{hidden}:{m}:memory_vs_full"] = float(
                    by.loc[m, "mem_sequence_bytes"] / by.loc["full", "mem_sequence_bytes"])
    return out


def markdown_summary(summary: dict[str, Any], frame: pd.DataFrame) -> str:
    """``summary.md``: where it ran, the tests' outcome, one line per row, the ratios, what went wrong."""
    prov = summary["provenance"]
    lines = [f"# GPU check: {'ok' if summary['ok'] else 'FAILED'}", "",
             f"{prov.get('gpu_model') or summary['device']}; torch {prov['torch_version']}, CUDA {prov['cuda_version']}, "
             f"cuDNN {prov['cudnn_version']}; {prov['gpu_settings']}; commit {prov['git_commit']}; "
             f"{summary['elapsed_s']:.0f} s.", "",
             f"CUDA tests: pytest exit status {summary.get('pytest_rc', 'not run')} (0 = passed).", "",
             "| role | method | hidden | T | status | tokens/s | ms/update | sequence MiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in frame.to_dict("records"):
        mem = r.get("mem_sequence_bytes")
        nums = (f"{r['tokens_per_s']:.4g} | {r['ms_per_update']:.4g} | " if r["status"] == "ok" else "| | ")
        lines.append(f"| {r['role']} | {r['method']}{'' if r['path'] == 'fused' else ' (' + r['path'] + ')'} | "
                     f"{r['hidden_size']} | {r['seq_len']} | {r['status']} | {nums}"
                     f"{'' if mem is None or mem != mem else f'{mem / 2**20:.1f}'} |")
    lines += ["", "Ratios: " + ("; ".join(f"{k} {v:.3g}" for k, v in summary["ratios"].items()) or "none"), ""]
    lines += [f"- unexpected: {u}" for u in summary["unexpected"]] + [f"- not run (budget): {n}" for n in summary["not_run"]]
    return "\n".join(lines).rstrip() + "\n"


def run_check(
    out: Path,
    device: str = "cuda",
    *,
    tiny: bool = False,
    fresh: bool = True,
    budget: float = BUDGET_S,
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
        summary.update(run_pytest(out, target, timeout=PYTEST_TIMEOUT_S))
    entries = build_grid(device, tiny=tiny, fresh=fresh)
    rows: list[dict[str, Any]] = []
    not_run = []
    for entry in entries:
        elapsed = time.perf_counter() - t0
        if elapsed > budget:
            not_run.append(f"{entry.role} {entry.config.method} H={entry.config.hidden_size} T={entry.config.seq_len}")
            continue
        timeout = max(20.0, budget - elapsed + 30.0)
        row = measure_in_fresh_process(entry.config, timeout) if fresh else measure(entry.config)
        row.update(role=entry.role, expected_status=entry.expect)
        rows.append(row)
        log.info("%s %s %s H=%d T=%d: %s", entry.role, entry.config.path, entry.config.method,
                 entry.config.hidden_size, entry.config.seq_len, row["status"])
        frame = to_frame(rows)
        save_table(frame, out / "perf.csv")
        save_table(frame, out / "perf.json")
    frame = to_frame(rows)
    statuses = frame["status"].tolist() if rows else []
    unexpected = [f"{r['role']} {r['method']} T={r['seq_len']}: {r['status']} (expected {r['expected_status']}) {r['error']}"
                  for r in rows if r["status"] != r["expected_status"]]
    tests_ok = (not run_tests) or tests_passed(summary.get("pytest_rc"))
    summary.update({
        "rows": len(rows), "statuses": {s: statuses.count(s) for s in sorted(set(statuses))},
        "unexpected": unexpected, "not_run": not_run, "ratios": headline(frame) if rows else {},
        "elapsed_s": time.perf_counter() - t0, "ok": tests_ok and not unexpected and not not_run,
    })
    write_json_atomic(out / "summary.json", summary)
    (out / "summary.md").write_text(markdown_summary(summary, frame))
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tbptt_bench.perf.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for the result files (created if missing)")
    parser.add_argument("--device", default="cuda", help="cuda or cuda:N; cpu only to test this script")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="seconds after which no new configuration starts")
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
