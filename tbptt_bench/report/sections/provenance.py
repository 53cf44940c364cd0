"""The provenance section: where and with what every number was measured, and failed cells."""

from __future__ import annotations

import pandas as pd

from tbptt_bench.report.common import _device_label, _fmt, measured_rows
from tbptt_bench.report.document import Document


PROVENANCE = (("suite", "suite"), ("git commit", "git_commit"), ("host", "hostname"), ("CPU", "cpu_model"),
              ("GPU", "gpu_model"), ("platform", "platform"), ("Python", "python"), ("torch", "torch_version"),
              ("CUDA", "cuda_version"), ("cuDNN", "cudnn_version"), ("NumPy", "numpy_version"),
              ("tbptt-bench", "tbptt_bench_version"), ("threads", "threads"), ("executor", "executor"),
              ("concurrency", "concurrency"))


def provenance_section(doc: Document, tables: dict[str, pd.DataFrame]) -> None:
    main = measured_rows(tables)
    doc.section("provenance", "Provenance")
    rows = []
    for label, col in PROVENANCE:
        if col in main.columns:
            values = sorted({str(v) for v in main[col].dropna() if str(v) != ""})
            if values:
                rows.append({"what": label, "value": ", ".join(values)})
    if "device" in main.columns:
        rows.append({"what": "devices", "value": ", ".join(sorted(set(_device_label(main))))})
    if "started" in main.columns and main["started"].notna().any():
        start = pd.to_datetime(main["started"], utc=True).min()
        end = pd.to_datetime(main.get("finished", main["started"]), utc=True).max()
        rows.append({"what": "measured", "value": f"{start:%Y-%m-%d %H:%M} – {end:%Y-%m-%d %H:%M} UTC"})
    if "duration_s" in main.columns:
        rows.append({"what": "cell time (sum)", "value": f"{main.drop_duplicates('key')['duration_s'].sum():.0f} s"})
    prov = pd.DataFrame(rows, columns=["what", "value"])
    doc.table("provenance", prov, caption="Where and with what the results were measured.")

    counts = main.groupby(["measure", "status"])["key"].nunique().unstack(fill_value=0)
    counts = counts.reindex(columns=[c for c in ("ok", "diverged", "oom", "failed") if c in counts.columns]
                            + [c for c in counts.columns if c not in ("ok", "diverged", "oom", "failed")])
    counts = counts.reset_index()
    doc.table("cells", counts, caption="Cells per measurement kind and status.")

    bad = main[main["status"] != "ok"]
    if bad.empty:
        doc.text("Every cell finished (status ok).")
        return
    cols = [c for c in ("key", "measure", "task", "model", "method", "methods", "seed", "replicate", "status",
                        "diverged_at", "error") if c in bad.columns]
    shown = bad[cols].copy()
    if "error" in shown.columns:
        shown["error"] = shown["error"].fillna("").astype(str).map(lambda e: e.splitlines()[0][:160] if e else "")
    shown = shown.map(_fmt)
    doc.warning(f"{len(bad)} cell(s) did not finish; their rows are left out of every figure and statistic below.")
    doc.table("failed_cells", shown, bad[cols], caption="Cells that failed, diverged or ran out of memory.")
