"""Artifact contracts: the Parquet schemas with the rules their rows obey, each defined once.

Every writer builds its artifact beside the destination and moves it into place only when it
is whole, so a failed run never leaves a complete-looking artifact behind. Every reader checks the
columns, their types and the row rules, so a file that breaks the contract is a one-line error.
(The Hessian store has its own module, ``stages.store``.)
"""

import contextlib
import json
import os
import shutil
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from stages.errors import RacError

_META_KEY = b"rac"

# What every generated sample records, in traces and in evaluation samples alike.
_GENERATION = [
    ("prompt", pa.string()),
    ("completion", pa.string()),
    ("n_prompt_tokens", pa.int32()),
    ("n_completion_tokens", pa.int32()),
    ("finish_reason", pa.string()),
    ("answer", pa.string()),
]


def generation_columns(
    prompt: str, completion: str, prompt_ids: list[int], completion_ids: list[int], finish_reason: str, answer: str
) -> dict[str, Any]:
    """The ``_GENERATION`` columns of one sample."""
    return {
        "prompt": prompt,
        "completion": completion,
        "n_prompt_tokens": len(prompt_ids),
        "n_completion_tokens": len(completion_ids),
        "finish_reason": finish_reason,
        "answer": answer,
    }


TRACES = pa.schema(
    [
        ("prompt_id", pa.int64()),
        ("sample_idx", pa.int32()),
        ("prompt_token_ids", pa.list_(pa.int32())),
        ("completion_token_ids", pa.list_(pa.int32())),
        *_GENERATION,
        ("correct", pa.bool_()),
    ]
)

CALIBRATION = pa.schema(
    [
        ("seq_id", pa.int64()),
        ("token_ids", pa.list_(pa.int32())),
        ("segment", pa.list_(pa.int8())),  # per token: 0 = prompt/text, 1 = decode
        ("source", pa.string()),
    ]
)

SAMPLES = pa.schema(
    [
        ("problem_id", pa.int64()),
        ("sample_idx", pa.int32()),
        *_GENERATION,
        ("extracted", pa.string()),
        ("correct", pa.bool_()),
        ("verdict", pa.string()),  # passed | wrong_answer | no_answer; code: runtime_error, timeout, limit, no_code too
    ]
)

# One row per (model, problem): e_t = ‖h_dense,t − h_model,t‖₂ of the final hidden state along the dense
# model's greedy rollout; positions < n_prompt_tokens are the prompt, the rest the decode.
ERRORS = pa.schema(
    [
        ("model", pa.string()),
        ("problem_id", pa.int64()),
        ("n_prompt_tokens", pa.int32()),
        ("token_ids", pa.list_(pa.int32())),
        ("errors", pa.list_(pa.float32())),
    ]
)

# One row per (pruner, linear, sparsity) of a loss table (stages/losses.py): the solver's own layer loss
# ½·tr(ΔW H ΔWᵀ) at that sparsity, and the linear's energy ½·tr(W H Wᵀ) (its loss if pruned whole).
LOSSES = pa.schema(
    [
        ("pruner", pa.string()),
        ("layer", pa.int32()),
        ("module", pa.string()),
        ("sparsity", pa.float64()),
        ("loss", pa.float64()),
        ("energy", pa.float64()),
    ]
)

SEGMENT_IDS = {"prompt": 0, "decode": 1}
# The calibration sources: the `source` column of CALIBRATION, a store's `source`, params `sources`.
SOURCES = ("generic", "prompt", "rac", "offpolicy")

# Row rules, by column name, for every schema that has the column. No value may be missing, except these.
_NULLABLE = ("extracted",)  # no answer found in the completion
_NON_EMPTY = ("token_ids", "prompt_token_ids")  # a sequence or prompt of no tokens feeds nothing
_TOKEN_IDS = ("token_ids", "prompt_token_ids", "completion_token_ids")  # ids >= 0 (the vocabulary bound is
# the model's: checked where a model reads them)
_SAME_LENGTH = (("token_ids", "segment"), ("token_ids", "errors"))
_COUNTS = (("n_prompt_tokens", "prompt_token_ids"), ("n_completion_tokens", "completion_token_ids"))


TMP_MARK = ".tmp-"


def tmp_sibling(dest: Path) -> Path:
    """A fresh hidden name beside ``dest`` that records this process (``rac clean`` removes it once that is gone)."""
    return dest.with_name(f".{dest.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def atomic_path(dest: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``dest``; move it onto ``dest`` only if the block succeeds."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_sibling(dest)
    try:
        yield tmp
        if dest.is_dir() and not dest.is_symlink():
            shutil.rmtree(dest)
        elif dest.exists() or dest.is_symlink():
            dest.unlink()
        os.replace(tmp, dest)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp)
        elif tmp.exists():
            tmp.unlink()


def write_parquet(rows: list[dict[str, Any]], schema: pa.Schema, path: Path, metadata: dict[str, Any]) -> None:
    """Write ``rows`` with ``schema`` and JSON ``metadata`` to ``path``, atomically."""
    table = pa.Table.from_pylist(rows, schema=schema)
    table = table.replace_schema_metadata({_META_KEY: json.dumps(metadata).encode()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_parquet(path: Path, schema: pa.Schema, what: str) -> tuple[pa.Table, dict[str, Any]]:
    """Read ``path``, check it has ``schema``'s columns and types; return the table and metadata."""
    path = Path(path)
    if not path.is_file():
        raise RacError(f"{what} file {str(path)!r} does not exist; run the stage that writes it first")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise RacError(f"{what} file {str(path)!r} is not readable Parquet ({err}); rebuild it") from err
    got = {f.name: f.type for f in table.schema}
    bad = [f"{f.name}:{f.type}" for f in schema if got.get(f.name) != f.type]
    if bad:
        raise RacError(f"{what} file {str(path)!r} lacks columns {bad}; it was not written by this rac version")
    table = table.select(schema.names)
    bad_rule = _broken_rule(table)
    if bad_rule:
        raise RacError(f"{what} file {str(path)!r} breaks its contract: {bad_rule}; rebuild it with rac")
    raw = (table.schema.metadata or {}).get(_META_KEY)
    try:
        meta = json.loads(raw) if raw else {}
    except (ValueError, UnicodeDecodeError) as err:
        raise RacError(f"{what} file {str(path)!r} has unreadable metadata ({err}); rebuild it") from err
    if not isinstance(meta, dict):
        raise RacError(f"{what} file {str(path)!r} has metadata that is not a mapping; rebuild it")
    return table, meta


def _broken_rule(table: pa.Table) -> str | None:
    """The first row rule ``table`` breaks, in words; None when it keeps them all."""
    names = set(table.column_names)
    for name in (n for n in table.column_names if n not in _NULLABLE):
        column = table[name]
        if column.null_count or (pa.types.is_list(column.type) and pc.list_flatten(column).null_count):
            return f"column {name!r} has missing values"
    for name in (n for n in _NON_EMPTY if n in names):
        if table.num_rows and pc.min(pc.list_value_length(table[name])).as_py() == 0:
            return f"column {name!r} has an empty list"
    for name in (n for n in _TOKEN_IDS if n in names):
        values = pc.list_flatten(table[name])
        if len(values) and pc.min(values).as_py() < 0:
            return f"column {name!r} has negative token ids"
    for a, b in ((a, b) for a, b in _SAME_LENGTH if a in names and b in names):
        if not _all(pc.equal(pc.list_value_length(table[a]), pc.list_value_length(table[b]))):
            return f"columns {a!r} and {b!r} differ in length in some row"
    for count, ids in ((c, i) for c, i in _COUNTS if c in names and i in names):
        if not _all(pc.equal(pc.cast(table[count], pa.int32()), pc.list_value_length(table[ids]))):
            return f"column {count!r} disagrees with the length of {ids!r}"
    if "segment" in names:
        segments = pc.list_flatten(table["segment"])
        if not _all(pc.is_in(segments, pa.array(list(SEGMENT_IDS.values()), pa.int8()))):
            return f"column 'segment' has values other than {sorted(SEGMENT_IDS.values())}"
    return None


def _all(mask: pa.ChunkedArray | pa.Array) -> bool:
    """Whether every entry of a boolean array is true (an empty array is)."""
    return pc.all(mask).as_py() is not False


@contextlib.contextmanager
def numcodecs_quiet() -> Iterator[None]:
    """Silence zarr's note that numcodecs' Zstd is outside the v3 core spec: the store uses it on purpose."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3")
        yield
