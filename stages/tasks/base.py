"""What every task provides: problems, prompts, answer extraction and an exact grader."""

from dataclasses import dataclass
from typing import NamedTuple, Protocol

from stages.sandbox import Limits


class Item(NamedTuple):
    """A problem as its source holds it: text, reference chain of thought (may be empty), gold answer."""

    text: str
    solution: str
    answer: str


class Source(Protocol):
    """Where a kind of benchmark gets its problems and how it compares answers."""

    size: int | None  # problems in a fixed benchmark; None for an endless generator

    def items(self, n: int, seed: int) -> list[Item]:
        """``n`` problems drawn with ``seed``: a generator's seeds give disjoint streams in practice; a fixed
        benchmark gives the first ``n`` of its seeded permutation."""
        ...

    def grade(self, predicted: str, answer: str) -> bool:
        """Whether an extracted answer equals the gold ``answer``."""
        ...


@dataclass(frozen=True)
class Problem:
    """One problem: its text, the prompt (text plus the benchmark's instruction), the reference chain of
    thought, and the gold answer."""

    text: str
    prompt: str
    solution: str
    answer: str


@dataclass(frozen=True)
class BenchmarkSpec:
    """One entry of params ``benchmarks``: where the problems come from, and how an answer is asked for and read."""

    kind: str  # arithmetic | word_arithmetic (embedded generators) | math | code (a file or hub dataset)
    path: str | None  # math, code: a local .jsonl/.parquet or a hub id; generators: null
    split: str  # the split read when ``path`` is a hub id
    instruction: str  # appended to each problem on its own line; "" for none
    extractor: str  # boxed | hashes | last_number | regex (stages/tasks/answers.py)
    pattern: str | None  # the regex extractor's pattern: its first group (or whole match) of the last match


class Task(Protocol):
    """A benchmark: seeded problem sampling, answer extraction and grading."""

    name: str
    size: int | None  # problems in a fixed benchmark; None for an endless generator

    def problems(self, n: int, seed: int) -> list[Problem]:
        """``n`` problems drawn with ``seed``: a generator's seeds give disjoint streams in practice; a fixed
        benchmark gives the first ``n`` of its seeded permutation."""
        ...

    def extract_answer(self, completion: str) -> str | None:
        """The final answer written in ``completion``, or None if it has none the extractor can parse."""
        ...

    def is_correct(self, completion: str, answer: str) -> bool:
        """Whether the answer extracted from ``completion`` equals the gold ``answer``."""
        ...

    @property
    def sandboxed(self) -> bool:
        """Whether grading runs the completions' programs."""
        ...

    @property
    def verdict_names(self) -> tuple[str, ...]:
        """The verdicts ``verdicts`` gives."""
        ...

    def answer_text(self, answer: str) -> str:
        """The gold answer as samples and traces record it."""
        ...

    def verdicts(self, completions: list[str], answers: list[str], limits: Limits, workers: int) -> list[str]:
        """The verdict of each completion against its gold answer."""
        ...
