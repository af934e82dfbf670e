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

import pyarrow as pa
import pyarrow.parquet as pq
from math_verify import parse, verify

from stages.errors import RacError
from stages.tasks.base import Item

REQUIRED_FIELDS = ("problem", "answer")
EXPECTED_FIELDS = "problem, answer (MATH-500 may add solution, subject, level, unique_id; AIME-25 may add id)"
SUFFIXES = (".jsonl", ".parquet")
_HUB_ID_RE = re.compile(r"[\w.-]+/[\w.-]+")


def parse_json(text: str, where: str) -> Any:
    """``text`` as JSON; malformed, nested deeper than Python's stack, or with an integer of over 4300 digits
    (Python's limit): a one-line error naming ``where``."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise RacError(f"{where} is not JSON ({err.msg}, column {err.colno}); fix the benchmark file") from err
    except (ValueError, RecursionError) as err:
        raise RacError(
            f"{where} is JSON rac cannot read ({type(err).__name__}: {err}); fix the benchmark file"
        ) from err


def check_field(value: Any, types: tuple[type, ...], where: str) -> None:
    """``value`` is one of ``types`` (a bool is not an int); else a one-line error."""
    if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
        names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        raise RacError(f"{where}={shown} is a {type(value).__name__}, not {names}; fix the benchmark file")


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSONL file, skipping blank lines."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise RacError(f"benchmark file {str(path)!r} is not UTF-8 text (byte {err.start}); save it as UTF-8") from err
    except MemoryError as err:
        raise RacError(f"benchmark file {str(path)!r} does not fit in memory; split it or use Parquet") from err
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        row = parse_json(line, f"line {lineno} of benchmark file {str(path)!r}")
        if not isinstance(row, dict):
            raise RacError(f"line {lineno} of benchmark file {str(path)!r} is not a JSON object; fix the file")
        rows.append(row)
    return rows


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    """The rows of a Parquet file; a corrupt file, or one that does not fit in memory, is a one-line error."""
    try:
        return pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError, MemoryError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise RacError(f"benchmark file {str(path)!r} is not readable Parquet ({first}); fix or convert it") from err


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
    if local.is_dir():
        raise RacError(f"benchmark path {path!r} is a folder; point it at a .jsonl or .parquet file")
    if not local.exists():
        if local.suffix in SUFFIXES or not _HUB_ID_RE.fullmatch(path):
            raise RacError(f"benchmark path {path!r} does not exist; pass a local .jsonl or .parquet file")
        return _read_hub(path, split)
    if local.suffix == ".jsonl":
        return _read_jsonl(local)
    if local.suffix == ".parquet":
        return _read_parquet(local)
    raise RacError(
        f"benchmark path {path!r} has unsupported extension {local.suffix!r}; convert it to .jsonl or .parquet"
    )


class MathFile:
    """The rows of a fixed benchmark, graded by math-verify."""

    def __init__(self, path: str, split: str) -> None:
        self.path = path
        rows = read_rows(path, split)
        self._items = [self._item(row, index) for index, row in enumerate(rows)]
        self.size = len(self._items)

    def _item(self, row: dict[str, Any], index: int) -> Item:
        where = f"benchmark file {self.path!r} row {index}"
        missing = [f for f in REQUIRED_FIELDS if f not in row]
        if missing:
            raise RacError(f"{where} lacks fields {missing}; expected fields: {EXPECTED_FIELDS}")
        check_field(row["problem"], (str,), f"{where} problem")
        check_field(row["answer"], (str, int), f"{where} answer")  # AIME answers may be integers
        check_field(row.get("solution"), (str, type(None)), f"{where} solution")
        return Item(row["problem"].strip(), row.get("solution") or "", str(row["answer"]).strip())

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
