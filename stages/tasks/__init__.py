"""Benchmarks by name."""

from stages.tasks.arithmetic import Arithmetic
from stages.tasks.base import Problem, Task

TASKS: dict[str, type] = {"arithmetic": Arithmetic}


def get_task(name: str) -> Task:
    """The task registered under ``name``."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
    return TASKS[name]()


__all__ = ["Problem", "Task", "get_task"]
