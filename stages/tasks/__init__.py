"""Benchmarks by name: the embedded arithmetic task, and math benchmarks read from ``benchmarks`` paths."""

from collections.abc import Callable

from stages.errors import RacError
from stages.tasks.arithmetic import Arithmetic
from stages.tasks.base import Problem, Task
from stages.tasks.math_benchmarks import MathBenchmark

# name -> the hub split read when its ``benchmarks`` path is a hub id
MATH_SPLITS = {"math500": "test", "aime25": "test", "openr1_math": "train"}
TASKS: dict[str, Callable[[str, dict[str, str]], Task]] = {
    "arithmetic": lambda _name, _paths: Arithmetic(),
    **{name: lambda name, paths: MathBenchmark(name, paths[name], MATH_SPLITS[name]) for name in MATH_SPLITS},
}


def check_task(name: str, paths: dict[str, str]) -> None:
    """One-line error for an unknown task, or a math benchmark without a path in ``benchmarks``."""
    if name not in TASKS:
        raise RacError(f"task={name!r} is unknown; choose one of {sorted(TASKS)}")
    if name in MATH_SPLITS and not paths.get(name):
        raise RacError(f"task={name!r} has no path; set benchmarks.{name} to a local .jsonl/.parquet file or hub id")


def get_task(name: str, paths: dict[str, str]) -> Task:
    """The task registered under ``name``; math benchmarks are read from ``paths[name]``."""
    check_task(name, paths)
    return TASKS[name](name, paths)


__all__ = ["Problem", "Task", "check_task", "get_task"]
