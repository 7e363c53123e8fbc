"""Tasks: the built-in suite and user JSONL tasks, as lists of :class:`Example`."""

from lorafuse.tasks.builtin import BUILTIN_TASKS, builtin_suite
from lorafuse.tasks.example import Example, TaskSuite, load_jsonl, load_tasks, save_jsonl

__all__ = [
    "BUILTIN_TASKS",
    "Example",
    "TaskSuite",
    "builtin_suite",
    "load_jsonl",
    "load_tasks",
    "save_jsonl",
]
