"""Suites: suite files, grid points and jobs, the result store, executors (docs/suites.md).

The package itself stays light (the CLI builds its parser from it without pandas): the names of the
executors live here, everything else in the modules.
"""

#: Where cells run: ``local`` processes, or a ``ray`` cluster.
EXECUTORS = ("local", "ray")
