"""Tasks: one module per task (loader from hub or mirror; sst2 also ships with edgetune, prompt template, target, metric).
Classification tasks (sst2, qnli) score label words; generation tasks (squad, drop, dolly)
generate an answer and score it against references (edgetune.generation).

A task registers itself with `register_task`; stages look tasks up by `data.task`.
"""

from edgetune.tasks.base import (ClassificationTask, DataSource, GenerationTask, Task, get_task,
                                 register_task, resolve_mirror, resolve_source)
from edgetune.tasks import qnli, sst2  # noqa: F401  (register "qnli", "sst2")
from edgetune.tasks import dolly, drop, squad  # noqa: F401  (register "dolly", "drop", "squad")

__all__ = ["ClassificationTask", "DataSource", "GenerationTask", "Task", "get_task", "register_task",
           "resolve_mirror", "resolve_source"]
