"""Gradient methods: the spec grammar (``base``) and one module per family; importing this package
registers them."""

from tbptt_bench.methods import adaptive, base, hybrid, online, randomised, schedules, truncation  # noqa: F401
