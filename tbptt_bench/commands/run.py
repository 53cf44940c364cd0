"""``tbptt-bench run SUITE``: run a suite's cells into its result store, skipping finished cells.

A run stopped by SIGINT, SIGTERM or a full disk merges what it committed on the way out (or leaves it to
the next run when the disk is still full); every finished cell stays in the store and the next run
measures exactly the missing ones (docs/reliability.md).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

from tbptt_bench.commands.common import check_counts
from tbptt_bench.errors import EXIT_FAILED_CELLS, ResourceError
from tbptt_bench.suites import EXECUTORS
from tbptt_bench.validation import writable_dir

if TYPE_CHECKING:
    from tbptt_bench.suites.executors import Executor
    from tbptt_bench.suites.jobs import GridPoint, JobResult
    from tbptt_bench.suites.store import ResultStore
    from tbptt_bench.suites.suite import Suite

log = logging.getLogger(__name__)

RETRY_STATUSES = ("failed", "oom", "timeout")
#: Statuses that make the exit status 1.
FAILING = ("failed", "timeout")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run a suite (tasks × models × methods × sizes × seeds) into a result store",
                       description="Run the cells of a suite; finished cells are skipped, so a killed run "
                                   "resumes where it stopped. Results go to DIR/<suite name>/.")
    p.add_argument("suite", help="a built-in suite (quick, standard, gpu) or the path of a suite .toml file")
    p.add_argument("--results", default="results", metavar="DIR",
                   help="results root; the suite's store is DIR/<suite name>/ (default: ./results)")
    p.add_argument("--only", action="append", default=[], metavar="KEY",
                   help="run only the cell with this key (or unique key prefix); repeatable")
    p.add_argument("--executor", default="local", choices=EXECUTORS, help="where cells run (default: local)")
    p.add_argument("--jobs", type=int, default=None, metavar="N",
                   help="local: worker processes for cells that time nothing (default: one per CPU, over --threads); "
                        "ray without --ray-address: CPUs of the local Ray instance (default: all)")
    p.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="address of an existing Ray cluster (e.g. ray://head:10001); default: a local instance")
    p.add_argument("--threads", type=int, default=1, metavar="N",
                   help="torch threads per cell for cells that time nothing (default 1; timing cells set their own)")
    p.add_argument("--retry-failed", action="store_true", help="rerun cells recorded as failed, oom or timeout")
    p.add_argument("--rerun", action="store_true",
                   help="rerun the selected cells even if they are in the store (their rows are replaced)")
    p.add_argument("--list", action="store_true", help="list the cells, their keys and stored status; run nothing")
    p.add_argument("--quiet", action="store_true", help="no progress bar: one line per finished cell (for CI)")
    p.set_defaults(run=run)


def cell_line(result: JobResult, done: int, total: int) -> str:
    """One line for a finished cell: counter, status, label, duration, key and any error."""
    text = f"[{done}/{total}] {result.status:<8} {result.label}  {result.duration_s:.1f}s  {result.key}"
    if result.status == "diverged" and result.diverged_at is not None:
        text += f"  (at update {result.diverged_at})"
    elif result.error:
        text += f"  {result.error.splitlines()[0][:200]}"
    return text


def list_cells(suite: Suite, cells: list[GridPoint], root: Path) -> int:
    print(f"suite {suite.name} ({suite.source}): {len(cells)} cells; store {root}")
    statuses = stored_statuses(root)
    for cell in cells:
        print(f"{cell.key}  {statuses.get(cell.key, '-'):<8}  seed={cell.params.get('seed')}  {cell.label}")
    return 0


def stored_statuses(root: Path) -> dict[str, str]:
    """Key → status of the cells in the store at ``root`` (none yet: empty), read without the lock after the
    store check that every command makes (:func:`~tbptt_bench.suites.store.check_store`)."""
    from tbptt_bench.suites.store import read_results

    if not root.exists():
        return {}
    frame = read_results(root)
    return {} if frame.empty else dict(zip(frame["key"], frame["status"]))


def to_run(cells: list[GridPoint], before: dict[str, str], args: argparse.Namespace) -> list[GridPoint]:
    """The cells this run measures: those not in the store, and those --rerun or --retry-failed ask for."""
    return [c for c in cells if args.rerun or c.key not in before
            or (args.retry_failed and before[c.key] in RETRY_STATUSES)]


def run(args: argparse.Namespace) -> int:
    from tbptt_bench.suites.executors import make_executor  # imported here: the CLI starts without pandas
    from tbptt_bench.suites.store import ResultStore, settled, store_dir
    from tbptt_bench.suites.suite import check_devices, load_suite, select

    check_counts(args, {"jobs": 1, "threads": 1})
    suite = load_suite(args.suite)
    cells = select(suite.cells, args.only)
    root = store_dir(args.results, suite.name)
    if args.list:
        return list_cells(suite, cells, root)
    before = stored_statuses(root)
    if not to_run(cells, before, args) and settled(root):  # nothing to write: a read-only store is fine
        return summary(suite, cells, root, before, [], Counter(), 0.0)
    writable_dir(args.results, "--results")
    executor = make_executor(args.executor, jobs=args.jobs, ray_address=args.ray_address,
                             plugin_dirs=getattr(args, "plugins", []), threads=args.threads)
    if args.executor == "local":
        check_devices(cells)

    counts: Counter[str] = Counter()
    t0 = time.perf_counter()
    with ResultStore(root) as store:
        before = store.statuses()
        todo = to_run(cells, before, args)
        log.info("suite %s: %d cells, %d to run, %d already in %s", suite.name, len(cells), len(todo),
                 len(cells) - len(todo), root)
        try:
            measure(suite, executor, store, todo, counts, args.quiet)
        except BaseException as exc:
            _compact_on_the_way_out(store)
            if isinstance(exc, ResourceError):
                exc.note = (f"every cell committed before is kept ({sum(counts.values())} from this run); "
                            "the next run measures only the missing ones")
            raise
        store.compact()
        after = store.statuses()
    return summary(suite, cells, root, after, todo, counts, time.perf_counter() - t0)


def measure(suite: Suite, executor: Executor, store: ResultStore, todo: list[GridPoint], counts: Counter[str],
            quiet: bool) -> None:
    """Run ``todo``, committing each cell as it finishes; a line (or the progress bar) per cell. However it
    ends (SIGTERM, a full disk), the executor is closed at once, which stops the cells still running."""
    from tbptt_bench.suites.jobs import CELL_STATUSES

    console = Console(stderr=True)
    show_bar = not quiet and console.is_terminal
    columns = (TextColumn(f"[bold]{suite.name}[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[counts]}"),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    results = executor.run(todo)
    with Progress(*columns, console=console, disable=not show_bar) as bar, contextlib.closing(results):  # type: ignore[type-var]
        job = bar.add_task("cells", total=len(todo), counts="")
        for result in results:
            store.commit(result.key, result.tables)
            counts[result.status] += 1
            done = sum(counts.values())
            bar.update(job, completed=done, counts=" ".join(f"{s} {counts[s]}" for s in CELL_STATUSES if counts[s]))
            line = cell_line(result, done, len(todo))
            if quiet or not show_bar:
                print(line, flush=True)
            elif result.status != "ok":
                bar.console.print(line, markup=False, highlight=False)


def _compact_on_the_way_out(store: ResultStore) -> None:
    """Merge what was committed before an interruption or a failure; if that fails too (the disk is still
    full), the parts stay committed and the next run compacts them, so the first error is the one reported."""
    try:
        store.compact()
    except Exception as exc:
        log.info("compaction left to the next run: %s", exc)


def summary(suite: Suite, cells: list[GridPoint], root: Path, after: dict[str, str], todo: list[GridPoint],
            counts: Counter[str], seconds: float) -> int:
    """Print what the run did and what the store holds; the exit status (1 when a cell failed or is missing)."""
    from tbptt_bench.suites.jobs import CELL_STATUSES

    ran = sum(counts.values())
    ran_now = {c.key for c in todo}
    stale = len(set(after) - {c.key for c in suite.cells})
    print(f"suite {suite.name}: {len(cells)} cells, store {root}")
    print(f"  ran {ran} in {seconds:.1f}s: " + ", ".join(f"{counts[s]} {s}" for s in CELL_STATUSES))
    print(f"  skipped {len(cells) - len(todo)} (already in the store)")
    if stale:
        print(f"  kept {stale} cells in the store that this suite no longer defines")
    failed = [c for c in cells if after.get(c.key) in FAILING]
    if failed:
        earlier = sum(1 for c in failed if c.key not in ran_now)
        print(f"  {len(failed)} cell{'s' if len(failed) != 1 else ''} failed"
              + " or timed out" * any(after.get(c.key) == "timeout" for c in failed)
              + (f" ({earlier} in earlier runs)" if earlier else "")
              + "; rerun them with --retry-failed; their errors are in the 'error' column")
        for cell in failed[:10]:
            print(f"    {cell.key}  {cell.label}")
    missing = {c.key for c in cells} - set(after)
    if missing:
        print(f"  {len(missing)} cells have no result", file=sys.stderr)
    return EXIT_FAILED_CELLS if failed or missing else 0
