"""Benchmarks by name."""

from stages.errors import RacError
from stages.tasks.arithmetic import Arithmetic
from stages.tasks.base import Problem, Task

TASKS: dict[str, type] = {"arithmetic": Arithmetic}


def get_task(name: str) -> Task:
    """The task registered under ``name``."""
    if name not in TASKS:
        raise RacError(f"task={name!r} is unknown; choose one of {sorted(TASKS)}")
    return TASKS[name]()


__all__ = ["Problem", "Task", "get_task"]
