"""The code benchmark kind on LiveCodeBench-format fixtures: decoding (a malicious pickle refused), prompts, the
program a completion holds, grading of hand-written solutions, and the evaluate stage's verdicts."""

import base64
import json
import pickle
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import save_tiny_qwen2

from stages import calibrate, evaluate, rollout
from stages.errors import RacError
from stages.params import load_params
from stages.sandbox import Limits
from stages.schemas import CALIBRATION, SAMPLES, TRACES, read_parquet
from stages.tasks import get_task
from stages.tasks.answers import last_code_block
from stages.tasks.base import BenchmarkSpec
from stages.tasks.code import VERDICTS, CodeFile, decode_tests, prompt_body

FIXTURES = Path(__file__).parent / "fixtures"
EASY = FIXTURES / "code_easy.jsonl"
LIMITS = Limits(wall_seconds=6, cpu_seconds=6, memory_mb=1024, processes=32, file_mb=8)
# Each problem of code_easy.jsonl carries a correct program (a field LiveCodeBench rows lack; the reader ignores it).
SOLUTIONS = {r["question_title"]: r["reference_solution"] for r in map(json.loads, EASY.read_text().splitlines())}
EASY_BENCHMARK = {
    "easy": {
        "kind": "code",
        "path": str(EASY),
        "split": "test",
        "instruction": "",
        "extractor": "last_code_block",
        "pattern": None,
    }
}


def _blob(value: object) -> str:
    return base64.b64encode(zlib.compress(pickle.dumps(value))).decode()


def _spec(path: Path) -> BenchmarkSpec:
    return BenchmarkSpec("code", str(path), "test", "", "last_code_block", None)


def test_private_tests_decode_from_json_and_from_their_blob() -> None:
    tests = [{"input": "1\n", "output": "2\n", "testtype": "stdin"}]
    assert decode_tests(json.dumps(tests), "t") == tests
    assert decode_tests(_blob(json.dumps(tests)), "t") == tests  # LiveCodeBench's layers: a pickled JSON string
    assert decode_tests(_blob(tests), "t") == tests  # a pickled list of plain values is plain too


def test_a_malicious_pickle_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self) -> tuple:
            return (exec, (f"open({str(marker)!r}, 'w').write('pwned')",))

    with pytest.raises(RacError, match=r"refuses to load \(it names builtins\.exec\)") as info:
        decode_tests(_blob(Evil()), "row 0 private_test_cases")
    assert "\n" not in str(info.value) and not marker.exists()
    # The shipped fixture holds such a blob: the whole benchmark is refused before any problem is used.
    with pytest.raises(RacError, match=r"code_malicious\.jsonl' row 0 private_test_cases holds a pickle"):
        CodeFile(str(FIXTURES / "code_malicious.jsonl"), "test")
    assert not Path("/tmp/rac-pwned").exists()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not base64 !", "neither JSON nor base64"),
        (base64.b64encode(zlib.compress(b"\x80\x04K")).decode(), "refuses to load"),  # a truncated pickle
        (_blob("not json"), "the pickled text is not JSON"),
        (json.dumps([{"input": 1, "output": "2"}]), "string input and output"),
        (json.dumps({"input": "1"}), "not a list of tests"),
    ],
)
def test_broken_test_lists_are_one_line(text: str, message: str) -> None:
    with pytest.raises(RacError, match=message):
        decode_tests(text, "row 3 private_test_cases")


def test_rows_missing_fields_or_func_name_are_refused(tmp_path: Path) -> None:
    row = json.loads(EASY.read_text().splitlines()[5])  # a functional problem
    for broken, message in (
        ({k: v for k, v in row.items() if k != "metadata"}, r"lacks fields \['metadata'\]"),
        (row | {"metadata": "{}"}, "functional tests but no metadata func_name"),
        (row | {"public_test_cases": "[]", "private_test_cases": "[]"}, "has no tests"),
    ):
        path = tmp_path / "bad.jsonl"
        path.write_text(json.dumps(broken) + "\n")
        with pytest.raises(RacError, match=message):
            CodeFile(str(path), "test")


def test_prompts_follow_livecodebench() -> None:
    stdin = prompt_body("Print 1.", "")
    assert stdin.startswith("You will be given a question (problem specification)")
    assert "Question: Print 1.\n\nRead the inputs from stdin" in stdin and "```python\n# YOUR CODE HERE\n```" in stdin
    starter = prompt_body("Add.", "class Solution:\n    def f(self):\n        ")
    assert "You will use the following starter code" in starter and "class Solution:" in starter


@pytest.mark.parametrize(
    ("completion", "code"),
    [
        ("<think>try ```x```</think>\n```python\nprint(1)\n```", "print(1)"),
        ("```\na = 1\n```\nthen\n```Python\nprint(2)\n```\ndone", "print(2)"),  # the last block, any tag
        ("no fences", None),
        ("```python\nprint(3)", None),  # unclosed
    ],
)
def test_the_program_is_the_last_fenced_block(completion: str, code: str | None) -> None:
    assert last_code_block(completion) == code


def test_hand_written_solutions_pass_and_wrong_ones_do_not() -> None:
    task = get_task("easy", {"easy": _spec(EASY)})
    problems = task.problems(task.size, 0)
    titles = {json.loads(line)["question_content"]: json.loads(line)["question_title"] for line in EASY.open()}
    by_title = {titles[next(q for q in titles if q in p.text)]: p for p in problems}
    assert sorted(by_title) == sorted(SOLUTIONS)
    completions = [f"Here it is:\n```python\n{SOLUTIONS[t]}\n```" for t in by_title]
    answers = [p.answer for p in by_title.values()]
    assert task.verdicts(completions, answers, LIMITS, 2) == ["passed"] * len(SOLUTIONS)
    # Every program answers the next problem's tests instead: none passes.
    shifted = completions[1:] + completions[:1]
    verdicts = task.verdicts(shifted, answers, LIMITS, 2)
    assert "passed" not in verdicts and set(verdicts) <= set(VERDICTS)
    assert task.verdicts(["I cannot code."], answers[:1], LIMITS, 1) == ["no_code"]
    assert task.answer_text(answers[0]).startswith("tests sha256:")


@pytest.fixture(scope="module")
def long_context_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with 1024 positions: a code prompt is ~590 characters, one token each."""
    return save_tiny_qwen2(tmp_path_factory.mktemp("long_context"), max_len=1024)


def test_evaluate_records_verdicts_and_isolation(
    tmp_path: Path, long_context_dir: Path, params_file: Callable[..., Path]
) -> None:
    """An untrained tiny model writes no program: every sample is no_code, counted in metrics.json."""
    overrides = {
        "task": "easy",
        "benchmarks": EASY_BENCHMARK,
        "evaluate": {"backend": "hf", "n_problems": 3, "max_new_tokens": 8},
    }
    p = load_params(params_file(long_context_dir, overrides))
    timings = evaluate.run(p, str(long_context_dir), tmp_path / "e")
    m = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert m["verdicts"] == dict.fromkeys(VERDICTS, 0) | {"no_code": 3} and m["accuracy"] == 0.0
    assert m["sandbox_isolation"] in ("namespaces", "user-namespaces", "none")
    table, _ = read_parquet(tmp_path / "e" / "samples.parquet", SAMPLES, "samples")
    assert table["verdict"].to_pylist() == ["no_code"] * 3
    assert timings["grading_seconds"] >= 0


def test_rac_calibrates_on_code_traces(
    tmp_path: Path, long_context_dir: Path, params_file: Callable[..., Path]
) -> None:
    """calib_task may be a code benchmark: its rollouts are graded in the sandbox and become a RAC calibration set."""
    overrides = {
        "calib_task": "easy",
        "benchmarks": EASY_BENCHMARK,
        "rollout": {"backend": "hf", "n_prompts": 4, "max_new_tokens": 16},
        "calibrate": {"budget_tokens": 1200},  # two traces: the prompts are ~590 characters, one token each
    }
    p = load_params(params_file(long_context_dir, overrides))
    traces, calib = tmp_path / "traces.parquet", tmp_path / "rac.parquet"
    rollout.run(p, traces, str(long_context_dir))
    table, meta = read_parquet(traces, TRACES, "traces")
    assert table.num_rows == 4 and meta["task"] == "easy"
    assert table["correct"].to_pylist() == [False] * 4  # an untrained model writes no program
    assert all(a.startswith("tests sha256:") for a in table["answer"].to_pylist())
    calibrate.run(p, "rac", traces, calib)
    rows, _ = read_parquet(calib, CALIBRATION, "calibration")
    segments = rows["segment"].to_pylist()
    assert sum(map(len, segments)) == 1200 and sum(s.count(1) for s in segments) > 0  # the decode tokens are in
