"""Tasks: the task interface and registry (``base``) and the built-ins, registered on import."""

from tbptt_bench.tasks import adding, base, charlm, copy, copystream, influence  # noqa: F401  (register the built-ins)
from tbptt_bench.tasks.adding import AddingTask
from tbptt_bench.tasks.base import TASKS, Baseline, Batch, Task, register_task
from tbptt_bench.tasks.charlm import CharLMTask
from tbptt_bench.tasks.copy import CopyTask

__all__ = ["TASKS", "AddingTask", "Baseline", "Batch", "CharLMTask", "CopyTask", "Task", "register_task"]
