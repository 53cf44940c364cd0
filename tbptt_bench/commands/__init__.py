"""Sub-commands of the ``tbptt-bench`` CLI: one module each, with ``add_parser`` and ``run``."""
