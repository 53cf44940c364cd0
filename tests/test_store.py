"""The result store: atomic commits, idempotent compaction, SIGKILL at random moments, the lock,
corrupted files and schema versions."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tbptt_bench.errors import UsageError
from tbptt_bench.suites.store import SCHEMA_VERSION, ResultStore, read_results, table_names

ROOT = Path(__file__).resolve().parent.parent


def key_of(i: int) -> str:
    return f"{i:016x}"


def cell_tables(i: int, status: str = "ok") -> dict[str, list[dict]]:
    """Deterministic rows of a fake cell: one results row and (when ok) three curve rows."""
    tables = {"cells": [{"key": key_of(i), "status": status, "value": i * 0.5, "name": f"cell{i}"}]}
    if status == "ok":
        tables["curves"] = [{"key": key_of(i), "n_updates": u, "loss": i + u / 10} for u in range(3)]
    return tables


def expected_frames(n: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    results = pd.DataFrame([cell_tables(i)["cells"][0] for i in range(n)])
    curves = pd.DataFrame([row for i in range(n) for row in cell_tables(i)["curves"]])
    return results, curves


def normalised(frame: pd.DataFrame, columns: list[str], by: list[str]) -> pd.DataFrame:
    return frame[columns].sort_values(by).reset_index(drop=True)


def test_commit_read_and_compact_round_trip(tmp_path: Path) -> None:
    with ResultStore(tmp_path) as store:
        for i in range(4):
            store.commit(key_of(i), cell_tables(i))
        before = read_results(tmp_path)
        assert (tmp_path / "parts").is_dir() and not (tmp_path / "cells.parquet").exists()
        store.compact()
        assert not list((tmp_path / "parts").iterdir())
        assert store.statuses() == {key_of(i): "ok" for i in range(4)}
    results, curves = expected_frames(4)
    after = read_results(tmp_path)
    for frame in (before, after):
        pd.testing.assert_frame_equal(normalised(frame, list(results.columns), ["key"]), results)
    assert (after["schema_version"] == SCHEMA_VERSION).all()
    got_curves = read_results(tmp_path, "curves")
    pd.testing.assert_frame_equal(normalised(got_curves, list(curves.columns), ["key", "n_updates"]), curves)
    assert table_names(tmp_path) == ["cells", "curves"]
    meta = pq.read_schema(tmp_path / "cells.parquet").metadata
    assert meta[b"tbptt_bench.schema_version"] == str(SCHEMA_VERSION).encode()


def test_compaction_is_idempotent_after_a_kill_between_replace_and_cleanup(tmp_path: Path) -> None:
    """The state a kill leaves after the tables were replaced but before the parts were removed."""
    with ResultStore(tmp_path) as store:
        for i in range(3):
            store.commit(key_of(i), cell_tables(i))
        shutil.copytree(tmp_path / "parts", tmp_path / "saved")
        store.compact()
    shutil.rmtree(tmp_path / "parts")
    shutil.move(tmp_path / "saved", tmp_path / "parts")
    assert len(read_results(tmp_path)) == 3, "a reader keeps each key once"
    with ResultStore(tmp_path):
        pass
    results, curves = expected_frames(3)
    pd.testing.assert_frame_equal(normalised(read_results(tmp_path), list(results.columns), ["key"]), results)
    assert len(read_results(tmp_path, "curves")) == len(curves)


def test_a_rerun_cell_replaces_its_rows_in_every_table(tmp_path: Path) -> None:
    with ResultStore(tmp_path) as store:
        store.commit(key_of(1), cell_tables(1))
        store.commit(key_of(2), cell_tables(2))
        store.compact()
        store.commit(key_of(1), cell_tables(1, status="failed"))
        assert read_results(tmp_path).set_index("key").loc[key_of(1), "status"] == "failed"
        store.compact()
    frame = read_results(tmp_path)
    assert sorted(frame["key"]) == [key_of(1), key_of(2)]
    assert set(read_results(tmp_path, "curves")["key"]) == {key_of(2)}, "stale curve rows are dropped"


def test_columns_of_different_cells_and_types_merge(tmp_path: Path) -> None:
    with ResultStore(tmp_path) as store:
        store.commit(key_of(1), {"cells": [{"key": key_of(1), "status": "ok", "a": 1, "x": None}]})
        store.commit(key_of(2), {"cells": [{"key": key_of(2), "status": "ok", "b": "text", "x": 2.5}]})
        store.commit(key_of(3), {"cells": [{"key": key_of(3), "status": "ok", "a": "mixed"}]})
        store.compact()
    frame = read_results(tmp_path).set_index("key")
    assert frame.loc[key_of(2), "x"] == 2.5 and frame.loc[key_of(2), "b"] == "text"
    assert str(frame.loc[key_of(1), "a"]) == "1" and frame.loc[key_of(3), "a"] == "mixed"


def test_corrupted_results_file_is_reported_and_never_overwritten(tmp_path: Path) -> None:
    with ResultStore(tmp_path) as store:
        store.commit(key_of(1), cell_tables(1))
        store.compact()
    path = tmp_path / "cells.parquet"
    data = path.read_bytes()
    damaged = data[: len(data) // 2] + b"\x00garbage" + data[len(data) // 2 + 8:]
    path.write_bytes(damaged)
    with pytest.raises(UsageError) as info:
        with ResultStore(tmp_path):
            pass
    assert str(path) in str(info.value) and "left untouched" in str(info.value)
    with pytest.raises(UsageError, match="cannot be read"):
        read_results(tmp_path)
    path.write_bytes(b"not parquet at all")
    with pytest.raises(UsageError, match=str(path)):
        with ResultStore(tmp_path):
            pass
    assert path.read_bytes() == b"not parquet at all"


def test_other_schema_version_is_refused(tmp_path: Path) -> None:
    table = pa.table({"key": [key_of(1)], "status": ["ok"]}).replace_schema_metadata(
        {b"tbptt_bench.schema_version": b"99"})
    pq.write_table(table, tmp_path / "cells.parquet")
    with pytest.raises(UsageError, match="schema version 99; this tbptt-bench reads and writes version"):
        with ResultStore(tmp_path):
            pass


def test_missing_store_and_bad_table_name(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        read_results(tmp_path / "absent")
    with pytest.raises(UsageError, match="bad table name"):
        read_results(tmp_path, "../x")
    assert read_results(tmp_path).empty


def _python(code: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)


def test_lock_held_by_another_process_fails_fast_and_dies_with_it(tmp_path: Path) -> None:
    holder = _python(f"""
        import time
        from tbptt_bench.suites.store import ResultStore
        store = ResultStore({str(tmp_path)!r})
        store.acquire()
        print("locked", flush=True)
        time.sleep(120)
    """)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UsageError) as info:
            with ResultStore(tmp_path):
                pass
        message = str(info.value)
        assert "in use by another tbptt-bench run" in message and f"pid {holder.pid}" in message
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()
    with ResultStore(tmp_path) as store:  # the kernel released the lock with the killed process
        store.commit(key_of(1), cell_tables(1))


WRITER = """
    import sys
    from tbptt_bench.suites.store import ResultStore
    sys.path.insert(0, {tests!r})
    from test_store import cell_tables, key_of
    print("ready", flush=True)
    with ResultStore({root!r}) as store:
        done = store.statuses()
        for i in range({n}):
            if key_of(i) not in done:
                store.commit(key_of(i), cell_tables(i))
                print("committed", flush=True)
            if i % 4 == 3:
                store.compact()
    print("finished", flush=True)
"""


def test_sigkill_at_random_moments_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    n = 24
    rng = random.Random(1234)
    code = WRITER.format(tests=str(Path(__file__).parent), root=str(tmp_path), n=n)
    kills, done = 0, 0
    for _ in range(8):
        remaining = n - done
        if remaining < 2:
            break
        proc = _python(code)
        assert proc.stdout.readline().strip() == "ready"
        # let a random number of cells commit, then kill at a random moment of the next commit or compaction
        for _ in range(rng.randrange(0, remaining - 1)):
            assert proc.stdout.readline().strip() == "committed"
        time.sleep(rng.uniform(0.0, 0.03))
        os.killpg(proc.pid, signal.SIGKILL)
        kills += 1
        proc.wait()
        present = read_results(tmp_path)
        done = len(present)
        assert not present["key"].duplicated().any()
        counts = read_results(tmp_path, "curves").groupby("key").size() if len(present) else pd.Series(dtype=int)
        assert set(counts.index) == set(present["key"]) and (counts == 3).all(), "tables agree after a kill"
    assert kills >= 3, "the test must actually kill writers mid-run"
    final = _python(code)
    out, err = final.communicate(timeout=60)
    assert "finished" in out, err
    results, curves = expected_frames(n)
    pd.testing.assert_frame_equal(normalised(read_results(tmp_path), list(results.columns), ["key"]), results)
    pd.testing.assert_frame_equal(normalised(read_results(tmp_path, "curves"), list(curves.columns),
                                             ["key", "n_updates"]), curves)
    assert not [p for p in (tmp_path / "parts").iterdir()], "every part was compacted and removed"
    assert not list(tmp_path.glob(".*.tmp-*")), "no temporary file is left behind"


def _v1_file(rows: list[dict], path: Path) -> None:
    """A table as the schema-version-1 writer wrote it: one wide frame, version 1 in the metadata."""
    table = pa.Table.from_pandas(pd.DataFrame(rows).assign(schema_version=1), preserve_index=False)
    pq.write_table(table.replace_schema_metadata({b"tbptt_bench.schema_version": b"1"}), path)


def _v1_store(root: Path) -> None:
    """A small store in the old layout, with the old column names and types (written by hand)."""
    common = {"suite": "old", "replicate": 0, "seed": 7, "error": "", "diverged_at": None, "threads": 1,
              "git_commit": "abc"}
    train = {**common, "key": key_of(1), "measure": "train", "status": "ok", "task": "copy", "model": "rnn",
             "method": "chunked:k=4", "task_params": '{"n_remember": 3}', "update": 8, "eval_loss": 0.5,
             "k_used": 4.0}
    failed = {**common, "key": key_of(2), "measure": "train", "status": "failed", "error": "boom", "task": "adding",
              "model": "gru", "method": "full", "task_params": "{}"}
    bias = [{**common, "key": key_of(3), "measure": "bias", "status": "ok", "task": "adding", "model": "rnn",
             "methods": '["full", "chunked:k=4"]', "task_params": "{}", "spec": spec, "k": k, "k1": k,
             "group": "all", "relative_bias": rb} for spec, k, rb in (("full", float("nan"), 0.0),
                                                                     ("chunked:k=4", 4.0, 0.25))]
    _v1_file([train, failed, *bias], root / "results.parquet")
    _v1_file([{**common, "key": key_of(1), "measure": "train", "status": "ok", "task_params": '{"n_remember": 3}',
               "update": u, "k_used": 4.0} for u in (0, 8)], root / "curves.parquet")
    _v1_file([{**common, "key": key_of(3), "measure": "bias", "status": "ok", "lag": lag, "mean": 1.0 / (lag + 1)}
              for lag in range(3)], root / "lags.parquet")


def _check_converted(root: Path) -> None:
    train = read_results(root, "train").set_index("key")
    assert list(train.index) == [key_of(1), key_of(2)] and "update" not in train.columns
    assert train.loc[key_of(1), "n_updates"] == 8 and train["n_updates"].dtype == "Int64"
    assert train.loc[key_of(1), "task.n_remember"] == 3 and train["task.n_remember"].dtype == "Int64"
    assert "task_params" not in train.columns and train.loc[key_of(2), "status"] == "failed"
    bias = read_results(root, "bias").set_index("spec")
    assert bias["k"].dtype == "Int64" and pd.isna(bias.loc["full", "k"]) and bias.loc["chunked:k=4", "k"] == 4
    assert list(bias.loc["full", "methods"]) == ["full", "chunked:k=4"]
    cells = read_results(root, "cells")
    assert sorted(cells["key"]) == [key_of(i) for i in (1, 2, 3)], "every cell exactly once"
    assert cells["seed"].dtype == "int64" and (cells["schema_version"] == SCHEMA_VERSION).all()
    curves = read_results(root, "curves")
    assert list(curves["n_updates"]) == [0, 8] and curves["k_used"].dtype == "Int64"
    assert list(read_results(root, "lags")["lag"]) == [0, 1, 2]
    assert table_names(root) == ["bias", "cells", "curves", "lags", "train"]


def test_a_version_1_store_is_converted_on_read_and_on_the_first_write(tmp_path: Path) -> None:
    _v1_store(tmp_path)
    originals = {p.name: p.read_bytes() for p in tmp_path.glob("*.parquet")}
    _check_converted(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.glob("*.parquet")} == originals, "reading writes nothing"
    with ResultStore(tmp_path) as store:
        assert store.statuses() == {key_of(1): "ok", key_of(2): "failed", key_of(3): "ok"}
    assert not (tmp_path / "results.parquet").exists()
    assert {p.name: p.read_bytes() for p in (tmp_path / "backup-v1").glob("*.parquet")} == originals
    assert '"schema_version": 2' in (tmp_path / "manifest.json").read_text()
    _check_converted(tmp_path)
    for name in ("cells", "train", "bias", "curves", "lags"):
        assert pq.read_schema(tmp_path / f"{name}.parquet").metadata[b"tbptt_bench.schema_version"] == b"2"


def test_an_interrupted_conversion_resumes_from_the_backup(tmp_path: Path) -> None:
    _v1_store(tmp_path)
    with ResultStore(tmp_path):
        pass
    (tmp_path / "manifest.json").unlink()  # the state of a kill after the tables, before the manifest
    (tmp_path / "curves.parquet").write_bytes(b"half written")
    _check_converted(tmp_path)
    with ResultStore(tmp_path):
        pass
    _check_converted(tmp_path)


def test_shared_columns_have_the_same_names_and_types_in_every_table(tmp_path: Path) -> None:
    from tbptt_bench.suites.schema import SHARED

    _v1_store(tmp_path)
    with ResultStore(tmp_path):
        pass
    for name in ("cells", "train", "bias", "curves", "lags"):
        schema = pq.read_schema(tmp_path / f"{name}.parquet")
        assert [(f.name, f.type) for f in schema][:len(SHARED)] == list(SHARED.items()), name


def test_a_damaged_part_stops_the_writer_before_any_file_changes(tmp_path: Path) -> None:
    with ResultStore(tmp_path) as store:
        for i in range(3):
            store.commit(key_of(i), cell_tables(i))
        store.compact()
        store.commit(key_of(5), cell_tables(5))
        store.commit(key_of(6), cell_tables(6))
    damaged = tmp_path / "parts" / key_of(6) / "curves.parquet"
    damaged.write_bytes(damaged.read_bytes()[:-20])
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(UsageError) as info:
        with ResultStore(tmp_path):
            pass
    assert str(damaged) in str(info.value) and "left untouched" in str(info.value)
    assert len(str(info.value).splitlines()) == 1
    after = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before, "no file was written, replaced or removed"


def test_a_table_missing_from_the_manifest_is_refused(tmp_path: Path) -> None:
    with ResultStore(tmp_path) as store:
        store.commit(key_of(1), cell_tables(1))
        store.compact()
    shutil.copy(tmp_path / "curves.parquet", tmp_path / "extra.parquet")
    with pytest.raises(UsageError, match="extra.parquet is not listed in"):
        with ResultStore(tmp_path):
            pass
    (tmp_path / "extra.parquet").unlink()
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(UsageError, match="manifest.json is damaged"):
        read_results(tmp_path)


def test_a_bias_cell_writes_its_alignment_table(tmp_path: Path) -> None:
    """A tiny suite with one bias block: the store gets an ``alignment`` table with one row per ordered pair of
    the listed methods and the true gradient, stamped with the cell's key, and each method's cosine with the
    true gradient equals the bias table's own (computed separately, per method)."""
    from tbptt_bench.cli import main

    suite_file = tmp_path / "align.toml"
    suite_file.write_text(textwrap.dedent("""\
        [suite]
        name = "align"
        [[bias]]
        task = "adding"
        model = "rnn"
        hidden_size = 4
        methods = ["chunked:k=2", "sliding:k=3"]
        seq_len = 10
        batch_size = 2
        n_batches = 3
        max_lag = 0
        n_flips = 0
        """))
    assert main(["run", str(suite_file), "--results", str(tmp_path / "res"), "--quiet", "--jobs", "1"]) == 0
    root = tmp_path / "res" / "align"
    assert "alignment" in table_names(root)
    align = read_results(root, "alignment")
    bias = read_results(root, "bias")
    assert len(align) == 9 and set(align["key"]) == set(bias["key"]) and (align["status"] == "ok").all()
    pairs = align.set_index(["spec", "other"])
    assert set(pairs.index) == {(a, b) for a in ("chunked:k=2", "sliding:k=3", "true")
                                for b in ("chunked:k=2", "sliding:k=3", "true")}
    cos = bias[bias["group"] == "all"].set_index("spec")["cosine_mean"]
    for spec in ("chunked:k=2", "sliding:k=3"):
        assert pairs.loc[(spec, "true"), "cosine_mean"] == pytest.approx(cos[spec], rel=1e-12)
        assert pairs.loc[(spec, spec), "cosine_mean"] == pytest.approx(1.0, abs=1e-12)
        assert pairs.loc[(spec, "true"), "cosine_mean"] == pairs.loc[("true", spec), "cosine_mean"]


def test_read_results_refuses_a_table_no_store_holds_and_reads_an_unmeasured_one_as_empty(tmp_path: Path) -> None:
    """``table="results"`` (the old one-table name) is an error naming the tables there are, not an empty frame."""
    with ResultStore(tmp_path) as store:
        store.commit(key_of(0), cell_tables(0))
    with pytest.raises(UsageError, match=r"no table 'results'; its tables: cells, curves"):
        read_results(tmp_path, table="results")
    assert read_results(tmp_path, "bias").empty  # a table a store can hold; no cell here measured bias
    assert len(read_results(tmp_path, "curves")) == 3
