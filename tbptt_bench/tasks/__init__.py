"""Built-in tasks: importing this package registers copy, adding and char-lm."""

from tbptt_bench.tasks import adding, base, charlm, copy
from tbptt_bench.tasks import copystream  # noqa: F401  (registers copy-stream)
from tbptt_bench.tasks.adding import AddingTask
from tbptt_bench.tasks.base import Baseline, Batch, Task
from tbptt_bench.tasks.charlm import CharLMTask
from tbptt_bench.tasks.copy import CopyTask

__all__ = ["AddingTask", "Baseline", "Batch", "CharLMTask", "CopyTask", "Task", "adding", "base", "charlm", "copy"]
