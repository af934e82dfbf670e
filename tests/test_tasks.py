"""The embedded arithmetic task: a correct digit-by-digit CoT, an exact grader, seeded problems, generic text."""

import random

import pytest

from stages.tasks import get_task
from stages.tasks.arithmetic import ALPHABET, MAX_DIGITS, MIN_DIGITS, Arithmetic, chain_of_thought

TASK = Arithmetic()


def _pairs(n: int, seed: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    return [(rng.randrange(10 ** rng.randint(0, 7)), rng.randrange(10 ** rng.randint(0, 7))) for _ in range(n)]


@pytest.mark.parametrize(("a", "b"), [*_pairs(300, 0), (0, 0), (999, 1), (1, 999), (99999, 99999), (10, 5)])
def test_chain_of_thought_answer_and_lines(a: int, b: int) -> None:
    cot = chain_of_thought(a, b)
    *lines, last = cot.split("\n")
    assert last == f"#### {a + b}"
    assert TASK.extract_answer(cot) == str(a + b)
    assert TASK.is_correct(cot, str(a + b))
    n_digits = max(len(str(a)), len(str(b)))
    final_carry = len(str(a + b)) > n_digits
    assert len(lines) == n_digits + final_carry
    # The running result on the last line is the answer, zero-padded to the number of lines.
    assert lines[-1].rsplit(" ", 1)[1] == str(a + b).zfill(len(lines))
    assert set(cot) <= set(ALPHABET)


def test_chain_of_thought_lines_are_digit_steps() -> None:
    assert chain_of_thought(12, 345) == "2+5+0=07 1+34 7\n1+4+0=05 +3 57\n0+3+0=03 + 357\n#### 357"
    assert chain_of_thought(95, 7).split("\n")[-2:] == ["0+0+1=01 + 102", "#### 102"]


@pytest.mark.parametrize(
    ("completion", "answer", "extracted", "correct"),
    [
        ("1+2+0=03 + 3\n#### 3", "3", "3", True),
        ("#### 46  \n\t", "46", "46", True),  # trailing whitespace is allowed
        ("#### 46\n", "46", "46", True),
        ("the answer is 46", "46", None, False),  # no ####
        ("#### 47", "46", "47", False),  # wrong number
        ("#### 046", "46", "046", False),  # exact string match, no numeric normalisation
        ("#### 46 because", "46", None, False),  # the answer must end the completion
        ("#### 12\n#### 46", "46", "46", True),  # the final #### counts
        ("#### 46\n#### 12", "46", "12", False),
        ("#### -46", "-46", None, False),
        ("####46", "46", None, False),
        ("", "0", None, False),
    ],
)
def test_extract_answer_and_is_correct(completion: str, answer: str, extracted: str | None, correct: bool) -> None:
    assert TASK.extract_answer(completion) == extracted
    assert TASK.is_correct(completion, answer) is correct


def test_problems_deterministic_per_seed() -> None:
    first = TASK.problems(50, 7)
    assert TASK.problems(50, 7) == first
    assert TASK.problems(50, 8) != first
    assert TASK.problems(10, 7) == first[:10]


def test_problems_are_well_formed() -> None:
    for problem in TASK.problems(200, 3):
        a, b = problem.prompt.removesuffix("=\n").split("+")
        assert problem.prompt == f"{a}+{b}=\n"
        assert MIN_DIGITS <= len(a) <= MAX_DIGITS and MIN_DIGITS <= len(b) <= MAX_DIGITS
        assert a[0] != "0" and b[0] != "0"
        assert problem.answer == str(int(a) + int(b))
        assert problem.solution == chain_of_thought(int(a), int(b))
        assert set(problem.prompt + problem.solution) <= set(ALPHABET)


def test_cot_several_times_longer_than_prompt() -> None:
    problems = TASK.problems(500, 0)
    ratio = sum(len(p.solution) for p in problems) / sum(len(p.prompt) for p in problems)
    assert ratio > 5  # measured ~8.8 with these operand lengths; a short CoT would make RAC moot
    assert all(len(p.solution) > 3 * len(p.prompt) for p in problems)


@pytest.mark.parametrize(("n_chars", "seed"), [(1, 0), (100, 1), (5000, 2)])
def test_generic_text(n_chars: int, seed: int) -> None:
    text = TASK.generic_text(n_chars, seed)
    assert len(text) >= n_chars
    assert set(text) <= set(ALPHABET)
    assert text == TASK.generic_text(n_chars, seed)
    assert text != TASK.generic_text(n_chars, seed + 1)


def test_get_task() -> None:
    assert isinstance(get_task("arithmetic", {}), Arithmetic)
    with pytest.raises(ValueError, match="'nope'"):
        get_task("nope", {})
