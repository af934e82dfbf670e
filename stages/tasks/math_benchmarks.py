"""Fixed math benchmarks (MATH-500, AIME-25) read from a local Parquet or JSONL file, graded by math-verify.

Expected fields, one row per problem:

- MATH-500 (``HuggingFaceH4/MATH-500``, split ``test``): ``problem`` and ``answer`` (LaTeX such as
  ``\\frac{1}{2}`` or ``(3, \\frac{\\pi}{2})``); optionally ``solution`` (kept as the reference chain of
  thought), ``subject``, ``level``, ``unique_id``.
- AIME-25 (e.g. ``math-ai/aime25``, split ``test``): ``problem`` and ``answer`` (an integer, read as text);
  optionally ``id``.

Other fields are ignored. The prompt is the problem followed by DeepSeek-R1's instruction; the chat
template is applied by the caller. A completion's answer is the content of its last ``\\boxed{…}`` or
``\\fbox{…}``, compared with the gold answer by math-verify.

- OpenR1-Math-220K (``open-r1/OpenR1-Math-220k``, split ``train``), the paper's calibration prompts:
  ``problem`` and ``answer``; its other fields are ignored.

``path`` may also be a hub id (``owner/name``), loaded with the optional ``datasets`` library.
"""

import json
import random
import re
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from math_verify import parse, verify

from stages.errors import RacError
from stages.tasks.base import Problem

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
REQUIRED_FIELDS = ("problem", "answer")
EXPECTED_FIELDS = "problem, answer (MATH-500 may add solution, subject, level, unique_id; AIME-25 may add id)"
SUFFIXES = (".jsonl", ".parquet")
_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_HUB_ID_RE = re.compile(r"[\w.-]+/[\w.-]+")


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSONL file, skipping blank lines."""
    rows = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise RacError(f"line {lineno} of benchmark file {str(path)!r} is not JSON ({e.msg}); fix the file") from e
    return rows


def _read_hub(hub_id: str, split: str) -> list[dict[str, Any]]:
    """The ``split`` of ``hub_id`` through the optional ``datasets`` library."""
    fix = "download the benchmark as Parquet or JSONL and pass its local path"
    try:
        import datasets
    except ImportError as e:
        raise RacError(f"benchmark path {hub_id!r} is not a local file and `datasets` is not installed; {fix}") from e
    try:
        return list(datasets.load_dataset(hub_id, split=split))
    except OSError as e:  # connection, offline-mode and not-found errors of datasets and huggingface_hub
        raise RacError(f"benchmark path {hub_id!r} is not a local file and the hub failed ({e}); {fix}") from e


def read_texts(path: str) -> list[str]:
    """The ``text`` field of every row of a generic corpus: a local C4 shard (``.jsonl`` or ``.parquet``)."""
    if not Path(path).is_file():  # never the hub: all of C4 is terabytes
        raise RacError(
            f"generic corpus {path!r} does not exist; download a C4 shard such as allenai/c4 "
            "en/c4-validation.00000-of-00008.json.gz, gunzip it to .jsonl, and set calibrate.generic_corpus to it"
        )
    rows = read_rows(path, "train")
    if rows and "text" not in rows[0]:
        raise RacError(
            f"generic corpus {path!r} rows lack a 'text' field (they have {sorted(rows[0])}); use a C4 shard"
        )
    return [str(row["text"]) for row in rows]


def read_rows(path: str, split: str) -> list[dict[str, Any]]:
    """The rows of the benchmark at ``path``: a local ``.jsonl`` or ``.parquet`` file, or ``split`` of a hub id."""
    local = Path(path)
    if not local.exists():
        if local.suffix in SUFFIXES or not _HUB_ID_RE.fullmatch(path):
            raise RacError(f"benchmark path {path!r} does not exist; pass a local .jsonl or .parquet file")
        return _read_hub(path, split)
    if local.suffix == ".jsonl":
        return _read_jsonl(local)
    if local.suffix == ".parquet":
        return pq.read_table(local).to_pylist()
    raise RacError(
        f"benchmark path {path!r} has unsupported extension {local.suffix!r}; convert it to .jsonl or .parquet"
    )


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{…}`` or ``\\fbox{…}`` with balanced braces, or None if absent or unclosed."""
    openers = list(_BOX_RE.finditer(text))
    if not openers:
        return None
    start = openers[-1].end()
    depth, i = 1, start
    while i < len(text):
        char = text[i]
        if char == "\\":  # skip the escaped character, so \{ and \} are not braces
            i += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[start:i]
        i += 1
    return None


class MathBenchmark:
    """A fixed benchmark, graded by math-verify on the last boxed answer."""

    def __init__(self, name: str, path: str, split: str) -> None:
        self.name, self.path = name, path
        rows = read_rows(path, split)
        for index, row in enumerate(rows):
            missing = [f for f in REQUIRED_FIELDS if f not in row]
            if missing:
                raise RacError(
                    f"benchmark file {path!r} row {index} lacks fields {missing}; expected fields: {EXPECTED_FIELDS}"
                )
        self._problems = [
            Problem(
                prompt=f"{str(row['problem']).strip()}\n{INSTRUCTION}",
                solution=str(row.get("solution") or ""),
                answer=str(row["answer"]).strip(),
            )
            for row in rows
        ]
        self.size = len(self._problems)

    def problems(self, n: int, seed: int) -> list[Problem]:
        """The first ``n`` problems of the permutation drawn with ``seed``: all of them when ``n`` is the size."""
        if n > self.size:
            raise RacError(
                f"n_problems={n} exceeds the {self.size} problems in {self.path!r}; lower "
                f"evaluate.n_problems (or rollout.n_prompts, analyze.n_problems) to at most {self.size}"
            )
        order = random.Random(seed).sample(range(self.size), n)
        return [self._problems[i] for i in order]

    def extract_answer(self, completion: str) -> str | None:
        """The content of the last ``\\boxed{…}`` in ``completion``, or None."""
        return last_boxed(completion)

    def is_correct(self, completion: str, answer: str) -> bool:
        """Whether the last boxed answer equals the gold ``answer`` according to math-verify."""
        pred = self.extract_answer(completion)
        if pred is None:
            return False
        # Both sides go in as $…$: bare LaTeX is misread (3\sqrt{13} parses as 3). math-verify returns False on
        # its own errors and timeouts; its signal.alarm timeout makes it raise ValueError off the main thread.
        return verify(parse(f"${answer}$"), parse(f"${pred}$"))

    def generic_text(self, n_chars: int, seed: int) -> str:
        """Refused: a fixed math benchmark ships no generic corpus."""
        raise RacError(
            f"calib_task={self.name!r} has no generic text, which the generic (C4) source needs; set "
            "calibrate.generic_corpus to a C4 shard (.jsonl/.parquet of `text`) or drop 'generic' from sources"
        )
