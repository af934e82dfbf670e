"""Artifact contracts: Parquet round trips and checks, atomic writes, the Zarr Hessian store on disk."""

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zarr

from stages.errors import RacError
from stages.schemas import (
    CALIBRATION,
    SAMPLES,
    SCHEMA_VERSION,
    TRACES,
    HessianStore,
    HessianWriter,
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


def _sums(seed: int, d: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {s: rng.standard_normal((d, d)).astype(np.float32) for s in ("prompt", "decode")}


def _write_store(path: Path, chunk: int = 16) -> dict[tuple[int, str], tuple[list[str], dict, dict]]:
    """A store of 2 layers × 2 groups with d = 40 and 24; returns what was written."""
    written = {}
    writer = HessianWriter(path, model_id="tiny", fingerprint=FINGERPRINT, source="rac", chunk=chunk)
    for layer in range(2):
        for name, members, d in [
            ("self_attn.q_proj", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], 40),
            ("mlp.down_proj", ["mlp.down_proj"], 24),
        ]:
            xtx = _sums(10 * layer + d, d)
            counts = {"prompt": 7 + layer, "decode": 100 + d}
            writer.write_group(layer, name, members, xtx, counts)
            written[(layer, name)] = (members, xtx, counts)
    writer.finish()
    return written


def test_hessian_store_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "rac.zarr"
    written = _write_store(path)
    store = HessianStore(path, FINGERPRINT)
    assert store.attrs == {
        "schema_version": SCHEMA_VERSION,
        "model_id": "tiny",
        "model_fingerprint": FINGERPRINT,
        "source": "rac",
        "dtype": "float32",
        "complete": True,
    }
    groups = store.groups()
    assert [(g.layer, g.name) for g in groups] == sorted(written)
    for g in groups:
        members, xtx, counts = written[(g.layer, g.name)]
        assert g.key == f"layers/{g.layer}/{g.name}"
        assert g.members == members
        assert g.n_tokens == counts
        sums = store.sums(g)
        assert set(sums) == {"prompt", "decode"}
        for s in sums:
            assert sums[s].dtype == np.float32
            np.testing.assert_array_equal(sums[s], xtx[s])  # float32 in, float32 out: exact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rac.zarr"]


def test_hessian_writer_finish_replaces_existing_store(tmp_path: Path) -> None:
    path = tmp_path / "rac.zarr"
    _write_store(path)
    writer = HessianWriter(path, model_id="other", fingerprint=FINGERPRINT, source="prompt", chunk=8)
    writer.write_group(0, "mlp.down_proj", ["mlp.down_proj"], _sums(99, 8), {"prompt": 1, "decode": 0})
    writer.finish()
    store = HessianStore(path, FINGERPRINT)
    assert store.attrs["source"] == "prompt"
    assert [(g.layer, g.name) for g in store.groups()] == [(0, "mlp.down_proj")]


def test_hessian_store_refuses_other_fingerprint(tmp_path: Path) -> None:
    path = tmp_path / "rac.zarr"
    _write_store(path)
    with pytest.raises(RacError, match=r"rac\.zarr.*fingerprint"):
        HessianStore(path, "fedcba9876543210")


def test_hessian_store_refuses_missing(tmp_path: Path) -> None:
    with pytest.raises(RacError, match="does not exist"):
        HessianStore(tmp_path / "none.zarr", FINGERPRINT)


def test_hessian_store_refuses_unfinished_build_moved_into_place(tmp_path: Path) -> None:
    path = tmp_path / "rac.zarr"
    writer = HessianWriter(path, model_id="tiny", fingerprint=FINGERPRINT, source="rac", chunk=16)
    writer.write_group(0, "mlp.down_proj", ["mlp.down_proj"], _sums(0, 8), {"prompt": 1, "decode": 1})
    os.replace(writer.tmp, path)  # what a crash between the move and the final attr would leave
    with pytest.raises(RacError, match="incomplete"):
        HessianStore(path, FINGERPRINT)


def test_hessian_store_refuses_complete_false(tmp_path: Path) -> None:
    path = tmp_path / "rac.zarr"
    root = zarr.open_group(store=str(path), mode="w", zarr_format=3)
    root.attrs.update(
        {
            "schema_version": SCHEMA_VERSION,
            "model_id": "tiny",
            "model_fingerprint": FINGERPRINT,
            "source": "rac",
            "dtype": "float32",
            "complete": False,
        }
    )
    with pytest.raises(RacError, match="incomplete"):
        HessianStore(path, FINGERPRINT)


def test_hessian_store_refuses_other_schema_version(tmp_path: Path) -> None:
    path = tmp_path / "rac.zarr"
    _write_store(path)
    zarr.open_group(store=str(path), mode="r+", zarr_format=3).attrs["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(RacError, match="schema_version"):
        HessianStore(path, FINGERPRINT)


def test_hessian_writer_abort_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "rac.zarr"
    writer = HessianWriter(path, model_id="tiny", fingerprint=FINGERPRINT, source="rac", chunk=16)
    writer.write_group(0, "mlp.down_proj", ["mlp.down_proj"], _sums(0, 8), {"prompt": 1, "decode": 1})
    assert writer.tmp.is_dir()  # the build happens beside the destination, never at it
    assert not path.exists()
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_hessian_arrays_chunked_and_compressed(tmp_path: Path) -> None:
    path = tmp_path / "rac.zarr"
    _write_store(path, chunk=16)
    root = zarr.open_group(store=str(path), mode="r", zarr_format=3)
    for key, d in [("layers/0/self_attn.q_proj", 40), ("layers/1/mlp.down_proj", 24)]:
        for segment in ("prompt", "decode"):
            array = root[f"{key}/xtx_{segment}"]
            assert array.shape == (d, d)
            assert array.chunks == (16, 16)
            assert array.dtype == np.float32
            meta = json.loads((path / key / f"xtx_{segment}" / "zarr.json").read_text())
            assert meta["chunk_grid"]["configuration"]["chunk_shape"] == [16, 16]
            assert any("zstd" in codec["name"] for codec in meta["codecs"]), meta["codecs"]
            n_chunks = -(-d // 16)
            assert sum(1 for p in (path / key / f"xtx_{segment}" / "c").rglob("*") if p.is_file()) == n_chunks**2


def test_hessian_chunk_larger_than_d_is_one_chunk(tmp_path: Path) -> None:
    path = tmp_path / "rac.zarr"
    _write_store(path, chunk=1024)
    root = zarr.open_group(store=str(path), mode="r", zarr_format=3)
    assert root["layers/0/self_attn.q_proj/xtx_prompt"].chunks == (40, 40)
