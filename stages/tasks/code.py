"""Code generation benchmarks in LiveCodeBench's format, graded by running the model's program in the sandbox.

Expected fields, one row per problem (``livecodebench/code_generation_lite`` and any file in its format, all
strings): ``question_content`` (``question_title`` optional), ``starter_code`` ("" for a stdin program),
``public_test_cases`` (JSON text of a list of ``{"input", "output", "testtype"}``, testtype ``stdin`` or
``functional``), ``private_test_cases`` (the same list as JSON text, or as base64 of zlib of a pickle of that JSON
text), and ``metadata`` (JSON text, ``{"func_name": ...}`` for a functional problem). A pickle is unpickled by
an unpickler that builds strings, numbers, lists and dicts only: any pickle that names a class or function
(which is how a pickle runs code) is refused with a one-line error.

The prompt is LiveCodeBench's for R1-style models (its lead sentence, the question, the format instruction and
the starter code in a fenced block), given as the user turn of the model's chat template. The program is the
text between the last two lines of the completion that hold a fence (LiveCodeBench's rule, whatever the
language tag). It runs with the standard-library names LiveCodeBench's harness preloads, once per test in a
fresh sandbox (``stages/sandbox.py``), public tests first, until the first test it fails. A stdin test passes
when the output's lines, stripped, equal the expected ones, or equal them token by token as exact decimals; a
functional test calls ``Solution().<func_name>`` (or the module's function) on the JSON values of the input's
lines and compares the JSON of the result.
"""

import base64
import binascii
import io
import json
import pickle
import random
import secrets
import zlib
from decimal import Decimal, InvalidOperation
from typing import Any, NamedTuple

from stages.errors import RacError
from stages.sandbox import Limits, Outcome
from stages.sandbox import run as run_sandboxed
from stages.tasks.base import Item
from stages.tasks.math_benchmarks import check_field, parse_json, read_rows

REQUIRED_FIELDS = ("question_content", "starter_code", "public_test_cases", "private_test_cases", "metadata")
# Every verdict a program can get, in the order the metrics list them.
VERDICTS = ("passed", "wrong_answer", "runtime_error", "timeout", "limit", "no_code")

LEAD = (
    "You will be given a question (problem specification) and will generate a correct Python program that "
    "matches the specification and passes all tests."
)
WITH_STARTER = (
    "You will use the following starter code to write the solution to the problem and enclose your code within "
    "delimiters."
)
WITHOUT_STARTER = (
    "Read the inputs from stdin solve the problem and write the answer to stdout (do not directly test on the "
    "sample inputs). Enclose your code within delimiters as follows. Ensure that when the python program runs, it "
    "reads the inputs, runs the algorithm and writes output to STDOUT."
)
# The names a program may use without importing them, as LiveCodeBench's harness preloads them.
MODULES = (
    "string re datetime collections heapq bisect copy math random statistics itertools functools operator io sys json"
).split()
PRELUDE = "\n".join(
    [*(f"from {m} import *" for m in MODULES), "from builtins import *", "from typing import *"]
    + [f"import {m}" for m in MODULES]
    + ["sys.setrecursionlimit(50000)", ""]
)


class Test(NamedTuple):
    """One test: the program's stdin (or the call's JSON arguments, one per line) and the expected output."""

    input: str
    output: str
    functional: bool


class Judgement(NamedTuple):
    """How one program fared on a problem's tests."""

    verdict: str  # one of VERDICTS
    passed: int  # tests passed before the first failure
    total: int


class _PlainUnpickler(pickle.Unpickler):
    """Builds only what needs no class or function: str, bytes, numbers, None, bools, lists, tuples and dicts."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"it names {module}.{name}")


# Decompressed private tests are at most this large (LiveCodeBench's largest are a few MB): a zlib bomb stops here.
MAX_TESTS_BYTES = 1 << 30
# What a malformed pickle raises besides UnpicklingError: opcodes on the wrong kind of object (AttributeError,
# TypeError, IndexError, KeyError), a memo index or length it cannot allocate (MemoryError), a truncated stream.
_PICKLE_ERRORS = (
    pickle.UnpicklingError,
    EOFError,
    ValueError,
    AttributeError,
    TypeError,
    IndexError,
    KeyError,
    OverflowError,
    MemoryError,
)


def _unpickle_tests(text: str, where: str) -> Any:
    """The value of base64(zlib(pickle(...))) ``text``, built only of plain values and inflated at most
    ``MAX_TESTS_BYTES``; a pickled text is read as JSON."""
    try:
        inflate = zlib.decompressobj()
        raw = inflate.decompress(base64.b64decode(text.encode(), validate=True), MAX_TESTS_BYTES)
    except (binascii.Error, zlib.error) as err:
        raise RacError(f"{where} is neither JSON nor base64 of zlib data ({err}); fix the benchmark file") from err
    if inflate.unconsumed_tail:
        raise RacError(f"{where} inflates past {MAX_TESTS_BYTES >> 20} MB; fix the benchmark file")
    try:
        value = _PlainUnpickler(io.BytesIO(raw)).load()
    except _PICKLE_ERRORS as err:
        detail = err if isinstance(err, pickle.UnpicklingError) else f"{type(err).__name__}: {err}"
        raise RacError(
            f"{where} holds a pickle that rac refuses to load ({detail}): only strings, "
            "numbers, lists and dicts are read, since unpickling anything else can run code; re-encode the tests "
            "as JSON"
        ) from err
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    return parse_json(value, f"{where}: the pickled text") if isinstance(value, str) else value


def decode_tests(text: str, where: str) -> list[dict[str, Any]]:
    """A test list stored as JSON text, or as base64(zlib(pickle(JSON text))) as LiveCodeBench stores private tests."""
    try:
        value: Any = json.loads(text)
    except json.JSONDecodeError:
        value = _unpickle_tests(text, where)
    except (ValueError, RecursionError) as err:  # an integer of over 4300 digits; nesting deeper than the stack
        raise RacError(
            f"{where} is JSON rac cannot read ({type(err).__name__}: {err}); fix the benchmark file"
        ) from err
    if not isinstance(value, list) or not all(
        isinstance(t, dict) and isinstance(t.get("input"), str) and isinstance(t.get("output"), str) for t in value
    ):
        raise RacError(f"{where} is not a list of tests with string input and output; fix the benchmark file")
    size = sum(len(t["input"]) + len(t["output"]) for t in value)  # a pickle may repeat one test by reference
    if size > MAX_TESTS_BYTES:
        raise RacError(
            f"{where} holds {size >> 20} MB of tests, over {MAX_TESTS_BYTES >> 20} MB; fix the benchmark file"
        )
    return value


def prompt_body(question: str, starter: str) -> str:
    """LiveCodeBench's R1-style prompt without its raw special tokens (the chat template adds the turn)."""
    if starter.strip():
        return f"{LEAD}\n\nQuestion: {question.strip()}\n\n{WITH_STARTER}\n```python\n{starter}\n```\n\n"
    return f"{LEAD}\n\nQuestion: {question.strip()}\n\n{WITHOUT_STARTER}\n```python\n# YOUR CODE HERE\n```\n\n"


class CodeFile:
    """The rows of a code benchmark; each Item's answer is the JSON of its tests and function name."""

    def __init__(self, path: str, split: str) -> None:
        self.path = path
        rows = read_rows(path, split)
        self._items = [self._item(row, index) for index, row in enumerate(rows)]
        self.size = len(self._items)

    def _item(self, row: dict[str, Any], index: int) -> Item:
        where = f"benchmark file {self.path!r} row {index}"
        missing = [f for f in REQUIRED_FIELDS if f not in row]
        if missing:
            raise RacError(f"{where} lacks fields {missing}; LiveCodeBench rows hold {list(REQUIRED_FIELDS)}")
        for field in ("question_content", "public_test_cases", "private_test_cases"):
            check_field(row[field], (str,), f"{where} {field}")
        check_field(row["starter_code"], (str, type(None)), f"{where} starter_code")
        check_field(row["metadata"], (str, dict), f"{where} metadata")
        tests = [
            *decode_tests(row["public_test_cases"], f"{where} public_test_cases"),
            *decode_tests(row["private_test_cases"], f"{where} private_test_cases"),
        ]
        metadata = (
            parse_json(row["metadata"], f"{where} metadata") if isinstance(row["metadata"], str) else row["metadata"]
        )
        fn_name = metadata.get("func_name") if isinstance(metadata, dict) else None
        if not tests:
            raise RacError(f"{where} has no tests; a problem needs public or private test cases")
        if any(t.get("testtype", "stdin") == "functional" for t in tests) and not fn_name:
            raise RacError(f"{where} has functional tests but no metadata func_name; fix the benchmark file")
        answer = json.dumps(
            {"fn_name": fn_name, "tests": [[t["input"], t["output"], t.get("testtype") == "functional"] for t in tests]}
        )
        return Item(prompt_body(row["question_content"], row["starter_code"] or ""), "", answer)

    def items(self, n: int, seed: int) -> list[Item]:
        """The first ``n`` problems of the permutation drawn with ``seed``."""
        if n > self.size:
            raise RacError(
                f"n_problems={n} exceeds the {self.size} problems in {self.path!r}; lower "
                f"evaluate.n_problems (or rollout.n_prompts) to at most {self.size}"
            )
        return [self._items[i] for i in random.Random(seed).sample(range(self.size), n)]

    @staticmethod
    def grade(predicted: str, answer: str) -> bool:
        """Code is graded by running it: see ``judge``."""
        raise RacError("a code benchmark is graded by running the programs in the sandbox (judge), not by text")


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.strip().split("\n")]


def _same_output(got: str, expected: str) -> bool:
    """LiveCodeBench's stdout comparison: stripped lines, each equal as text or token by token as decimals."""
    a, b = _lines(got), _lines(expected)
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        if x == y:
            continue
        try:
            if [Decimal(t) for t in x.split()] != [Decimal(t) for t in y.split()]:
                return False
        except InvalidOperation:
            return False
    return True


def _same_json(got: str, expected: str) -> bool:
    """Whether the printed result and the expected output are the same JSON value (tuples print as lists)."""
    try:
        return json.loads(got) == json.loads(expected)
    except json.JSONDecodeError:
        return False


def _call_program(code: str, fn_name: str, marker: str) -> str:
    """The program of a functional test: the model's code, then a call of ``fn_name`` on the JSON arguments read
    from stdin (one per line), its result printed as JSON after ``marker``."""
    target = "Solution()" if "class Solution" in code else "None"
    return (
        f"{PRELUDE}\n{code}\n\n"
        "_rac_args = [json.loads(_rac_line) for _rac_line in sys.stdin.read().split('\\n')]\n"
        f"_rac_owner = {target}\n"
        f"_rac_fn = getattr(_rac_owner, {fn_name!r}) if _rac_owner is not None else globals()[{fn_name!r}]\n"
        "_rac_result = _rac_fn(*_rac_args)\n"
        f"print({marker!r} + json.dumps(_rac_result))\n"
    )


def _failure(outcome: Outcome) -> str | None:
    """The verdict of a run that did not finish cleanly, or None."""
    if outcome.timed_out:
        return "timeout"
    if outcome.limit is not None:
        return "limit"
    if outcome.exit_code != 0:
        return "runtime_error"
    return None


def judge(code: str | None, answer: str, limits: Limits) -> Judgement:
    """Run ``code`` on every test of ``answer`` (CodeFile's JSON) until the first failure."""
    spec = json.loads(answer)
    tests = [Test(*t) for t in spec["tests"]]
    if code is None or not code.strip():
        return Judgement("no_code", 0, len(tests))
    for k, test in enumerate(tests):
        if test.functional:
            marker = f"\n<rac-result-{secrets.token_hex(8)}>"
            outcome = run_sandboxed(_call_program(code, spec["fn_name"], marker), test.input, limits)
            failed = _failure(outcome)
            if failed is None:
                printed = outcome.stdout.decode(errors="replace")
                if marker.strip() not in printed:
                    failed = "runtime_error"
                else:
                    failed = None if _same_json(printed.rsplit(marker.strip(), 1)[1], test.output) else "wrong_answer"
        else:
            outcome = run_sandboxed(f"{PRELUDE}\n{code}\n", test.input, limits)
            failed = _failure(outcome)
            if failed is None and not _same_output(outcome.stdout.decode(errors="replace"), test.output):
                failed = "wrong_answer"
        if failed is not None:
            return Judgement(failed, k, len(tests))
    return Judgement("passed", len(tests), len(tests))
