"""Benchmarks by name: params ``benchmarks`` maps any name to a kind, a path, an instruction and an answer
extractor. Kinds: the embedded generators ``arithmetic`` and ``word_arithmetic``, ``math`` (a local
.jsonl/.parquet file or a hub dataset) and ``code`` (LiveCodeBench's format, graded in the sandbox)."""

import hashlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from stages.errors import RacError
from stages.sandbox import Limits
from stages.tasks.answers import extractor
from stages.tasks.arithmetic import Arithmetic
from stages.tasks.base import BenchmarkSpec, Problem, Source, Task
from stages.tasks.code import VERDICTS, CodeFile, Judgement, judge
from stages.tasks.math_benchmarks import MathFile
from stages.tasks.word_arithmetic import WordArithmetic

# kind -> its problem source; generators take no path
KINDS: dict[str, Callable[[BenchmarkSpec], Source]] = {
    "arithmetic": lambda _spec: Arithmetic(),
    "word_arithmetic": lambda _spec: WordArithmetic(),
    "math": lambda spec: MathFile(str(spec.path), spec.split),
    "code": lambda spec: CodeFile(str(spec.path), spec.split),
}
FILE_KINDS = ("math", "code")
# Verdicts of a benchmark graded on its extracted answer: "no_code" is a code program's "no_answer".
ANSWER_VERDICTS = ("passed", "wrong_answer", "no_answer")


class Benchmark:
    """A named benchmark: its source's problems with the instruction appended, graded on the extracted answer."""

    def __init__(self, name: str, spec: BenchmarkSpec) -> None:
        self.name, self.spec = name, spec
        self._extract = extractor(spec.extractor, spec.pattern, f"benchmarks.{name}")
        self._source = KINDS[spec.kind](spec)
        self.size = self._source.size

    def prompt(self, text: str) -> str:
        """``text`` followed by the instruction on its own line; ``text`` as is without an instruction."""
        return f"{text.strip()}\n{self.spec.instruction}" if self.spec.instruction else text

    def problems(self, n: int, seed: int) -> list[Problem]:
        """``n`` problems drawn with ``seed``, prompts carrying the instruction."""
        return [Problem(i.text, self.prompt(i.text), i.solution, i.answer) for i in self._source.items(n, seed)]

    def extract_answer(self, completion: str) -> str | None:
        """The answer the benchmark's extractor reads in ``completion``, or None."""
        return self._extract(completion)

    def is_correct(self, completion: str, answer: str) -> bool:
        """Whether the extracted answer equals the gold ``answer`` by the kind's comparison (not for code, whose
        programs run in the sandbox: ``verdicts``)."""
        predicted = self.extract_answer(completion)
        return predicted is not None and self._source.grade(predicted, answer)

    @property
    def sandboxed(self) -> bool:
        """Whether grading runs the completions' programs (in the sandbox)."""
        return self.spec.kind == "code"

    def answer_text(self, answer: str) -> str:
        """The gold answer as the samples record it: a code problem's tests by their digest (they can be MBs)."""
        return f"tests sha256:{hashlib.sha256(answer.encode()).hexdigest()[:16]}" if self.sandboxed else answer

    @property
    def verdict_names(self) -> tuple[str, ...]:
        """The verdicts ``verdicts`` gives, in the order the metrics list them."""
        return VERDICTS if self.sandboxed else ANSWER_VERDICTS

    def verdicts(self, completions: list[str], answers: list[str], limits: Limits, workers: int) -> list[str]:
        """The verdict of each completion: passed, wrong_answer or no_answer; for code, what its program did in the
        sandbox (``workers`` programs at a time, each within ``limits``)."""
        if not self.sandboxed:
            return [
                "no_answer" if self.extract_answer(c) is None else "passed" if self.is_correct(c, a) else "wrong_answer"
                for c, a in zip(completions, answers, strict=True)
            ]

        def one(pair: tuple[str, str]) -> Judgement:
            return judge(self.extract_answer(pair[0]), pair[1], limits)

        with ThreadPoolExecutor(max_workers=workers) as pool:
            return [j.verdict for j in pool.map(one, zip(completions, answers, strict=True))]


def normalized(text: str) -> str:
    """``text`` compared for overlap: case-folded, whitespace collapsed."""
    return " ".join(text.split()).casefold()


def calibration_problems(task: Task, n: int, seed: int, held_out: set[str], allow_overlap: bool) -> list[Problem]:
    """``n`` problems of ``task`` drawn with ``seed`` for calibration, none of whose normalized text is in
    ``held_out`` (the evaluation problems): a generator draws others in their place; a fixed benchmark refuses
    them with a one-line error unless ``allow_overlap``."""
    if allow_overlap:
        return task.problems(n, seed)
    if task.size is None:  # a seeded generator's first n + k problems extend its first n
        extra = 0
        while True:
            kept = [p for p in task.problems(n + extra, seed) if normalized(p.text) not in held_out]
            if len(kept) >= n:
                return kept[:n]
            extra += n - len(kept)
    drawn = task.problems(n, seed)
    clash = [p.text for p in drawn if normalized(p.text) in held_out]
    if clash:
        raise RacError(
            f"{len(clash)} of {len(drawn)} calibration problems of calib_task={task.name!r} are also evaluation "
            f"problems (first: {clash[0][:60]!r}); calibrate on another benchmark, or set allow_overlap: true"
        )
    return drawn


def check_benchmark(name: str, spec: BenchmarkSpec) -> None:
    """One-line error for an unknown kind, a file kind without a path, a generator with one, or a bad extractor."""
    where = f"benchmarks.{name}"
    if spec.kind not in KINDS:
        raise RacError(f"{where}.kind={spec.kind!r} is unknown; choose one of {sorted(KINDS)}")
    if spec.kind in FILE_KINDS and not spec.path:
        raise RacError(f"{where}.path is not set; point it at a local .jsonl/.parquet file or a hub id")
    if spec.kind not in FILE_KINDS and spec.path is not None:
        raise RacError(f"{where}.path={spec.path!r} is set but kind {spec.kind!r} generates its problems; set it null")
    extractor(spec.extractor, spec.pattern, where)


def check_task(name: str, benchmarks: dict[str, BenchmarkSpec], key: str = "task") -> None:
    """One-line error for a task name that ``benchmarks`` does not define."""
    if name not in benchmarks:
        raise RacError(f"{key}={name!r} is not in benchmarks; choose one of {sorted(benchmarks)} or add it there")


def get_task(name: str, benchmarks: dict[str, BenchmarkSpec]) -> Task:
    """The benchmark ``benchmarks[name]``."""
    check_task(name, benchmarks)
    check_benchmark(name, benchmarks[name])
    return Benchmark(name, benchmarks[name])


__all__ = [
    "ANSWER_VERDICTS",
    "Benchmark",
    "BenchmarkSpec",
    "Problem",
    "Task",
    "calibration_problems",
    "check_benchmark",
    "check_task",
    "get_task",
    "normalized",
]
