"""Reports: loading a store, statistics, one module per section, rendering, figures (docs/reports.md).

The package itself stays light (the CLI builds its parser from it without pandas or matplotlib): the
choices the command line offers live here, everything else in the modules.
"""

#: Figure formats written besides the PNG the HTML embeds.
FORMATS = ("png", "svg", "pdf")
#: Comparison axes of learning results, and the curve column each reads.
AXES = {"tokens": "tokens", "compute": "compute_steps", "update": "n_updates", "wall": "wall_time"}
#: Paired tests across seeds.
TESTS = ("wilcoxon", "permutation")
