"""asv benchmarks of tbptt-bench, derived from the registries (see docs/regression.md).

Every benchmark class here takes its parameter grid from :mod:`asv_bench.grid`, which reads the task and
method-family registries when asv imports the suite, so a task or method family that a user registers
(``TBPTT_BENCH_PLUGINS``, entry points) is benchmarked without code changes.
"""
