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
    tables = {"results": [{"key": key_of(i), "status": status, "value": i * 0.5, "name": f"cell{i}"}]}
    if status == "ok":
        tables["curves"] = [{"key": key_of(i), "update": u, "loss": i + u / 10} for u in range(3)]
    return tables


def expected_frames(n: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    results = pd.DataFrame([cell_tables(i)["results"][0] for i in range(n)])
    curves = pd.DataFrame([row for i in range(n) for row in cell_tables(i)["curves"]])
    return results, curves


def normalised(frame: pd.DataFrame, columns: list[str], by: list[str]) -> pd.DataFrame:
    return frame[columns].sort_values(by).reset_index(drop=True)


def test_commit_read_and_compact_round_trip(tmp_path: Path) -> None:
    with ResultStore(tmp_path) as store:
        for i in range(4):
            store.commit(key_of(i), cell_tables(i))
        before = read_results(tmp_path)
        assert (tmp_path / "parts").is_dir() and not (tmp_path / "results.parquet").exists()
        store.compact()
        assert not list((tmp_path / "parts").iterdir())
        assert store.statuses() == {key_of(i): "ok" for i in range(4)}
    results, curves = expected_frames(4)
    after = read_results(tmp_path)
    for frame in (before, after):
        pd.testing.assert_frame_equal(normalised(frame, list(results.columns), ["key"]), results)
    assert (after["schema_version"] == SCHEMA_VERSION).all()
    got_curves = read_results(tmp_path, "curves")
    pd.testing.assert_frame_equal(normalised(got_curves, list(curves.columns), ["key", "update"]), curves)
    assert table_names(tmp_path) == ["curves", "results"]
    meta = pq.read_schema(tmp_path / "results.parquet").metadata
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
        store.commit(key_of(1), {"results": [{"key": key_of(1), "status": "ok", "a": 1, "x": None}]})
        store.commit(key_of(2), {"results": [{"key": key_of(2), "status": "ok", "b": "text", "x": 2.5}]})
        store.commit(key_of(3), {"results": [{"key": key_of(3), "status": "ok", "a": "mixed"}]})
        store.compact()
    frame = read_results(tmp_path).set_index("key")
    assert frame.loc[key_of(2), "x"] == 2.5 and frame.loc[key_of(2), "b"] == "text"
    assert str(frame.loc[key_of(1), "a"]) == "1" and frame.loc[key_of(3), "a"] == "mixed"


def test_corrupted_results_file_is_reported_and_never_overwritten(tmp_path: Path) -> None:
    with ResultStore(tmp_path) as store:
        store.commit(key_of(1), cell_tables(1))
        store.compact()
    path = tmp_path / "results.parquet"
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
    pq.write_table(table, tmp_path / "results.parquet")
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
                                             ["key", "update"]), curves)
    assert not [p for p in (tmp_path / "parts").iterdir()], "every part was compacted and removed"
    assert not list(tmp_path.glob(".*.tmp-*")), "no temporary file is left behind"
