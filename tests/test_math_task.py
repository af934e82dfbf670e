"""Fixed math benchmarks: loading MATH-500/AIME-25 files, their errors, boxed-answer extraction, math-verify grading."""

import dataclasses
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from stages.errors import RacError
from stages.params import load_params
from stages.tasks import BenchmarkSpec, get_task
from tests.conftest import SHIPPED_PARAMS

FIXTURES = Path(__file__).parent / "fixtures"
MATH500 = str(FIXTURES / "math500_tiny.jsonl")
AIME = str(FIXTURES / "aime_tiny.parquet")
SHIPPED = load_params(SHIPPED_PARAMS).benchmarks
INSTRUCTION = SHIPPED["math500"].instruction
PATHS = {
    "math500": dataclasses.replace(SHIPPED["math500"], path=MATH500),
    "aime25": dataclasses.replace(SHIPPED["aime25"], path=AIME),
}


def _math(path: str, **changes: str) -> dict[str, BenchmarkSpec]:
    return {"mine": dataclasses.replace(SHIPPED["math500"], path=path, **changes)}


def _write_jsonl(path: Path, rows: list[dict[str, object]]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_load_math500_jsonl() -> None:
    task = get_task("math500", PATHS)
    problems = sorted(task.problems(5, 0), key=lambda p: PROBLEM_ORDER.index(p.answer))
    assert task.name == "math500"
    assert task.size == 5
    assert [p.answer for p in problems] == PROBLEM_ORDER


PROBLEM_ORDER = [
    r"\left( 3, \frac{\pi}{2} \right)",
    r"\frac{\sqrt{3}}{2}",
    r"\frac{1}{2}",
    r"3\sqrt{13}",
    "[-2, 7]",
]


def test_math500_fields() -> None:
    problems = sorted(get_task("math500", PATHS).problems(5, 0), key=lambda p: PROBLEM_ORDER.index(p.answer))
    assert problems[2].prompt == "What is $\\frac{1}{4} + \\frac{1}{4}$?\n" + INSTRUCTION
    assert problems[3].solution.endswith(r"\boxed{3\sqrt{13}}$.")
    # Each reference solution's boxed answer grades correct against its own gold answer.
    task = get_task("math500", PATHS)
    assert all(task.is_correct(p.solution, p.answer) for p in problems)


def test_load_aime_parquet() -> None:
    problems = get_task("aime25", PATHS).problems(3, 0)
    assert sorted(p.answer for p in problems) == ["376", "400", "70"]  # int64 column, read as text
    assert any(p.prompt.startswith("Find the sum of all integer bases $b>9$") for p in problems)
    assert all(p.solution == "" for p in problems)  # AIME-25 ships no solutions


def test_prompt_ends_with_deepseek_instruction() -> None:
    assert INSTRUCTION == "Please reason step by step, and put your final answer within \\boxed{}."
    for problem in get_task("math500", PATHS).problems(5, 0):
        assert problem.prompt.endswith("\nPlease reason step by step, and put your final answer within \\boxed{}.")


def test_problems_are_a_seeded_permutation() -> None:
    task = get_task("math500", PATHS)
    everything = task.problems(5, 0)
    assert sorted(p.answer for p in everything) == sorted(PROBLEM_ORDER)  # each problem once
    assert task.problems(5, 0) == everything
    assert task.problems(2, 0) == everything[:2]
    assert any(task.problems(5, seed) != everything for seed in range(1, 5))
    assert task.problems(0, 0) == []


def test_too_many_problems() -> None:
    with pytest.raises(RacError, match=r"n_problems=6 exceeds the 5 problems in .*math500_tiny\.jsonl"):
        get_task("math500", PATHS).problems(6, 0)


def test_missing_path(tmp_path: Path) -> None:
    for path in (tmp_path / "nope.jsonl", tmp_path / "nope"):
        with pytest.raises(RacError, match=r"nope.*does not exist; pass a local \.jsonl or \.parquet file"):
            get_task("mine", _math(str(path)))


def test_unsupported_extension(tmp_path: Path) -> None:
    path = tmp_path / "math500.csv"
    path.write_text("problem,answer\n1+1,2\n")
    with pytest.raises(RacError, match=r"math500\.csv.*unsupported extension '\.csv'; convert it to \.jsonl or \.parq"):
        get_task("mine", _math(str(path)))


def test_wrong_fields(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "aime.jsonl", [{"problem": "p", "answer": "1"}, {"question": "q", "answer": "2"}])
    with pytest.raises(RacError, match=r"row 1 lacks fields \['problem'\]; expected fields: problem, answer"):
        get_task("mine", _math(path))


def test_invalid_json_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"problem": "p", "answer": "1"}\n\n{"problem": \n')
    with pytest.raises(RacError, match=r"line 3 of benchmark file .*bad\.jsonl.* is not JSON"):
        get_task("mine", _math(str(path)))


def test_hub_id_through_datasets(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [{"problem": "What is $1+1$?", "answer": "2", "unique_id": "x"}]
    calls = []

    def load_dataset(hub_id: str, split: str) -> list[dict[str, str]]:
        calls.append((hub_id, split))
        return rows

    monkeypatch.setitem(sys.modules, "datasets", SimpleNamespace(load_dataset=load_dataset))
    (problem,) = get_task("math500", SHIPPED).problems(1, 0)
    assert calls == [("HuggingFaceH4/MATH-500", "test")]
    assert problem.answer == "2"


def test_hub_id_without_datasets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(RacError, match=r"'HuggingFaceH4/MATH-500' is not a local file and `datasets` is not installed"):
        get_task("math500", SHIPPED)


def test_hub_unreachable(monkeypatch: pytest.MonkeyPatch) -> None:
    def load_dataset(hub_id: str, split: str) -> list[dict[str, str]]:
        raise ConnectionError("offline")

    monkeypatch.setitem(sys.modules, "datasets", SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(RacError, match=r"the hub failed \(offline\); download the benchmark .* pass its local path"):
        get_task("aime25", SHIPPED)


@pytest.mark.parametrize(
    ("completion", "extracted"),
    [
        (r"so the answer is $\boxed{\frac{\sqrt{3}}{2}}$.", r"\frac{\sqrt{3}}{2}"),
        (r"\boxed{x^{2}}", "x^{2}"),
        (r"first \boxed{3}, then \boxed{4}", "4"),  # the last box counts
        (r"\fbox{7}", "7"),
        (r"\boxed {5}", "5"),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),  # escaped braces are not grouping braces
        (r"\boxed{\left( 3, \frac{\pi}{2} \right)} done", r"\left( 3, \frac{\pi}{2} \right)"),
        (r"\boxed{}", ""),
        (r"\boxed{3} and then \boxed{\frac{1}{2}", None),  # truncated: the last box never closes
        ("the answer is 4", None),
        (r"\boxed 4", None),  # only braced boxes count
    ],
)
def test_extract_answer(completion: str, extracted: str | None) -> None:
    assert get_task("math500", PATHS).extract_answer(completion) == extracted


@pytest.mark.parametrize(
    ("completion", "gold", "correct"),
    [
        (r"$\boxed{0.5}$", r"\frac{1}{2}", True),
        (r"\boxed{\frac{1}{2}}", "0.5", True),
        (r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt{3}}{2}", True),
        (r"\boxed{\dfrac{1}{2}}", r"\frac{1}{2}", True),
        (r"\boxed{\sqrt{117}}", r"3\sqrt{13}", True),
        (r"\boxed{(3, \frac{\pi}{2})}", r"\left( 3, \frac{\pi}{2} \right)", True),
        (r"\boxed{(3, \frac{\pi}{3})}", r"\left( 3, \frac{\pi}{2} \right)", False),
        (r"\boxed{[-2,7]}", "[-2, 7]", True),
        (r"\boxed{(-2, 7)}", "[-2, 7]", False),  # an open interval is not the closed one
        (r"\boxed{3} ... no wait, \boxed{4}", "4", True),
        (r"\boxed{3} ... no wait, \boxed{4}", "3", False),
        ("<think>2+2 is 4</think> The answer is \\boxed{4}. Hope this helps!", "4", True),
        (r"\boxed{5}", "4", False),
        ("the answer is 4", "4", False),  # no boxed answer
        (r"\boxed{}", "4", False),
        (r"\boxed{070}", "70", True),
    ],
)
def test_is_correct(completion: str, gold: str, correct: bool) -> None:
    assert get_task("math500", PATHS).is_correct(completion, gold) is correct


def test_openr1_reads_the_train_split(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def load_dataset(hub_id: str, split: str) -> list[dict[str, str]]:
        calls.append((hub_id, split))
        return [{"problem": "p", "answer": "1", "solution": "s", "uuid": "u"}]

    monkeypatch.setitem(sys.modules, "datasets", SimpleNamespace(load_dataset=load_dataset))
    assert get_task("openr1_math", SHIPPED).size == 1
    assert calls == [("open-r1/OpenR1-Math-220k", "train")]


def test_unknown_benchmark() -> None:
    with pytest.raises(RacError, match=r"task='gsm8k' is not in benchmarks; choose one of \['aime25', 'math500'\]"):
        get_task("gsm8k", PATHS)


def test_own_benchmark_with_its_own_answer_format(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "mine.jsonl", [{"problem": "What is 6*7?", "answer": "42"}])
    task = get_task(
        "mine", _math(path, instruction="End with 'Answer: N'.", extractor="regex", pattern=r"Answer: (\S+)")
    )
    (problem,) = task.problems(1, 0)
    assert problem.prompt == "What is 6*7?\nEnd with 'Answer: N'."
    assert task.is_correct("6*7 is 42. Answer: 42", "42") and not task.is_correct(r"\boxed{42}", "42")
