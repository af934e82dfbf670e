"""Fixed math benchmarks (MATH-500, AIME-25, a user's own) read from a local Parquet or JSONL file, graded by
math-verify.

Expected fields, one row per problem:

- MATH-500 (``HuggingFaceH4/MATH-500``, split ``test``): ``problem`` and ``answer`` (LaTeX such as
  ``\\frac{1}{2}`` or ``(3, \\frac{\\pi}{2})``); optionally ``solution`` (kept as the reference chain of
  thought), ``subject``, ``level``, ``unique_id``.
- AIME-25 (e.g. ``math-ai/aime25``, split ``test``): ``problem`` and ``answer`` (an integer, read as text);
  optionally ``id``.

Other fields are ignored. The prompt is the problem followed by the benchmark's ``instruction`` (DeepSeek-R1's
in params.yaml); the chat template is applied by the caller. The benchmark's extractor reads the answer (the
last ``\\boxed{…}`` by default), which math-verify compares with the gold answer.

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
from stages.tasks.base import Item

REQUIRED_FIELDS = ("problem", "answer")
EXPECTED_FIELDS = "problem, answer (MATH-500 may add solution, subject, level, unique_id; AIME-25 may add id)"
SUFFIXES = (".jsonl", ".parquet")
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


class MathFile:
    """The rows of a fixed benchmark, graded by math-verify."""

    def __init__(self, path: str, split: str) -> None:
        self.path = path
        rows = read_rows(path, split)
        for index, row in enumerate(rows):
            missing = [f for f in REQUIRED_FIELDS if f not in row]
            if missing:
                raise RacError(
                    f"benchmark file {path!r} row {index} lacks fields {missing}; expected fields: {EXPECTED_FIELDS}"
                )
        self._items = [
            Item(str(row["problem"]).strip(), str(row.get("solution") or ""), str(row["answer"]).strip())
            for row in rows
        ]
        self.size = len(self._items)

    def items(self, n: int, seed: int) -> list[Item]:
        """The first ``n`` problems of the permutation drawn with ``seed``: all of them when ``n`` is the size."""
        if n > self.size:
            raise RacError(
                f"n_problems={n} exceeds the {self.size} problems in {self.path!r}; lower "
                f"evaluate.n_problems (or rollout.n_prompts, analyze.n_problems) to at most {self.size}"
            )
        order = random.Random(seed).sample(range(self.size), n)
        return [self._items[i] for i in order]

    @staticmethod
    def grade(predicted: str, answer: str) -> bool:
        """Whether math-verify finds ``predicted`` equal to the gold ``answer``."""
        # Both sides go in as $…$: bare LaTeX is misread (3\sqrt{13} parses as 3). math-verify returns False on
        # its own errors and timeouts; its signal.alarm timeout makes it raise ValueError off the main thread.
        return bool(verify(parse(f"${answer}$"), parse(f"${predicted}$")))
