"""Turn an ``asv compare`` (or ``asv continuous``) table into a pass/fail summary for CI logs.

asv flags a benchmark when it changed by more than one global ``--factor``. This project's figures
need different thresholds per kind, chosen by the prefix of the benchmark's function name (the longest
matching prefix wins):

* measured figures (``time_``, ``peakmem_``, ``track_gpu_``) fail when they got worse by at least their
  factor and asv did not mark the change as statistically insignificant (a ``~`` before the ratio);
* deterministic figures (the other ``track_`` benchmarks: gradient bias at fixed seeds and θ) fail when
  they changed in either direction by more than ``rtol · |before| + atol``: a change there is a change
  in what a method computes, never noise.

A benchmark that fails after the change (``failed``, or asv's ``!`` mark) fails the check; one whose
code changed (asv's ``x``: not comparable) or that was skipped (``n/a``) is listed and passes.

Run asv with ``--factor 1`` so that it marks every significant change and leaves the thresholds to
this script::

    asv compare --factor 1 BASE HEAD | python -m tbptt_bench.asv_compare -

Exit status: 0 pass, 1 a check failed, 2 bad input (no table, a malformed threshold). Only the standard
library is used, so the script runs in CI without installing torch.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from dataclasses import dataclass
from typing import Iterable, TextIO

from tbptt_bench.errors import UsageError


@dataclass(frozen=True)
class Rule:
    """How benchmarks whose function name starts with ``prefix`` are judged.

    ``factor`` set: a measured figure, failing when worse by at least that ratio. Otherwise a
    deterministic figure, failing when it moved by more than ``rtol · |before| + atol``.
    """

    prefix: str
    factor: float | None = None
    rtol: float = 0.0
    atol: float = 0.0

    @property
    def exact(self) -> bool:
        return self.factor is None

    def describe(self) -> str:
        return f"worse by ×{self.factor:g}" if self.factor is not None else f"changed by > {self.rtol:g}·|before| + {self.atol:g}"


#: Default thresholds. Timings on shared CI runners move by 10–20 % between runs; peak RSS less. The
#: bias figures are float64 at fixed seeds and agree to rounding, but asv's table may print them with
#: 6 significant digits (one unit there is at most 1e-5 relative), so rtol is 2e-5; atol covers values
#: that are zero up to rounding, such as full BPTT's.
DEFAULT_RULES: tuple[Rule, ...] = (
    Rule("time_", factor=1.3),
    Rule("peakmem_", factor=1.2),
    Rule("track_gpu_", factor=1.3),
    Rule("track_", rtol=2e-5, atol=1e-12),
)


@dataclass(frozen=True)
class Row:
    """One line of an asv comparison table."""

    mark: str
    before: str
    after: str
    ratio: str
    name: str

    @property
    def function(self) -> str:
        """The benchmark's function name: ``time_update`` in ``update.CPUUpdate.time_update('copy', 'full')``."""
        return self.name.split("(", 1)[0].strip().split(".")[-1]


@dataclass(frozen=True)
class Verdict:
    """The judgement of one row: ``ok``, ``fail``, ``skipped``, ``not comparable`` or ``unmatched``."""

    row: Row
    rule: Rule | None
    status: str
    detail: str


_SEPARATOR = re.compile(r"^\|[\s\-:|]+\|$")


def parse_table(lines: Iterable[str]) -> list[Row]:
    """Rows of every asv comparison table in ``lines`` (GitHub-style tables, as asv prints them)."""
    rows = []
    for line in lines:
        line = line.strip()
        if not line.startswith("|") or _SEPARATOR.match(line):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) != 5 or cells[0] == "Change":
            continue
        rows.append(Row(*cells))
    return rows


def rule_for(function: str, rules: Iterable[Rule]) -> Rule | None:
    """The rule with the longest prefix of ``function`` (None when no rule matches)."""
    matching = [r for r in rules if function.startswith(r.prefix)]
    return max(matching, key=lambda r: len(r.prefix)) if matching else None


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def judge(row: Row, rules: Iterable[Rule]) -> Verdict:
    """Apply the row's rule; see the module docstring for what passes."""
    rule = rule_for(row.function, rules)
    if row.after == "failed" or row.mark == "!":
        return Verdict(row, rule, "fail", "benchmark fails after the change")
    if row.mark == "x":
        return Verdict(row, rule, "not comparable", "benchmark code changed; no comparison")
    if "n/a" in (row.before, row.after) or row.before == "failed":
        return Verdict(row, rule, "skipped", f"{row.before} → {row.after}")
    if rule is None:
        return Verdict(row, None, "unmatched", "no threshold for this kind")
    if rule.exact:
        before, after = _number(row.before), _number(row.after)
        if before is None or after is None:
            raise UsageError(f"{row.name}: cannot read {row.before!r} → {row.after!r} as numbers for a "
                             f"deterministic threshold; give its prefix a --factor instead")
        moved = abs(after - before)
        limit = rule.rtol * abs(before) + rule.atol
        status = "fail" if moved > limit or math.isnan(moved) else "ok"
        return Verdict(row, rule, status, f"{before!r} → {after!r} (moved {moved:.3g}, allowed {limit:.3g})")
    ratio_text = row.ratio.lstrip("~")
    ratio = _number(ratio_text)
    if ratio is None:
        return Verdict(row, rule, "skipped", f"ratio {row.ratio}")
    insignificant = row.ratio.startswith("~")
    worse = ratio >= rule.factor and not insignificant  # type: ignore[operator]
    note = " (not significant)" if insignificant else ""
    return Verdict(row, rule, "fail" if worse else "ok",
                   f"{row.before} → {row.after}, ratio {ratio_text}{note}, limit ×{rule.factor:g}")


def report_verdicts(verdicts: list[Verdict], rules: Iterable[Rule], out: TextIO) -> bool:
    """Write the summary to ``out``; return whether every check passed."""
    failed = [v for v in verdicts if v.status == "fail"]
    for status in ("fail", "not comparable", "unmatched"):
        for v in (v for v in verdicts if v.status == status):
            out.write(f"{status.upper():<15} {v.row.name}: {v.detail}\n")
    out.write("\nper kind (compared / failed / skipped):\n")
    for rule in rules:
        mine = [v for v in verdicts if v.rule == rule]
        n_fail = sum(v.status == "fail" for v in mine)
        n_skip = sum(v.status == "skipped" for v in mine)
        out.write(f"  {rule.prefix + '*':<14} {len(mine) - n_skip:>4} / {n_fail:>3} / {n_skip:>3}   fails when {rule.describe()}\n")
    passed = not failed
    out.write(f"\n{'PASS' if passed else 'FAIL'}: {len(verdicts)} benchmarks, {len(failed)} failed checks\n")
    return passed


def parse_threshold(text: str, option: str) -> tuple[str, float]:
    """``PREFIX=VALUE`` → (prefix, value) with value > 0."""
    prefix, sep, value = text.partition("=")
    number = _number(value) if sep else None
    if not prefix or number is None or not number > 0:
        raise UsageError(f"malformed {option} {text!r}; expected PREFIX=NUMBER > 0, e.g. time_=1.3")
    return prefix, number


def build_rules(factors: list[str], rtols: list[str]) -> tuple[Rule, ...]:
    """The default rules with ``--factor``/``--rtol`` overrides (a new prefix adds a rule)."""
    rules = {r.prefix: r for r in DEFAULT_RULES}
    for text in factors:
        prefix, value = parse_threshold(text, "--factor")
        if value < 1:
            raise UsageError(f"--factor {text!r}: a factor is a ratio ≥ 1")
        rules[prefix] = Rule(prefix, factor=value)
    for text in rtols:
        prefix, value = parse_threshold(text, "--rtol")
        rules[prefix] = Rule(prefix, rtol=value, atol=rules[prefix].atol if prefix in rules else 0.0)
    return tuple(rules.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tbptt_bench.asv_compare",
        description="Pass/fail summary of an `asv compare --factor 1` (or `asv continuous`) output, "
                    "with thresholds per benchmark kind.")
    parser.add_argument("input", nargs="?", default="-", help="file with asv's output, or - for stdin")
    parser.add_argument("--factor", action="append", default=[], metavar="PREFIX=F",
                        help="measured kind: fail when worse by ratio ≥ F (defaults: time_=1.3, peakmem_=1.2, "
                             "track_gpu_=1.3)")
    parser.add_argument("--rtol", action="append", default=[], metavar="PREFIX=R",
                        help="deterministic kind: fail when it moves by more than R·|before| (default track_=2e-5)")
    args = parser.parse_args(argv)
    try:
        rules = build_rules(args.factor, args.rtol)
        if args.input == "-":
            text = sys.stdin.read()
        else:
            try:
                with open(args.input, encoding="utf-8") as fh:
                    text = fh.read()
            except OSError as exc:
                raise UsageError(f"cannot read {args.input}: {exc.strerror}") from None
        rows = parse_table(text.splitlines())
        if not rows and "NOT SIGNIFICANTLY CHANGED" not in text:
            raise UsageError(f"no asv comparison table in {args.input}; pipe in the output of `asv compare`")
        verdicts = [judge(row, rules) for row in rows]
    except UsageError as exc:
        print(f"asv_compare: error: {exc}", file=sys.stderr)
        return 2
    return 0 if report_verdicts(verdicts, rules, sys.stdout) else 1


if __name__ == "__main__":
    sys.exit(main())
