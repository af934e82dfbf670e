"""The Zarr Hessian store on disk: round trip, and every damage a shared cache can suffer is refused."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stages.errors import RacError
from stages.models import LinearGroup
from stages.schemas import tmp_sibling
from stages.store import MANIFEST, SCHEMA_VERSION, HessianStore, HessianWriter, files_under

FINGERPRINT = "0123456789abcdef"
QKV = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
GROUPS = [LinearGroup(layer, members) for layer in range(2) for members in (QKV, ["mlp.down_proj"])]
DIMS = {"self_attn.q_proj": 40, "mlp.down_proj": 24}
N = {"prompt": 7, "decode": 100}


def _sums(seed: int, d: int) -> dict[str, np.ndarray]:
    """Symmetric float32 sums (the store keeps one triangle), as x·xᵀ sums are."""
    rng = np.random.default_rng(seed)
    out = {}
    for s in ("prompt", "decode"):
        A = rng.standard_normal((d, d)).astype(np.float32)
        out[s] = np.triu(A) + np.triu(A, 1).T
    return out


def _writer(path: Path, groups: list[LinearGroup] = GROUPS, chunk: int = 16) -> HessianWriter:
    return HessianWriter(
        tmp_sibling(path),
        model_id="tiny",
        fingerprint=FINGERPRINT,
        source="rac",
        chunk=chunk,
        n_tokens=N,
        groups=groups,
    )


def _write_store(path: Path, chunk: int = 16, groups: list[LinearGroup] = GROUPS) -> dict[str, dict]:
    """A store of 2 layers × 2 groups with d = 40 and 24; returns the sums written by group key."""
    written = {}
    writer = _writer(path, groups, chunk)
    for g in groups:
        xtx = _sums(10 * g.layer + DIMS[g.name], DIMS[g.name])
        writer.write_group(g.layer, g.name, g.members, xtx, N)
        written[f"layers/{g.layer}/{g.name}"] = xtx
    writer.seal()
    writer.publish(path)
    return written


def _read_all(path: Path) -> dict[str, dict[str, np.ndarray]]:
    store = HessianStore(path, FINGERPRINT, GROUPS)
    return {g.key: store.sums(g) for g in store.groups()}


def _chunks(path: Path) -> list[Path]:
    return sorted(p for p in (path / "layers").rglob("*") if p.is_file() and "/c/" in str(p))


def test_hessian_store_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "rac.zarr"
    written = _write_store(path)
    store = HessianStore(path, FINGERPRINT, GROUPS)
    assert {k: v for k, v in store.attrs.items() if k != "groups"} == {
        "schema_version": SCHEMA_VERSION,
        "model_id": "tiny",
        "model_fingerprint": FINGERPRINT,
        "source": "rac",
        "dtype": "float32",
        "n_tokens": N,
        "complete": True,
    }
    groups = store.groups()
    assert [g.key for g in groups] == sorted(written, key=lambda k: (int(k.split("/")[1]), k))
    for g in groups:
        assert g.n_tokens == N
        sums = store.sums(g)
        for s in sums:
            assert sums[s].dtype == np.float32
            np.testing.assert_array_equal(sums[s], written[g.key][s])  # float32 in, float32 out: exact
    store.verify()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rac.zarr"]  # nothing left beside it


def test_publish_replaces_existing_store(tmp_path: Path) -> None:
    path = tmp_path / "rac.zarr"
    _write_store(path)
    writer = _writer(path, GROUPS[:1], chunk=8)
    writer.write_group(0, QKV[0], QKV, _sums(99, 40), N)
    writer.seal()
    writer.publish(path)
    store = HessianStore(path, FINGERPRINT, GROUPS[:1])
    assert [g.key for g in store.groups()] == [f"layers/0/{QKV[0]}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rac.zarr"]


def test_refuses_other_fingerprint_missing_and_schema_version(tmp_path: Path) -> None:
    path = tmp_path / "rac.zarr"
    _write_store(path)
    with pytest.raises(RacError, match=r"rac\.zarr.*fingerprint"):
        HessianStore(path, "fedcba9876543210")
    with pytest.raises(RacError, match="does not exist"):
        HessianStore(tmp_path / "none.zarr", FINGERPRINT)
    zarr.open_group(store=str(path), mode="r+", zarr_format=3).attrs["schema_version"] = SCHEMA_VERSION - 1
    with pytest.raises(RacError, match="schema_version"):
        HessianStore(path, FINGERPRINT)


def test_refuses_a_sealed_build_moved_without_complete(tmp_path: Path) -> None:
    path = tmp_path / "rac.zarr"
    writer = _writer(path)
    for g in GROUPS:
        writer.write_group(g.layer, g.name, g.members, _sums(0, DIMS[g.name]), N)
    writer.seal()
    shutil.move(writer.build, path)  # what a kill between the move and the final attr would leave
    with pytest.raises(RacError, match="incomplete"):
        HessianStore(path, FINGERPRINT)


def test_seal_refuses_a_missing_group_and_wrong_token_counts(tmp_path: Path) -> None:
    writer = _writer(tmp_path / "a.zarr")
    for g in GROUPS[:3]:  # layer 1's MLP group never written
        writer.write_group(g.layer, g.name, g.members, _sums(0, DIMS[g.name]), N)
    with pytest.raises(RacError, match=r"lacks group 'layers/1/mlp.down_proj'"):
        writer.seal()
    writer.write_group(1, "mlp.down_proj", ["mlp.down_proj"], _sums(0, 24), {"prompt": 7, "decode": 99})
    with pytest.raises(RacError, match=r"saw tokens .* not the calibration's"):
        writer.seal()
    assert not (tmp_path / "a.zarr").exists()


def test_refuses_a_store_missing_a_whole_layer(tmp_path: Path) -> None:
    path = tmp_path / "rac.zarr"
    _write_store(path, groups=GROUPS[:2])  # a store for a 1-layer model
    with pytest.raises(RacError, match=r"does not hold exactly this model's input groups \(missing \['layers/1/"):
        HessianStore(path, FINGERPRINT, GROUPS)


def test_refuses_a_missing_chunk(tmp_path: Path) -> None:
    path = tmp_path / "rac.zarr"
    _write_store(path)
    _chunks(path)[3].unlink()  # zarr alone would read it as zeros
    with pytest.raises(RacError, match="damaged: missing files"):
        HessianStore(path, FINGERPRINT)


def test_refuses_overwritten_bytes_that_still_decode(tmp_path: Path) -> None:
    path = tmp_path / "rac.zarr"
    _write_store(path)
    chunk = _chunks(path)[0]
    raw = bytearray(chunk.read_bytes())
    raw[-3] ^= 0x01  # inside zstd's payload: may still decompress, to wrong floats
    chunk.write_bytes(bytes(raw))
    store = HessianStore(path, FINGERPRINT)  # same size: only the digest can tell
    with pytest.raises(RacError, match="does not match its digest"):
        for g in store.groups():
            store.sums(g)


def test_refuses_truncated_extra_files_and_edited_attrs(tmp_path: Path) -> None:
    path = tmp_path / "rac.zarr"
    _write_store(path)
    chunk = _chunks(path)[1]
    chunk.write_bytes(chunk.read_bytes()[:-4])
    with pytest.raises(RacError, match=r"has .* bytes, not"):
        HessianStore(path, FINGERPRINT)

    _write_store(path)
    (path / "layers" / "0" / QKV[0] / "xtx_decode" / "c" / "9").mkdir(parents=True)
    (path / "layers" / "0" / QKV[0] / "xtx_decode" / "c" / "9" / "9").write_bytes(b"\0" * 64)
    with pytest.raises(RacError, match="unexpected files"):
        HessianStore(path, FINGERPRINT)

    _write_store(path)
    zarr.open_group(store=str(path), mode="r+", zarr_format=3).attrs["n_tokens"] = {"prompt": 70, "decode": 100}
    with pytest.raises(RacError, match="attributes were changed"):
        HessianStore(path, FINGERPRINT)

    _write_store(path)
    (path / MANIFEST).unlink()
    with pytest.raises(RacError, match=r"has no manifest\.json"):
        HessianStore(path, FINGERPRINT)


def test_refuses_non_finite_sums(tmp_path: Path) -> None:
    """The writer refuses them before anything of the group is written; a reader refuses a store written
    around the writer (by hand, or by an older rac)."""
    path = tmp_path / "rac.zarr"
    writer = _writer(path, GROUPS[:1])
    xtx = _sums(0, 40)
    xtx["decode"][3, 5] = np.nan
    with pytest.raises(RacError, match=r"group 'layers/0/self_attn.q_proj' has non-finite decode sums"):
        writer.write_group(0, QKV[0], QKV, xtx, N)
    assert files_under(writer.build, "layers") == []
    writer.write_group(0, QKV[0], QKV, _sums(0, 40), N)
    writer.root[f"layers/0/{QKV[0]}/xtx_decode"][3, 5] = np.nan
    writer.seal()
    writer.publish(path)
    store = HessianStore(path, FINGERPRINT)
    with pytest.raises(RacError, match="non-finite"):
        store.sums(store.groups()[0])


def test_abort_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "rac.zarr"
    writer = _writer(path)
    writer.write_group(0, "mlp.down_proj", ["mlp.down_proj"], _sums(0, 24), N)
    assert writer.build.is_dir() and not path.exists()  # the build happens beside the destination, never at it
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_writer_reopens_a_partial_build_of_the_same_attrs_only(tmp_path: Path) -> None:
    build = tmp_path / "build.zarr"
    first = HessianWriter(
        build, model_id="tiny", fingerprint=FINGERPRINT, source="rac", chunk=16, n_tokens=N, groups=GROUPS
    )
    first.write_group(0, "mlp.down_proj", ["mlp.down_proj"], _sums(0, 24), N)
    record = first.digest_layers([0])
    again = HessianWriter(
        build, model_id="tiny", fingerprint=FINGERPRINT, source="rac", chunk=16, n_tokens=N, groups=GROUPS
    )
    assert again.verify(record)
    other = HessianWriter(
        build, model_id="tiny", fingerprint=FINGERPRINT, source="prompt", chunk=16, n_tokens=N, groups=GROUPS
    )
    assert not other.verify(record)  # another source's build is started afresh, never mixed in


def test_arrays_chunked_and_compressed(tmp_path: Path) -> None:
    path = tmp_path / "rac.zarr"
    _write_store(path, chunk=16)
    root = zarr.open_group(store=str(path), mode="r", zarr_format=3)
    for key, d in [(f"layers/0/{QKV[0]}", 40), ("layers/1/mlp.down_proj", 24)]:
        for segment in ("prompt", "decode"):
            array = root[f"{key}/xtx_{segment}"]
            assert array.shape == (d, d) and array.chunks == (16, 16) and array.dtype == np.float32
            meta = json.loads((path / key / f"xtx_{segment}" / "zarr.json").read_text())
            assert any("zstd" in codec["name"] for codec in meta["codecs"]), meta["codecs"]
            n_chunks = -(-d // 16)  # only the chunks on or above the diagonal are written
            written = sum(1 for p in (path / key / f"xtx_{segment}" / "c").rglob("*") if p.is_file())
            assert written == n_chunks * (n_chunks + 1) // 2
    _write_store(path, chunk=1024)
    assert zarr.open_group(store=str(path), mode="r")[f"layers/0/{QKV[0]}/xtx_prompt"].chunks == (40, 40)


def test_upper_triangle_only_and_no_array_for_an_empty_segment(tmp_path: Path) -> None:
    """A prompt-only source writes no decode arrays; an unsymmetric sum is read back as its upper triangle's."""
    path = tmp_path / "prompt.zarr"
    counts = {"prompt": 7, "decode": 0}
    writer = HessianWriter(
        tmp_sibling(path),
        model_id="tiny",
        fingerprint=FINGERPRINT,
        source="prompt",
        chunk=16,
        n_tokens=counts,
        groups=GROUPS[:1],
    )
    A = np.random.default_rng(0).standard_normal((40, 40)).astype(np.float32)  # [d, d], not symmetric
    writer.write_group(0, QKV[0], QKV, {"prompt": A}, counts)
    writer.seal()
    writer.publish(path)
    assert sorted(p.name for p in (path / "layers" / "0" / QKV[0]).iterdir()) == ["xtx_prompt", "zarr.json"]
    store = HessianStore(path, FINGERPRINT, GROUPS[:1])
    (group,) = store.groups()
    sums = store.sums(group)
    assert list(sums) == ["prompt"]
    np.testing.assert_array_equal(sums["prompt"], np.triu(A) + np.triu(A, 1).T)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict]]:
    path = tmp_path_factory.mktemp("pristine") / "rac.zarr"
    return path, _write_store(path, chunk=16)


DAMAGE = st.sampled_from(["delete", "flip", "truncate", "append", "zero"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(damage=st.lists(st.tuples(DAMAGE, st.integers(0, 10**6), st.integers(0, 10**6)), min_size=1, max_size=3))
def test_fuzz_damaged_store_is_refused_or_read_exactly(
    pristine: tuple[Path, dict[str, dict]], tmp_path_factory: pytest.TempPathFactory, damage: list
) -> None:
    """Any damage to any file (metadata, manifest, chunks): a one-line RacError, or the exact original sums."""
    source, written = pristine
    path = tmp_path_factory.mktemp("damaged") / "rac.zarr"
    shutil.copytree(source, path)
    files = sorted(p for p in path.rglob("*") if p.is_file())
    for kind, which, where in damage:
        file = files[which % len(files)]
        if not file.exists():
            continue
        raw = bytearray(file.read_bytes())
        if kind == "delete":
            file.unlink()
            continue
        if kind == "flip" and raw:
            raw[where % len(raw)] ^= 1 << (where % 8)
        elif kind == "truncate":
            raw = raw[: where % max(1, len(raw))]
        elif kind == "append":
            raw += b"\x00"
        elif kind == "zero" and raw:
            raw[where % len(raw)] = 0
        file.write_bytes(bytes(raw))
    try:
        got = _read_all(path)
    except RacError as err:
        assert "\n" not in str(err)
        return
    assert got.keys() == written.keys()
    for key, sums in written.items():
        for s, x in sums.items():
            np.testing.assert_array_equal(got[key][s], x)


def test_tmp_sibling_names_the_process(tmp_path: Path) -> None:
    sibling = tmp_sibling(tmp_path / "rac.zarr")
    assert sibling.parent == tmp_path and sibling.name.startswith(f".rac.zarr.tmp-{os.getpid()}-")
