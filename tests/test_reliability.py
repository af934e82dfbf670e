"""What rac refuses, and what it survives: each row of docs/reliability.md's table has its test here.

Refusals run the real CLI in-process and assert one stderr line, exit 2, and nothing written at --out.
Survivals kill or interrupt real `rac` processes and check that the rerun gives the store a fresh run gives.
"""

import base64
import dataclasses
import errno
import json
import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import ROOT, SHIPPED_PARAMS, assert_bad_input, save_tiny_qwen2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from stages import store as store_module
from stages.cli import main
from stages.errors import RacError
from stages.hessians import partial_dir, run
from stages.layers import LayerWalk, Skeleton
from stages.models import all_finite, fingerprint
from stages.params import SANDBOX_BOUNDS, load_params
from stages.sandbox import Limits
from stages.schemas import CALIBRATION, TRACES, read_parquet, tmp_sibling, write_parquet
from stages.store import HessianStore, HessianWriter
from stages.tasks import BenchmarkSpec, get_task
from stages.tasks.code import CodeFile, judge
from stages.workspace import build_lock, leftovers

RAC = [str(Path(sys.executable).parent / "rac")]


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _calibration(path: Path, n: int, length: int, seed: int = 0, **changes: Any) -> Path:
    rng = np.random.default_rng(seed)
    rows = [
        {
            "seq_id": i,
            "token_ids": [1, *rng.integers(4, 46, length - 1).tolist()],
            "segment": [0] * (length // 4) + [1] * (length - length // 4),
            "source": "rac",
        }
        for i in range(n)
    ]
    rows = [{**r, **changes} for r in rows]
    write_parquet(rows, CALIBRATION, path, {"source": "rac"})
    return path


def _invoke(*args: str) -> Any:
    return CliRunner().invoke(main, list(args))


def _fails_after_progress(result: Any, *needles: str) -> None:
    """Exit 2 and a one-line error as the last stderr line (progress bars of the work done may come before it)."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    last = result.stderr.splitlines()[-1]
    assert last.startswith("rac: error: ") and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in last, (needle, last)


# ---------------------------------------------------------------- params and presets


def _params_text(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "params.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


# A billion laughs in vllm.options: nine aliases per level, nine levels (9**9 strings once expanded).
_BOMB = "options:\n" + "\n".join(
    f"    l{i}: &l{i} [" + ", ".join([f"*l{i - 1}" if i else '"lol"'] * 9) + "]" for i in range(9)
)


@pytest.mark.parametrize(
    ("edit", "needles"),
    [
        (lambda t: t.replace("sparsity: 0.7", "sparsity: [0.7"), ("line", "column", "fix the YAML")),
        (lambda t: t + "sparsity: 0.5\n", ("duplicate key", "sparsity", "line")),
        (lambda t: t.replace("mix: {prompt: 1.0,", "mix: {prompt: lots,"), ("prune.mix.prompt='lots'", "float")),
        (lambda t: t.replace("overrides: {}", 'overrides: {"0-1": high}'), ("prune.overrides.0-1='high'",)),
        (lambda t: t.replace("damp: 0.01", "damp: 1e300"), ("prune.damp=1e+300", "(0, 1]")),
        (lambda t: t.replace("damp: 0.01", "damp: .nan"), ("prune.damp=nan", "finite")),
        (lambda t: t.replace("memory_gb: 4 ", "memory_gb: .inf "), ("activations.memory_gb=inf",)),
        (lambda t: t.replace("budget_tokens: 16384", "budget_tokens: 4294967296"), ("below 2**31",)),
        (lambda t: t.replace("sources: [generic, prompt, rac]", "sources: [rac, 5]"), ("sources[1]=5", "str")),
        (lambda t: t.replace("seed: 0\n", "seed: true\n", 1), ("toy.seed=True", "int")),
        (lambda t: t.replace("memory_mb: 2048 ", f"memory_mb: {10**30} "), (f"sandbox.memory_mb={10**30}", "outside")),
        (lambda t: t.replace("memory_mb: 2048 ", "memory_mb: 16 "), ("sandbox.memory_mb=16 is outside [128,",)),
        (lambda t: t.replace("wall_seconds: 6 ", "wall_seconds: 0.001 "), ("sandbox.wall_seconds=0.001",)),
        (lambda t: t.replace("n_problems: 200", f"n_problems: {10**12}"), ("evaluate.n_problems=10000", "1048576")),
        (
            lambda t: t.replace("n_prompts: 192", "n_prompts: 1000000").replace(
                "max_new_tokens: 256", "max_new_tokens: 4096", 1
            ),
            ("rollout: 1000000 completions × max_new_tokens=4096", "over the 2**31"),
        ),
        (lambda t: t.replace("chunk: 2048", "chunk: 1"), ("hessians.chunk=1 is below 16",)),
        (lambda t: t.replace("options: {}", _BOMB), ("uses the YAML alias *l0 at line 75, column 14",)),
        (lambda t: t.replace("options: {}", "options: &r {self: *r}"), ("alias *r at line 73, column 22",)),
    ],
    ids=[
        *("syntax", "duplicate", "mix-text", "overrides-text", "damp-huge", "damp-nan", "inf", "budget", "list"),
        *("bool", "sandbox-memory-huge", "sandbox-memory-tiny", "sandbox-wall-tiny", "n-problems-huge"),
        *("tokens-past-2**31", "chunk-1", "alias-bomb", "recursive-alias"),
    ],
)
def test_params_mistakes_are_one_line(in_tmp: Path, edit: Callable[[str], str], needles: tuple[str, ...]) -> None:
    params = _params_text(in_tmp, edit(SHIPPED_PARAMS.read_text()))
    assert_bad_input(_invoke("prune", "--params", str(params), "--hessians", "h.zarr", "--out", "out"), *needles)
    assert not (in_tmp / "out").exists()


def test_params_not_utf8(in_tmp: Path) -> None:
    params = _params_text(in_tmp, b"sparsity: 0.5\n\xff\xfe\n")
    assert_bad_input(_invoke("prune", "--params", str(params), "--hessians", "h", "--out", "o"), "not UTF-8", "byte 14")


@pytest.mark.parametrize(
    ("content", "needles"),
    [
        (b"sparsity: 0.5\nmodel: \xff\n", ("not UTF-8",)),
        (b"sparsity: [0.5\n", ("line 2", "fix the YAML")),
        (b"model: data/nowhere\n", ("data/nowhere", "does not exist")),
        (b"model: empty-model\n", ("empty-model", "no config.json")),
        (b"vllm:\n  options: &o {again: *o}\n", ("alias *o at line 2",)),
    ],
    ids=["not-utf8", "syntax", "missing-model", "broken-model", "recursive-alias"],
)
def test_bad_presets_leave_params_untouched(in_tmp: Path, content: bytes, needles: tuple[str, ...]) -> None:
    (in_tmp / "data").mkdir()
    (in_tmp / "empty-model").mkdir()
    params = _params_text(in_tmp, SHIPPED_PARAMS.read_bytes())
    preset = in_tmp / "preset.yaml"
    preset.write_bytes(content)
    assert_bad_input(_invoke("preset", "--params", str(params), str(preset)), *needles)
    assert params.read_bytes() == SHIPPED_PARAMS.read_bytes()
    assert sorted(p.name for p in in_tmp.iterdir()) == ["data", "empty-model", "params.yaml", "preset.yaml"]


_SHIPPED = yaml.safe_load(SHIPPED_PARAMS.read_text())
_JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.lists(st.integers(-3, 3), max_size=3),
    st.dictionaries(st.text(max_size=4), st.floats(-2, 2) | st.text(max_size=3), max_size=3),
)


def _paths(tree: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for key, value in tree.items():
        out.append((*prefix, key))
        if isinstance(value, dict):
            out += _paths(value, (*prefix, key))
    return out


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    edits=st.lists(
        st.tuples(st.sampled_from(_paths(_SHIPPED)), st.sampled_from(["set", "delete", "add"]), _JUNK),
        min_size=1,
        max_size=3,
    )
)
def test_fuzz_params_validation(tmp_path: Path, edits: list) -> None:
    """Any edit of params.yaml loads as valid Params or is a one-line RacError: never another exception."""
    raw = json.loads(json.dumps(_SHIPPED))
    for path, action, value in edits:
        node = raw
        for key in path[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            continue
        if action == "set":
            node[path[-1]] = value
        elif action == "delete":
            node.pop(path[-1], None)
        else:
            node[f"{path[-1]}_extra"] = value
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    try:
        p = load_params(params)
    except RacError as err:
        assert "\n" not in str(err)
        return
    assert 0 <= p.sparsity < 1 and 0 < p.prune.damp <= 1 and p.calibrate.budget_tokens < 2**31
    assert p.hessians.chunk >= 16 and p.evaluate.n_problems * p.evaluate.samples_per_problem <= 2**20
    assert 128 <= p.sandbox.memory_mb <= 2**20 and p.sandbox.wall_seconds <= 3600


# ---------------------------------------------------------------- model directories


def _broken_models(tiny: Path, root: Path) -> dict[str, tuple[Path, str]]:
    """Broken copies of the tiny model: name -> (directory, what the error must say)."""

    def copy(name: str) -> Path:
        out = root / name
        shutil.copytree(tiny, out)
        return out

    cases: dict[str, tuple[Path, str]] = {}
    (root / "empty").mkdir()
    cases["empty dir"] = (root / "empty", "no config.json")
    d = copy("no-config")
    (d / "config.json").unlink()
    cases["no config.json"] = (d, "no config.json")
    d = copy("bad-config")
    (d / "config.json").write_text("{not json")
    cases["invalid config.json"] = (d, "config.json is not valid JSON")
    d = copy("no-type")
    config = json.loads((d / "config.json").read_text())
    del config["model_type"]
    (d / "config.json").write_text(json.dumps(config))
    cases["config without model_type"] = (d, "no model_type")
    d = copy("no-weights")
    (d / "model.safetensors").unlink()
    cases["no weights"] = (d, "no *.safetensors weights")
    d = copy("empty-weights")
    (d / "model.safetensors").write_bytes(b"")
    cases["empty safetensors"] = (d, "truncated or not safetensors")
    d = copy("truncated")
    raw = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    cases["truncated safetensors"] = (d, "tensors need")
    d = copy("no-tokenizer")
    (d / "tokenizer.json").unlink()
    cases["no tokenizer.json"] = (d, "no tokenizer.json")
    d = copy("bad-tokenizer")
    (d / "tokenizer.json").write_text("[1, 2")
    cases["invalid tokenizer.json"] = (d, "tokenizer.json is not valid JSON")
    d = copy("a-file")
    shutil.rmtree(d)
    d.write_text("x")
    cases["a file"] = (d, "is a file")
    d = copy("missing-tensor")
    weights = load_file(d / "model.safetensors")
    del weights[next(k for k in weights if "down_proj" in k)]
    save_file(weights, d / "model.safetensors", metadata={"format": "pt"})
    cases["checkpoint missing a weight"] = (d, "lacks weights")
    d = copy("nan-weight")
    weights = load_file(d / "model.safetensors")
    name = next(k for k in weights if "layers.1.mlp.up_proj" in k)
    weights[name][3, 5] = float("nan")
    save_file(weights, d / "model.safetensors", metadata={"format": "pt"})
    cases["a NaN weight"] = (d, f"weight {name!r} in model.safetensors holds NaN")
    return cases


@pytest.fixture(scope="module")
def broken_models(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    return _broken_models(tiny_model_dir, tmp_path_factory.mktemp("broken"))


BROKEN = [
    "empty dir",
    "no config.json",
    "invalid config.json",
    "config without model_type",
    "no weights",
    "empty safetensors",
    "truncated safetensors",
    "no tokenizer.json",
    "invalid tokenizer.json",
    "a file",
    "checkpoint missing a weight",
    "a NaN weight",
]


@pytest.mark.parametrize(
    ("case", "stage"), [(c, s) for c in BROKEN for s in ("prune", "evaluate", "hessians", "rollout")]
)
def test_broken_model_directories_are_one_line(
    in_tmp: Path,
    params_file: Callable[..., Path],
    broken_models: dict[str, tuple[Path, str]],
    tiny_model_dir: Path,
    case: str,
    stage: str,
) -> None:
    """Every stage checks a model directory the same way before it loads anything: evaluate and rollout on vLLM
    (which would serve an absent weight as zeros, and exit 0), hessians and prune on the layer walk."""
    model, needle = broken_models[case]
    params = str(params_file(model))
    calib = _calibration(in_tmp / "calib.parquet", 2, 8)
    args = {
        "prune": ["prune", "--params", params, "--hessians", "h.zarr", "--out", "out"],
        "evaluate": ["evaluate", "--params", params, "--model", str(model), "--out", "out"],
        "hessians": ["hessians", "--params", params, "--calib", str(calib), "--out", "out"],
        "rollout": ["rollout", "--params", params, "--out", "out"],
    }[stage]
    assert_bad_input(_invoke(*args), needle, str(model))
    assert not (in_tmp / "out").exists() and not (in_tmp / ".rac").exists()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.float8_e4m3fn])
def test_all_finite_agrees_with_torch(dtype: torch.dtype) -> None:
    """The exponent-bit test of every weight: NaN, ±inf anywhere (a block boundary too) against the extremes."""
    info = torch.finfo(dtype)
    values = [info.max, -info.max, info.tiny, info.tiny / 4, 0.0, -0.0, 1.0]
    finite = torch.tensor(values, dtype=torch.float64).to(dtype)
    assert all_finite(finite.repeat(400_000))
    for bad in (float("nan"), float("inf"), float("-inf")):
        x = finite.repeat(400_000)
        x[1 << 20] = bad
        saturated = dtype == torch.float8_e4m3fn and abs(bad) == float("inf")  # it has no infinity: max instead
        assert bool(torch.isfinite(x[1 << 20].float())) == saturated
        assert all_finite(x) == saturated


def test_missing_relative_path_is_not_taken_for_a_hub_id(in_tmp: Path, params_file: Callable[..., Path]) -> None:
    (in_tmp / "models").mkdir()
    params = str(params_file("models/r1-pruned"))
    assert_bad_input(_invoke("rollout", "--params", params, "--out", "out"), "models/r1-pruned", "does not exist")


def test_unreachable_hub_id_is_one_line(
    in_tmp: Path, params_file: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as on a machine without the hub: no request leaves
    params = str(params_file("some-org/some-model"))
    assert_bad_input(_invoke("rollout", "--params", params, "--out", "out"), "some-org/some-model", "hub did not serve")


# ---------------------------------------------------------------- calibration and traces contracts


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"segment": [0, 2, 1, 1, 1, 1, 1, 1]}, "values other than [0, 1]"),
        ({"segment": [0, 1, 1]}, "differ in length"),
        ({"token_ids": [1, -4, 5, 6, 7, 8, 9, 10]}, "negative token ids"),
        ({"token_ids": [1, 4, 5, 6, 7, 8, 9, 10_000]}, "token id 10000, outside the model's"),
        ({"token_ids": [], "segment": []}, "empty list"),
    ],
    ids=["segment-2", "short-segment", "negative-id", "id-beyond-vocab", "empty"],
)
def test_calibration_that_breaks_the_contract(
    in_tmp: Path, params_file: Callable[..., Path], tiny_model_dir: Path, changes: dict, needle: str
) -> None:
    calib = _calibration(in_tmp / "calib.parquet", 3, 8, **changes)
    params = str(params_file(tiny_model_dir))
    assert_bad_input(_invoke("hessians", "--params", params, "--calib", str(calib), "--out", "h.zarr"), needle)
    assert not (in_tmp / "h.zarr").exists() and not (in_tmp / ".rac").exists()


@pytest.mark.parametrize("damage", ["truncated", "not parquet", "null row"])
def test_unreadable_calibration(
    in_tmp: Path, params_file: Callable[..., Path], tiny_model_dir: Path, damage: str
) -> None:
    calib = _calibration(in_tmp / "calib.parquet", 3, 8)
    if damage == "truncated":
        calib.write_bytes(calib.read_bytes()[:-40])
    elif damage == "not parquet":
        calib.write_text("seq_id,token_ids\n0,1 2 3\n")
    else:
        table = pq.read_table(calib)
        ids = pa.array([[1, 2], None, [3, 4]], pa.list_(pa.int32()))
        pq.write_table(table.set_column(1, "token_ids", ids), calib)
    params = str(params_file(tiny_model_dir))
    needle = "missing values" if damage == "null row" else "not readable Parquet"
    assert_bad_input(_invoke("hessians", "--params", params, "--calib", str(calib), "--out", "h.zarr"), needle)


def test_traces_whose_counts_disagree(in_tmp: Path, params_file: Callable[..., Path], tiny_model_dir: Path) -> None:
    row = {
        "prompt_id": 0,
        "sample_idx": 0,
        "prompt_token_ids": [1, 5, 6],
        "completion_token_ids": [7, 8],
        "prompt": "x",
        "completion": "y",
        "n_prompt_tokens": 3,
        "n_completion_tokens": 5,  # the ids say 2
        "finish_reason": "stop",
        "answer": "1",
        "correct": True,
    }
    traces = in_tmp / "traces.parquet"
    write_parquet([row], TRACES, traces, {})
    params = str(params_file(tiny_model_dir, {"calibrate": {"budget_tokens": 4}}))
    result = _invoke("calibrate", "--params", params, "--source", "rac", "--traces", str(traces), "--out", "c.parquet")
    assert_bad_input(result, "n_completion_tokens", "disagrees")
    assert not (in_tmp / "c.parquet").exists()


def test_huge_generic_budget_fails_up_front(
    in_tmp: Path, params_file: Callable[..., Path], tiny_model_dir: Path
) -> None:
    params = str(params_file(tiny_model_dir, {"calibrate": {"budget_tokens": 2**31 - 1}}))
    # Refused before any text is generated: it used to generate for hours.
    result = _invoke("calibrate", "--params", params, "--source", "generic", "--traces", "t", "--out", "c.parquet")
    assert_bad_input(result, "budget_tokens=2147483647", "GB in memory")
    assert not (in_tmp / "c.parquet").exists()


_CALIB_TYPES = {
    "seq_id": [pa.int64(), pa.int32(), pa.string()],
    "token_ids": [pa.list_(pa.int32()), pa.list_(pa.int64()), pa.list_(pa.string())],
    "segment": [pa.list_(pa.int8()), pa.list_(pa.int32())],
    "source": [pa.string(), pa.int64()],
}


@st.composite
def _calibration_tables(draw: st.DrawFn) -> pa.Table:
    n = draw(st.integers(0, 4))
    columns = {}
    for name, types in _CALIB_TYPES.items():
        if draw(st.integers(0, 9)) == 0:
            continue  # a missing column
        kind = draw(st.sampled_from(types))
        if pa.types.is_list(kind):
            item = st.integers(-3, 60) if not pa.types.is_string(kind.value_type) else st.text(max_size=2)
            values = [draw(st.none() | st.lists(st.none() | item, max_size=5)) for _ in range(n)]
        elif pa.types.is_string(kind):
            values = [draw(st.none() | st.text(max_size=3)) for _ in range(n)]
        else:
            values = [draw(st.none() | st.integers(-5, 5)) for _ in range(n)]
        columns[name] = pa.array(values, kind)
    return pa.table(columns) if columns else pa.table({"x": pa.array([1] * n)})


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(table=_calibration_tables(), cut=st.none() | st.integers(0, 4000))
def test_fuzz_parquet_reader(tmp_path: Path, table: pa.Table, cut: int | None) -> None:
    """Malformed rows, wrong dtypes, missing columns, truncated files: a valid table or a one-line RacError."""
    path = tmp_path / "calib.parquet"
    pq.write_table(table, path)
    if cut is not None:
        path.write_bytes(path.read_bytes()[:cut])
    try:
        got, _ = read_parquet(path, CALIBRATION, "calibration")
    except RacError as err:
        assert "\n" not in str(err)
        return
    for ids, seg in zip(got["token_ids"].to_pylist(), got["segment"].to_pylist(), strict=True):
        assert ids and len(ids) == len(seg) and min(ids) >= 0 and set(seg) <= {0, 1}
    assert got["seq_id"].null_count == 0 and got["source"].null_count == 0


# ---------------------------------------------------------------- stores at prune time


@pytest.fixture
def built_store(in_tmp: Path, params_file: Callable[..., Path], tiny_model_dir: Path) -> tuple[Path, Path]:
    params = params_file(tiny_model_dir, {"activations": {"batch_tokens": 256}, "hessians": {"chunk": 16}})
    run(load_params(params), _calibration(in_tmp / "calib.parquet", 4, 16), in_tmp / "rac.zarr", 1)
    return params, in_tmp / "rac.zarr"


def test_prune_refuses_a_store_missing_a_layer(built_store: tuple[Path, Path], tiny_model_dir: Path) -> None:
    params, store_path = built_store
    store = HessianStore(store_path, None)
    keep = [g for g in store.groups() if g.layer == 0]
    writer = HessianWriter(
        tmp_sibling(store_path),
        model_id=store.attrs["model_id"],
        fingerprint=store.attrs["model_fingerprint"],
        source="rac",
        chunk=16,
        n_tokens=store.n_tokens,
        groups=keep,
    )
    for g in keep:
        writer.write_group(g.layer, g.name, g.members, store.sums(g), g.n_tokens)
    writer.seal()
    writer.publish(store_path.with_name("one-layer.zarr"))
    result = _invoke("prune", "--params", str(params), "--hessians", "one-layer.zarr", "--out", "out")
    assert_bad_input(result, "does not hold exactly this model's input groups", "missing ['layers/1/")
    assert not Path("out").exists()


def test_prune_refuses_a_store_missing_a_chunk(built_store: tuple[Path, Path]) -> None:
    params, store_path = built_store
    next(p for p in (store_path / "layers" / "1").rglob("*") if p.is_file() and "/c/" in str(p)).unlink()
    result = _invoke("prune", "--params", str(params), "--hessians", str(store_path), "--out", "out")
    assert_bad_input(result, "damaged: missing files")
    assert not Path("out").exists()


def test_prune_mix_that_weighs_no_tokens(in_tmp: Path, params_file: Callable[..., Path], tiny_model_dir: Path) -> None:
    calib = _calibration(in_tmp / "calib.parquet", 3, 8, segment=[0] * 8)  # prompt tokens only
    params = params_file(tiny_model_dir, {"prune": {"mix": {"prompt": 0.0, "decode": 1.0}}})
    run(load_params(params), calib, in_tmp / "prompt.zarr", 1)
    result = _invoke("prune", "--params", str(params), "--hessians", "prompt.zarr", "--out", "out")
    assert_bad_input(result, "prune.mix", "weighs 0 tokens")
    assert not (in_tmp / "out").exists()


# ---------------------------------------------------------------- partial builds: locks, failures, clean


def test_a_second_build_of_the_same_inputs_is_refused(
    in_tmp: Path, params_file: Callable[..., Path], tiny_model_dir: Path
) -> None:
    params = params_file(tiny_model_dir)
    calib = _calibration(in_tmp / "calib.parquet", 3, 8)
    work = partial_dir(calib, load_params(params), fingerprint(str(tiny_model_dir)), in_tmp / "h.zarr")
    with build_lock(work):  # another build of these inputs is running
        result = _invoke("hessians", "--params", str(params), "--calib", str(calib), "--out", "h.zarr")
        assert_bad_input(result, "another Hessian build of these inputs", f"pid {os.getpid()}")
        assert work.is_dir()  # the running build's folder is left alone
    assert not (in_tmp / "h.zarr").exists()


def test_a_failed_build_removes_its_partial_build(
    in_tmp: Path, params_file: Callable[..., Path], tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure that is not the disk's (here an I/O error of the device) removes the partial build: its layers
    cannot be trusted. A full disk keeps them (`test_disk_faults_keep_the_finished_build`)."""

    def fail(*_args: object) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(HessianWriter, "seal", fail)
    params = params_file(tiny_model_dir)
    with pytest.raises(OSError, match="Input/output error"):
        run(load_params(params), _calibration(in_tmp / "calib.parquet", 3, 8), in_tmp / "h.zarr", 1)
    assert not (in_tmp / ".rac").exists() and not (in_tmp / "h.zarr").exists()


def _fault(monkeypatch: pytest.MonkeyPatch, where: str, out: Path) -> None:
    """Make the publish of a store at ``out`` fail as a full disk or a read-only folder would, at ``where``."""
    if where == "read-only out":  # the folder of --out refuses the staged build before anything moves

        def refuse(build: Path, dest: Path) -> Path:
            raise OSError(errno.EROFS, "Read-only file system", str(dest.parent))

        monkeypatch.setattr(store_module, "stage_beside", refuse)
    elif where == "disk full marking complete":  # after the build was moved beside --out

        def full(path: Path) -> None:
            raise OSError(errno.ENOSPC, "No space left on device", str(path / "zarr.json"))

        monkeypatch.setattr(store_module, "mark_complete", full)
    elif where == "disk full copying across filesystems":  # .rac and --out on two filesystems: a copy, not a rename
        real_rename, real_copytree = os.rename, shutil.copytree

        def rename(src: str | Path, dst: str | Path) -> None:
            if Path(src).name == "store.zarr":
                raise OSError(errno.EXDEV, "Invalid cross-device link", str(src))
            real_rename(src, dst)

        def copytree(src: Path, dst: Path, *args: Any) -> Path:
            copied = real_copytree(src, dst, *args)  # copytree recurses through this name for subfolders
            if Path(dst).parent == out.parent:  # the whole build is copied; the next block would not fit
                raise OSError(errno.ENOSPC, "No space left on device", str(dst))
            return copied

        monkeypatch.setattr(store_module.os, "rename", rename)
        monkeypatch.setattr(store_module.shutil, "copytree", copytree)
    else:  # the last rename, onto an old store at --out, is refused once
        real, calls = os.replace, []

        def replace(src: str | Path, dst: str | Path) -> None:
            if Path(dst) == out and not calls:
                calls.append(src)
                raise OSError(errno.EACCES, "Permission denied", str(dst))
            real(src, dst)

        monkeypatch.setattr(store_module.os, "replace", replace)


@pytest.mark.parametrize(
    "where",
    [
        "read-only out",
        "disk full marking complete",
        "disk full copying across filesystems",
        "refused rename onto an old store",
    ],
)
def test_disk_faults_keep_the_finished_build(
    in_tmp: Path, params_file: Callable[..., Path], tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """A disk or permission fault while publishing: one line, --out as it was (absent, or the old store), the sealed
    build kept; the rerun publishes it without a single forward pass and it equals a fresh build."""
    params = str(params_file(tiny_model_dir))
    calib = _calibration(in_tmp / "calib.parquet", 3, 8)
    out = in_tmp / "h.zarr"
    args = ["hessians", "--params", params, "--calib", str(calib), "--out", str(out)]
    forwards: list[int] = []
    real_forward = LayerWalk.forward
    monkeypatch.setattr(LayerWalk, "forward", lambda *a, **k: forwards.append(1) or real_forward(*a, **k))
    assert _invoke(*args[:-1], "fresh.zarr").exit_code == 0
    assert len(forwards) == 2  # the tiny model's two layers: the counter sees the walk
    if where.endswith("old store"):
        assert _invoke(*args[:4], str(_calibration(in_tmp / "old.parquet", 2, 8, seed=9)), *args[-2:]).exit_code == 0
        old = HessianStore(out, None).files
    with monkeypatch.context() as patch:
        _fault(patch, where, out)
        result = _invoke(*args)
    said = "Permission denied" if where.endswith("old store") else "cannot write"
    _fails_after_progress(result, said, "the finished layers are kept in", "the rerun resumes")
    work = partial_dir(calib, load_params(Path(params)), fingerprint(str(tiny_model_dir)), out)
    assert (work / "store.zarr" / "manifest.json").is_file()
    assert sorted(p.name for p in in_tmp.iterdir() if ".tmp-" in p.name) == []
    if where.endswith("old store"):
        assert HessianStore(out, None).files == old
    else:
        assert not out.exists()

    forwards.clear()
    rerun = _invoke(*args)
    assert rerun.exit_code == 0, rerun.output
    assert forwards == []
    _stores_identical(out, in_tmp / "fresh.zarr")
    assert not (in_tmp / ".rac").exists()


def test_a_full_disk_is_one_line_and_writes_nothing(in_tmp: Path, params_file: Callable[..., Path]) -> None:
    """A real fault, no mock: `rac` under RLIMIT_FSIZE (the kernel refuses any write past 64 bytes, as a full disk
    refuses the next block), writing its identity record."""
    params = params_file(ROOT / "data" / "embedded")

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (64, 64))

    result = subprocess.run(
        [*RAC, "model", "--params", str(params), "--out", "data/model/identity.json"],
        cwd=in_tmp,
        capture_output=True,
        text=True,
        preexec_fn=small_files,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        "rac: error: cannot write: File too large; free disk space or make the folder writable (or point --out "
        "elsewhere), then rerun"
    ]
    assert [p for p in (in_tmp / "data").rglob("*") if p.is_file()] == []


def test_clean_removes_what_dead_runs_left_and_keeps_running_ones(in_tmp: Path) -> None:
    subprocess.run(["git", "init", "-q"], cwd=in_tmp, check=True)
    partial = in_tmp / ".rac" / "partial"
    (partial / "stale").mkdir(parents=True)
    (partial / "stale" / "lock").write_text("123")
    (partial / "stale" / "progress.json").write_text("{}")
    dead = subprocess.Popen(["true"])
    dead.wait()
    (in_tmp / "data" / "hessians").mkdir(parents=True)
    stale_tmp = in_tmp / "data" / "hessians" / f".rac.zarr.tmp-{dead.pid}-0123abcd"
    stale_tmp.mkdir()
    live_tmp = tmp_sibling(in_tmp / "data" / "prune.json")
    live_tmp.write_text("{}")
    with build_lock(partial / "running"):
        dry = _invoke("clean", "--dry-run", "--root", str(in_tmp))
        assert dry.exit_code == 0 and "would remove" in dry.output and (partial / "stale").is_dir()
        result = _invoke("clean", "--root", str(in_tmp))
        assert result.exit_code == 0, result.output
        assert not (partial / "stale").exists() and not stale_tmp.exists()
        assert (partial / "running").is_dir() and live_tmp.exists()
        assert {(i.path.name, i.running) for i in leftovers(in_tmp)} == {("running", True), (live_tmp.name, True)}


# ---------------------------------------------------------------- kills and interrupts (real processes)

# Runs `rac ARGS` and SIGKILLs it right after (or, for "remove_build", right before) the named step.
KILL_DRIVER = """
import os, signal, sys
from stages import hessians, store
module, step = {"seal": (store.HessianWriter, "seal"), "stage_beside": (store, "stage_beside"),
                "mark_complete": (store, "mark_complete"), "remove_build": (hessians, "remove_build")}[sys.argv[1]]
original = getattr(module, step)
def killed(*args, **kwargs):
    if step != "remove_build":
        original(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
setattr(module, step, killed)
from stages.cli import main
main(sys.argv[2:])
"""


@pytest.fixture(scope="module")
def deep_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_qwen2(tmp_path_factory.mktemp("deep"), num_layers=4)


def _stores_identical(a: Path, b: Path) -> None:
    sa, sb = HessianStore(a, None), HessianStore(b, None)
    assert sa.files == sb.files  # same sizes and digests of every file: bitwise the same sums
    assert sa.n_tokens == sb.n_tokens and sa.specs == sb.specs


@pytest.mark.slow
@pytest.mark.parametrize("step", ["seal", "stage_beside", "mark_complete", "remove_build"])
def test_kill_at_each_step_of_the_finish_then_rerun(
    tmp_path: Path, params_file: Callable[..., Path], deep_model_dir: Path, step: str
) -> None:
    """Killed after sealing (before the move), after the move, after `complete`, after the swap into place:
    the out is never a wrong complete store, and the rerun ends with the store a clean run gives."""
    params = params_file(deep_model_dir, {"activations": {"batch_tokens": 256, "memory_gb": 0.0001}})
    calib = _calibration(tmp_path / "calib.parquet", 6, 24)
    args = ["hessians", "--params", str(params), "--calib", str(calib), "--out", "h.zarr"]
    subprocess.run([*RAC, *args[:-1], "fresh.zarr"], cwd=tmp_path, check=True, capture_output=True)

    killed = subprocess.run(
        [sys.executable, "-c", KILL_DRIVER, step, *args], cwd=tmp_path, capture_output=True, text=True
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    out = tmp_path / "h.zarr"
    if step == "remove_build":  # the store was already whole and in place; the partial build outlived it
        _stores_identical(out, tmp_path / "fresh.zarr")
        out_before = out.stat().st_mtime_ns
    else:
        assert not out.exists()

    rerun = subprocess.run([*RAC, *args], cwd=tmp_path, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    _stores_identical(out, tmp_path / "fresh.zarr")
    if step == "remove_build":
        assert out.stat().st_mtime_ns != out_before  # rebuilt from verified layers, not trusted blindly
    assert not (tmp_path / ".rac").exists()
    cleaned = _invoke("clean", "--root", str(tmp_path))  # a killed move leaves a staged sibling: clean takes it
    assert cleaned.exit_code == 0, cleaned.output
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_interrupt_exits_130_and_the_rerun_resumes(
    tmp_path: Path, params_file: Callable[..., Path], deep_model_dir: Path, sig: signal.Signals
) -> None:
    params = params_file(deep_model_dir, {"activations": {"batch_tokens": 512, "memory_gb": 0.001}})
    calib = _calibration(tmp_path / "calib.parquet", 600, 128, seed=5)
    args = ["hessians", "--params", str(params), "--calib", str(calib), "--out", "h.zarr"]
    work = partial_dir(calib, load_params(params), fingerprint(str(deep_model_dir)), tmp_path / "h.zarr")
    # A shell's background job inherits SIGINT ignored (POSIX), and Python keeps it ignored: give the build the
    # default disposition a terminal's foreground job has, whatever started this test.
    proc = subprocess.Popen(
        [*RAC, *args],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 300
    while not (work / "progress.json").is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the build ended before the signal was sent"
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert stderr.splitlines()[-1].startswith("rac: interrupted"), stderr
    assert "Traceback" not in stderr
    assert not (tmp_path / "h.zarr").exists() and (work / "progress.json").is_file()  # kept for the rerun

    resumed = subprocess.run([*RAC, *args], cwd=tmp_path, capture_output=True, text=True)
    assert resumed.returncode == 0 and "resuming" in resumed.stderr, resumed.stderr
    subprocess.run([*RAC, *args[:-1], "fresh.zarr"], cwd=tmp_path, check=True, capture_output=True)
    groups = Skeleton(str(deep_model_dir), torch.device("cpu")).groups()
    store = HessianStore(tmp_path / "h.zarr", fingerprint(str(deep_model_dir)), groups)
    fresh = HessianStore(tmp_path / "fresh.zarr", None)
    for g in store.groups():  # layers summed in another process: equal up to fp32 summation order
        for s, x in store.sums(g).items():
            np.testing.assert_allclose(x, fresh.sums(g)[s], rtol=1e-5, atol=1e-6 * np.abs(x).max())


# ---------------------------------------------------------------- silent wrong results


def test_sums_that_overflow_are_refused_before_the_store_is_sealed(
    in_tmp: Path, params_file: Callable[..., Path], tiny_model_dir: Path
) -> None:
    """Finite weights whose activations overflow float32 (a norm scaled by 1e25: x·xᵀ ~ 1e50): the build stops at
    the first non-finite sum, and neither a store nor a partial build is left to look complete."""
    model = in_tmp / "overflow"
    shutil.copytree(tiny_model_dir, model)
    weights = load_file(model / "model.safetensors")
    weights["model.layers.1.post_attention_layernorm.weight"] *= 1e25
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    params = str(params_file(model))
    calib = _calibration(in_tmp / "calib.parquet", 3, 8)
    result = _invoke("hessians", "--params", params, "--calib", str(calib), "--out", "h.zarr")
    _fails_after_progress(result, "group 'layers/1/mlp.gate_proj' has non-finite prompt sums", "nothing was stored")
    assert not (in_tmp / "h.zarr").exists() and not (in_tmp / ".rac").exists()


# ---------------------------------------------------------------- hostile benchmark files

_CODE_ROW = json.loads((ROOT / "tests" / "fixtures" / "code_easy.jsonl").read_text().splitlines()[0])


def _pickled(raw: bytes) -> str:
    return base64.b64encode(zlib.compress(raw)).decode()


def _bad_benchmark(folder: Path, case: str) -> tuple[str, Path]:
    """(kind, path) of a benchmark file broken as ``case`` says."""
    jsonl = folder / "bench.jsonl"
    rows: dict[str, tuple[str, Any]] = {
        "problem null": ("math", {"problem": None, "answer": "1"}),
        "answer a list": ("math", {"problem": "1+1?", "answer": [2]}),
        "row not an object": ("math", [1, 2]),
        "question_content a number": ("code", {**_CODE_ROW, "question_content": 7}),
        "pickle AttributeError": ("code", {**_CODE_ROW, "private_test_cases": _pickled(b"\x80\x04K\x01K\x02a.")}),
        "pickle TypeError": ("code", {**_CODE_ROW, "private_test_cases": _pickled(b"\x80\x04]]R.")}),
        "pickle MemoryError": ("code", {**_CODE_ROW, "private_test_cases": _pickled(b"\x80\x04Nr\xff\xff\xff\xff.")}),
        "tests repeated past 1 GB": (
            "code",
            {**_CODE_ROW, "private_test_cases": _pickled(pickle.dumps([{"input": "x" * 2**20, "output": ""}] * 1100))},
        ),
        "5000-digit tests": ("code", {**_CODE_ROW, "public_test_cases": "[" + "7" * 5000 + "]"}),
    }
    if case in rows:
        kind, row = rows[case]
        jsonl.write_text(json.dumps(row) + "\n")
        return kind, jsonl
    if case == "deeply nested line":
        jsonl.write_text("[" * 200_000 + "]" * 200_000 + "\n")
    elif case == "5000-digit answer":
        jsonl.write_text('{"problem": "x", "answer": ' + "9" * 5000 + "}\n")
    elif case == "not UTF-8":
        jsonl.write_bytes(b'{"problem": "caf\xe9", "answer": "1"}\n')
    elif case == "corrupt parquet":
        parquet = folder / "bench.parquet"
        pq.write_table(pa.table({"problem": ["1+1?"] * 50, "answer": ["2"] * 50}), parquet)
        parquet.write_bytes(parquet.read_bytes()[:60] + b"\0" * 200 + parquet.read_bytes()[260:])
        return "math", parquet
    elif case == "a folder":
        (folder / "bench.jsonl").mkdir()
    return "math", jsonl


@pytest.mark.parametrize(
    ("case", "needles"),
    [
        ("problem null", ("row 0 problem=None is a NoneType, not str",)),
        ("answer a list", ("row 0 answer=[2] is a list, not str or int",)),
        ("row not an object", ("line 1", "not a JSON object")),
        ("question_content a number", ("row 0 question_content=7 is a int, not str",)),
        ("pickle AttributeError", ("refuses to load (AttributeError",)),
        ("pickle TypeError", ("refuses to load (TypeError",)),
        ("pickle MemoryError", ("refuses to load (MemoryError",)),
        ("tests repeated past 1 GB", ("1100 MB of tests, over 1024 MB",)),
        ("5000-digit tests", ("public_test_cases is JSON rac cannot read (ValueError", "4300")),
        ("deeply nested line", ("line 1 of benchmark file", "RecursionError")),
        ("5000-digit answer", ("line 1 of benchmark file", "JSON rac cannot read (ValueError")),
        ("not UTF-8", ("is not UTF-8 text (byte 16)",)),
        ("corrupt parquet", ("is not readable Parquet",)),
        ("a folder", ("is a folder",)),
    ],
)
def test_hostile_benchmark_files_are_one_line(
    in_tmp: Path, params_file: Callable[..., Path], tiny_model_dir: Path, case: str, needles: tuple[str, ...]
) -> None:
    kind, path = _bad_benchmark(in_tmp, case)
    spec = {"kind": kind, "path": str(path), "split": "test", "instruction": ""}
    spec["extractor"], spec["pattern"] = ("last_code_block" if kind == "code" else "boxed"), None
    params = params_file(tiny_model_dir, {"benchmarks": {"bad": spec}, "task": "bad"})
    result = _invoke("evaluate", "--params", str(params), "--model", str(tiny_model_dir), "--out", "out")
    assert_bad_input(result, str(path), *needles)
    assert not (in_tmp / "out").exists()


def test_the_smallest_sandbox_limits_params_accept_still_run_a_program() -> None:
    """The lower bounds of sandbox.* are not a silent 0: a program at every lower bound passes its tests."""
    bounds = {name: low for name, (low, _) in SANDBOX_BOUNDS.items()}
    limits = Limits(*(bounds[f.name] for f in dataclasses.fields(Limits)))
    item = CodeFile(str(ROOT / "tests" / "fixtures" / "code_easy.jsonl"), "test").items(1, 0)[0]
    row = next(
        json.loads(line)
        for line in (ROOT / "tests" / "fixtures" / "code_easy.jsonl").read_text().splitlines()
        if json.loads(line)["question_content"] in item.text
    )
    assert judge(row["reference_solution"], item.answer, limits).verdict == "passed"


# ---------------------------------------------------------------- tracebacks that are now one line


@pytest.mark.parametrize(
    ("task", "max_new_tokens", "needles"),
    [
        # the shipped code benchmark on the embedded model: each prompt alone passes its 512 positions
        ("code_easy", 256, ("max_new_tokens=256 is", "beyond the 512-token context", "the prompt alone is too long")),
        (
            "arithmetic",
            500,
            ("max_new_tokens=500 is", "beyond the 512-token context", "lower evaluate.max_new_tokens to"),
        ),
    ],
    ids=["code_easy", "arithmetic"],
)
def test_context_length_is_checked_before_any_engine_starts(
    in_tmp: Path, params_file: Callable[..., Path], task: str, max_new_tokens: int, needles: tuple[str, ...]
) -> None:
    """On vLLM (the default backend) this was a pydantic ValidationError after the engine's start-up."""
    shipped = yaml.safe_load(SHIPPED_PARAMS.read_text())["benchmarks"]
    benchmarks = {"code_easy": {**shipped["code_easy"], "path": str(ROOT / shipped["code_easy"]["path"])}}
    overrides = {
        "task": task,
        "benchmarks": benchmarks,
        "evaluate": {"max_new_tokens": max_new_tokens, "n_problems": 8},
    }
    params = params_file(ROOT / "data" / "embedded", overrides)
    result = _invoke("evaluate", "--params", str(params), "--dense", "--out", "out")
    assert_bad_input(result, *needles)
    assert not (in_tmp / "out").exists()


# ---------------------------------------------------------------- hangs, refused up front


def test_a_chunk_that_makes_too_many_files_for_this_model(
    in_tmp: Path, params_file: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """hessians.chunk=16 passes params but makes 66k files for a model 4096 wide: refused before any forward, with
    the chunk that would do."""
    wide = save_tiny_qwen2(tmp_path_factory.mktemp("wide"), intermediate_size=4096)
    params = str(params_file(wide, {"hessians": {"chunk": 16}}))
    calib = _calibration(in_tmp / "calib.parquet", 2, 8, segment=[0] * 8)  # one segment: one array per group
    result = _invoke("hessians", "--params", params, "--calib", str(calib), "--out", "h.zarr")
    assert_bad_input(result, "hessians.chunk=16 makes 65852 chunk files for this model, over 50000", "raise it to 32")
    assert not (in_tmp / "h.zarr").exists() and not (in_tmp / ".rac").exists()


def test_a_backtracking_extractor_is_stopped_in_time() -> None:
    """`(a|aa)+$` on 41 characters backtracks for hours with Python's re: the search is cut off and said."""
    spec = BenchmarkSpec("arithmetic", None, "test", "", "regex", r"(a|aa)+$")
    task = get_task("catastrophic", {"catastrophic": spec})
    assert task.extract_answer("the answer: aaaa") == "a"
    start = time.perf_counter()
    with pytest.raises(RacError, match=r"benchmarks.catastrophic.pattern='\(a\|aa\)\+\$' ran over 2.0 s") as info:
        task.extract_answer("a" * 40 + "b")
    assert "\n" not in str(info.value) and time.perf_counter() - start < 60
