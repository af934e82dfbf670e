"""The embedded tasks: arithmetic's digit-by-digit CoT and exact grader, word problems, seeded problems, the
benchmark settings (instruction, extractor, kind), and calibration/evaluation overlap."""

import dataclasses
import random

import pytest

from stages.corpus import documents, word_sentences
from stages.errors import RacError
from stages.params import load_params
from stages.tasks import Benchmark, calibration_problems, check_benchmark, get_task, normalized
from stages.tasks.answers import extractor
from stages.tasks.arithmetic import ALPHABET, MAX_DIGITS, MIN_DIGITS, chain_of_thought
from tests.conftest import SHIPPED_PARAMS

MATH500 = str(SHIPPED_PARAMS.parent / "tests" / "fixtures" / "math500_tiny.jsonl")

BENCHMARKS = load_params(SHIPPED_PARAMS).benchmarks
TASK = get_task("arithmetic", BENCHMARKS)


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
        ("#### -46", "-46", "-46", True),
        ("####46", "46", None, False),  # `#### ` then the number, as the model was taught
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
        assert problem.prompt == problem.text == f"{a}+{b}=\n"  # no instruction: the model never saw one
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
def test_embedded_generic_text(n_chars: int, seed: int) -> None:
    text = word_sentences(n_chars, seed)
    assert len(text) >= n_chars
    assert set(text) <= set(ALPHABET)
    assert text == word_sentences(n_chars, seed)
    assert text != word_sentences(n_chars, seed + 1)
    assert documents("embedded", n_chars, seed) == [text]


def test_python_docs_corpus_is_real_prose() -> None:
    docs = documents("python-docs", 0, 0)
    assert len(docs) > 50 and sum(map(len, docs)) > 300_000  # the Python reference: ~465 KB on 3.11
    assert sorted(docs) == sorted(documents("python-docs", 0, 1)) and docs != documents("python-docs", 0, 1)
    assert any('The "if" statement is used for conditional execution' in d for d in docs)


def test_unknown_corpus_names_the_choices() -> None:
    with pytest.raises(RacError, match=r"generic_corpus='c4\.jsonl' is neither a built-in corpus \['embedded'"):
        documents("c4.jsonl", 10, 0)


def test_get_task() -> None:
    assert isinstance(get_task("arithmetic", BENCHMARKS), Benchmark)
    with pytest.raises(RacError, match=r"task='nope' is not in benchmarks; choose one of \['aime25', 'arithmetic'"):
        get_task("nope", BENCHMARKS)


def test_any_benchmark_name() -> None:
    mine = {"my_sums": BENCHMARKS["arithmetic"]}
    task = get_task("my_sums", mine)
    assert task.name == "my_sums" and task.problems(3, 0) == TASK.problems(3, 0)


def test_word_problems_are_seeded_and_gradeable() -> None:
    task = get_task("word_arithmetic", BENCHMARKS)
    problems = task.problems(300, 5)
    assert problems == task.problems(300, 5) and problems != task.problems(300, 6)
    assert all(p.prompt == f"{p.text}\nAnswer with the final number on the last line." for p in problems)
    assert all(int(p.answer) >= 0 and task.is_correct(p.solution, p.answer) for p in problems)
    assert task.is_correct("So she has 12.0 apples", "12") and not task.is_correct("12 apples, no 13", "12")
    assert task.extract_answer("She has 1,204 stamps.") == "1204"
    assert task.extract_answer("no digits here") is None


@pytest.mark.parametrize(
    ("name", "pattern", "text", "expected"),
    [
        ("boxed", None, r"so \boxed{\frac{1}{2}} and", r"\frac{1}{2}"),
        ("hashes", None, "work\n#### 1,234\n", "1234"),
        ("hashes", None, "#### 12 then more", None),
        ("last_number", None, "3 cats and -4.5 dogs", "-4.5"),
        ("regex", r"Answer: (\w+)", "Answer: x ... Answer: yes", "yes"),
        ("regex", r"\d+!", "1! 22!", "22!"),  # no group: the whole last match
        ("regex", r"Answer: (\w+)", "nothing", None),
    ],
)
def test_extractors(name: str, pattern: str | None, text: str, expected: str | None) -> None:
    assert extractor(name, pattern, "benchmarks.x")(text) == expected


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"kind": "prose"}, r"benchmarks.arithmetic.kind='prose' is unknown; choose one of \['arithmetic', 'code'"),
        (
            {"extractor": "regex", "pattern": "Answer: (\\w+"},
            r"benchmarks.arithmetic.pattern='Answer: \(\\\\w\+' does not compile \(missing \) at position",
        ),
        ({"extractor": "regex"}, r"benchmarks.arithmetic.pattern is not set; the regex extractor needs a pattern"),
        (
            {"extractor": "first_word"},
            r"benchmarks.arithmetic.extractor='first_word' is unknown; choose one of \['boxed'",
        ),
        ({"pattern": "x"}, r"benchmarks.arithmetic.pattern is set but extractor='hashes' ignores it"),
        ({"path": "x.jsonl"}, r"benchmarks.arithmetic.path='x.jsonl' is set but kind 'arithmetic' generates"),
        ({"kind": "math"}, r"benchmarks.arithmetic.path is not set; point it at a local .jsonl/.parquet"),
    ],
)
def test_bad_benchmark_settings(changes: dict[str, str], message: str) -> None:
    with pytest.raises(RacError, match=message):
        check_benchmark("arithmetic", dataclasses.replace(BENCHMARKS["arithmetic"], **changes))


def test_generator_calibration_skips_evaluation_problems() -> None:
    task = get_task("word_arithmetic", BENCHMARKS)
    held_out = {normalized(p.text) for p in task.problems(300, 1234)}
    drawn = task.problems(500, 0)
    fresh = [p for p in drawn if normalized(p.text) not in held_out]
    assert 0 < 500 - len(fresh) < 100  # small numbers: some problems recur by chance
    kept = calibration_problems(task, 500, 0, held_out, allow_overlap=False)
    assert len(kept) == 500 and not any(normalized(p.text) in held_out for p in kept)
    assert kept[: len(fresh)] == fresh  # the same stream, with others drawn in place of the clashes
    assert calibration_problems(task, 500, 0, held_out, allow_overlap=True) == drawn


def test_fixed_benchmark_overlap_is_refused() -> None:
    task = get_task("math500", {"math500": dataclasses.replace(BENCHMARKS["math500"], path=MATH500)})
    held_out = {normalized(p.text) for p in task.problems(2, 1234)}
    with pytest.raises(RacError, match=r"2 of 5 calibration problems of calib_task='math500' are also evaluation"):
        calibration_problems(task, 5, 0, held_out, allow_overlap=False)
    assert len(calibration_problems(task, 5, 0, held_out, allow_overlap=True)) == 5
    assert normalized("  What is\n$1+1$? ") == normalized("what IS $1+1$?")
