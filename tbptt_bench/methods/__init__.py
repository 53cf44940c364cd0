"""Gradient methods: the spec grammar (``base``) and the families; importing this package registers them."""

from tbptt_bench.methods import adaptive, base, hybrid, randomised, schedules  # noqa: F401
