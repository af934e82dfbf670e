"""Artifact contracts: Parquet round trips and checks, and atomic writes."""

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages.errors import RacError
from stages.schemas import (
    CALIBRATION,
    SAMPLES,
    TRACES,
    atomic_path,
    read_parquet,
    write_parquet,
)

FINGERPRINT = "0123456789abcdef"

TRACE_ROWS = [
    {
        "prompt_id": 0,
        "sample_idx": 0,
        "prompt_token_ids": [1, 5, 6, 14, 7, 15, 18],
        "completion_token_ids": [9, 14, 10, 2],
        "prompt": "01+2=\n",
        "completion": "4+5",
        "n_prompt_tokens": 7,
        "n_completion_tokens": 4,
        "finish_reason": "stop",
        "answer": "3",
        "correct": False,
    },
    {
        "prompt_id": 1,
        "sample_idx": 1,
        "prompt_token_ids": [1, 7],
        "completion_token_ids": [],
        "prompt": "2",
        "completion": "",
        "n_prompt_tokens": 2,
        "n_completion_tokens": 0,
        "finish_reason": "length",
        "answer": "12",
        "correct": True,
    },
]
CALIBRATION_ROWS = [
    {"seq_id": 0, "token_ids": [1, 5, 6], "segment": [0, 0, 1], "source": "rac"},
    {"seq_id": 1, "token_ids": [1], "segment": [0], "source": "rac"},
]
SAMPLE_ROWS = [
    {
        "problem_id": 3,
        "sample_idx": 0,
        "prompt": "12+34=\n",
        "completion": "#### 46",
        "n_prompt_tokens": 8,
        "n_completion_tokens": 7,
        "finish_reason": "stop",
        "answer": "46",
        "extracted": "46",
        "correct": True,
        "verdict": "passed",
    },
    {
        "problem_id": 4,
        "sample_idx": 0,
        "prompt": "1+1=\n",
        "completion": "rambling",
        "n_prompt_tokens": 6,
        "n_completion_tokens": 8,
        "finish_reason": "length",
        "answer": "2",
        "extracted": None,
        "correct": False,
        "verdict": "no_answer",
    },
]


@pytest.mark.parametrize(
    ("schema", "rows"), [(TRACES, TRACE_ROWS), (CALIBRATION, CALIBRATION_ROWS), (SAMPLES, SAMPLE_ROWS)]
)
def test_parquet_round_trip(tmp_path: Path, schema: pa.Schema, rows: list[dict]) -> None:
    path = tmp_path / "sub" / "file.parquet"
    meta = {"model": "data/embedded", "seed": 3, "sampling": {"top_p": 0.95}}
    write_parquet(rows, schema, path, meta)
    table, got_meta = read_parquet(path, schema, "test")
    assert table.schema.equals(schema)
    assert table.to_pylist() == rows
    assert got_meta == meta
    assert sorted(p.name for p in path.parent.iterdir()) == ["file.parquet"]  # no temp file left beside it


def test_read_parquet_drops_extra_columns(tmp_path: Path) -> None:
    path = tmp_path / "c.parquet"
    table = pa.Table.from_pylist(CALIBRATION_ROWS, schema=CALIBRATION).append_column("extra", pa.array([1, 2]))
    pq.write_table(table, path)
    got, meta = read_parquet(path, CALIBRATION, "calibration")
    assert got.column_names == CALIBRATION.names
    assert meta == {}


def test_read_parquet_missing_column_names_file(tmp_path: Path) -> None:
    path = tmp_path / "traces.parquet"
    pq.write_table(pa.Table.from_pylist(TRACE_ROWS, schema=TRACES).drop_columns(["completion_token_ids"]), path)
    with pytest.raises(RacError, match=r"traces file .*traces\.parquet.*completion_token_ids"):
        read_parquet(path, TRACES, "traces")


def test_read_parquet_mistyped_column_names_file(tmp_path: Path) -> None:
    path = tmp_path / "calib.parquet"
    wrong = pa.schema([f if f.name != "segment" else pa.field("segment", pa.list_(pa.int64())) for f in CALIBRATION])
    pq.write_table(pa.Table.from_pylist(CALIBRATION_ROWS, schema=wrong), path)
    with pytest.raises(RacError, match=r"calib\.parquet.*segment"):
        read_parquet(path, CALIBRATION, "calibration")


def test_read_parquet_missing_file(tmp_path: Path) -> None:
    with pytest.raises(RacError, match=r"nope\.parquet.*does not exist"):
        read_parquet(tmp_path / "nope.parquet", SAMPLES, "samples")


def test_read_parquet_not_parquet(tmp_path: Path) -> None:
    path = tmp_path / "junk.parquet"
    path.write_text("not parquet")
    with pytest.raises(RacError, match=r"junk\.parquet"):
        read_parquet(path, SAMPLES, "samples")


def test_atomic_path_failure_leaves_nothing(tmp_path: Path) -> None:
    dest = tmp_path / "out.txt"
    with pytest.raises(RuntimeError, match="boom"), atomic_path(dest) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_failure_on_dir_leaves_nothing(tmp_path: Path) -> None:
    dest = tmp_path / "model"
    with pytest.raises(RuntimeError, match="boom"), atomic_path(dest) as tmp:
        tmp.mkdir()
        (tmp / "weights").write_text("half")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_replaces_existing_file_and_dir(tmp_path: Path) -> None:
    dest = tmp_path / "out.txt"
    dest.write_text("old")
    with atomic_path(dest) as tmp:
        tmp.write_text("new")
        assert dest.read_text() == "old"  # the old artifact stays until the new one is whole
    assert dest.read_text() == "new"
    directory = tmp_path / "model"
    directory.mkdir()
    (directory / "stale").write_text("old")
    with atomic_path(directory) as tmp:
        tmp.mkdir()
        (tmp / "fresh").write_text("new")
    assert sorted(p.name for p in directory.iterdir()) == ["fresh"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "out.txt"]
