"""What every task provides: problems, prompts, an exact grader, and generic text."""

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Problem:
    """One problem: the prompt text, the reference chain of thought, and the gold answer."""

    prompt: str
    solution: str
    answer: str


class Task(Protocol):
    """A benchmark: seeded problem sampling, answer extraction and grading."""

    name: str
    size: int | None  # problems in a fixed benchmark; None for an endless generator

    def problems(self, n: int, seed: int) -> list[Problem]:
        """``n`` problems drawn with ``seed``: a generator's seeds give disjoint streams in practice; a fixed
        benchmark gives the first ``n`` of its seeded permutation."""
        ...

    def extract_answer(self, completion: str) -> str | None:
        """The final answer written in ``completion``, or None if there is none."""
        ...

    def is_correct(self, completion: str, answer: str) -> bool:
        """Whether ``completion`` ends with the gold ``answer``."""
        ...

    def generic_text(self, n_chars: int, seed: int) -> str:
        """Generic text in the model's vocabulary (the stand-in for C4)."""
        ...
