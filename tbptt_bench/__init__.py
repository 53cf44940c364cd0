"""tbptt-bench: gradient bias, cost and learning outcomes of truncated BPTT."""

__version__ = "0.1.0"
