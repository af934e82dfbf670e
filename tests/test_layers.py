"""The layer engine: layer by layer equals the model's forward, dense stores equal a full forward's sums, sequential
pruning equals a hand-written loop, activations spill to disk and are removed, bad settings are one line."""

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import TINY, assert_bad_input, assert_walk_equals_forward, load_weights, save_tiny_qwen2
from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3ForCausalLM

from stages import hessians, prune, toy
from stages.cli import main
from stages.layers import Accumulator, Skeleton, batches
from stages.models import decoder_layers, load_model
from stages.params import load_params
from stages.schemas import CALIBRATION, write_parquet
from stages.solvers import SOLVERS, Options, hessian_from_sums
from stages.store import HessianStore

CPU = torch.device("cpu")


def _sequences(seed: int, n: int = 9) -> tuple[list[list[int]], list[list[int]]]:
    """BOS then random tokens of mixed lengths (so batches are padded); a prompt part then a decode part."""
    g = torch.Generator().manual_seed(seed)
    ids = [[1, *torch.randint(4, 46, (int(k),), generator=g).tolist()] for k in torch.randint(3, 40, (n,), generator=g)]
    return ids, [[0] * 3 + [1] * (len(x) - 3) for x in ids]


def _calibration(path: Path, seed: int, n: int = 9) -> Path:
    ids, segs = _sequences(seed, n)
    rows = [
        {"seq_id": i, "token_ids": x, "segment": s, "source": "rac"}
        for i, (x, s) in enumerate(zip(ids, segs, strict=True))
    ]
    write_parquet(rows, CALIBRATION, path, {"source": "rac"})
    return path


def _qwen3(out: Path) -> Path:
    torch.manual_seed(0)
    tokenizer = toy.build_tokenizer()
    Qwen3ForCausalLM(Qwen3Config(**toy.decoder_config(TINY, tokenizer))).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module", params=["qwen2", "llama", "qwen3", "qwen2-sliding"])
def family_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp(request.param)
    if request.param == "qwen2":
        return request.getfixturevalue("tiny_model_dir")
    if request.param == "llama":
        return request.getfixturevalue("tiny_llama_dir")
    if request.param == "qwen3":
        return _qwen3(out)
    # Layer 1 attends through a sliding window of 4: the model builds a second mask for it.
    return _sliding(out)


def _sliding(out: Path) -> Path:
    save_tiny_qwen2(out)
    config = json.loads((out / "config.json").read_text())
    config.update(use_sliding_window=True, sliding_window=4, max_window_layers=1)
    config.pop("layer_types", None)
    (out / "config.json").write_text(json.dumps(config))
    return out


@torch.no_grad()
def test_layer_by_layer_equals_the_models_forward(family_dir: Path, tmp_path: Path) -> None:
    """Every decoder layer's outputs, padded batches and all, bitwise equal to those of the full forward."""
    ids, segs = _sequences(0)
    assert_walk_equals_forward(family_dir, batches(ids, segs, 128, pad=0), tmp_path)


def _full_forward_sums(model_dir: Path, ids: list[list[int]], segs: list[list[int]], batch_tokens: int) -> dict:
    """Today's reference: one forward of the whole model per batch, with accumulating pre-hooks on every group."""
    model = load_model(str(model_dir), CPU)
    layers = decoder_layers(model)
    sums: dict[tuple[int, str], Accumulator] = {}
    hooks = []
    for g in Skeleton(str(model_dir), CPU).groups():
        linear = layers[g.layer].get_submodule(g.name)
        sums[(g.layer, g.name)] = Accumulator(linear.in_features, CPU)
        hooks.append(linear.register_forward_pre_hook(sums[(g.layer, g.name)]))
    with torch.no_grad():
        for batch in batches(ids, segs, batch_tokens, pad=0):
            for acc in sums.values():
                acc.segment = batch.segment
            model(input_ids=batch.ids, attention_mask=batch.attention_mask)
    for hook in hooks:
        hook.remove()
    return sums


@pytest.mark.parametrize("memory_gb", [1.0, 2e-5], ids=["in-memory", "spilled"])
def test_dense_store_equals_a_full_forward_bitwise(
    memory_gb: float, tiny_model_dir: Path, params_file: Callable[..., Path], tmp_path: Path
) -> None:
    calib = _calibration(tmp_path / "calib.parquet", seed=1)
    scratch = tmp_path / "scratch"
    overrides = {"activations": {"batch_tokens": 64, "memory_gb": memory_gb, "disk_dir": str(scratch)}}
    p = load_params(params_file(tiny_model_dir, overrides))
    measured = hessians.run(p, calib, tmp_path / "h.zarr", 1)
    assert measured is not None and (measured["plan_activations_on_disk_gb"] > 0) == (memory_gb < 1)
    assert not scratch.exists()  # removed after success
    ids, segs = _sequences(1)
    want = _full_forward_sums(tiny_model_dir, ids, segs, 64)
    store = HessianStore(tmp_path / "h.zarr", None)
    for g in store.groups():
        ref = want[(g.layer, g.name)]
        assert g.n_tokens == ref.n
        for s, x in store.sums(g).items():
            upper = np.triu(ref.xtx[s].numpy())
            np.testing.assert_array_equal(x, upper + np.triu(upper, 1).T)  # bitwise, mirrored from one triangle


def test_sequential_equals_a_hand_written_loop(
    tiny_model_dir: Path, params_file: Callable[..., Path], tmp_path: Path
) -> None:
    """Prune layer 0 on dense inputs, forward, accumulate layer 1 from the pruned layer 0's outputs, prune it."""
    calib = _calibration(tmp_path / "calib.parquet", seed=2)
    overrides = {"sparsity": 0.5, "prune": {"calibration": "sequential"}, "activations": {"batch_tokens": 64}}
    p = load_params(params_file(tiny_model_dir, overrides))
    prune.run(p, None, calib, tmp_path / "seq")

    model = load_model(str(tiny_model_dir), CPU)
    groups = Skeleton(str(tiny_model_dir), CPU).groups()
    ids, segs = _sequences(2)
    solver = SOLVERS["sparsegpt"]
    for i, layer in enumerate(decoder_layers(model)):
        mine = [g for g in groups if g.layer == i]
        accumulators = {g.name: Accumulator(layer.get_submodule(g.name).in_features, CPU) for g in mine}
        hooks = [layer.get_submodule(name).register_forward_pre_hook(acc) for name, acc in accumulators.items()]
        with torch.no_grad():
            for batch in batches(ids, segs, 64, pad=0):
                for acc in accumulators.values():
                    acc.segment = batch.segment
                model(input_ids=batch.ids, attention_mask=batch.attention_mask)  # layer 0 already pruned for i=1
        for hook in hooks:
            hook.remove()
        for g in mine:
            H = hessian_from_sums(accumulators[g.name].xtx, accumulators[g.name].n, p.prune.mix)
            for member in g.members:
                linear = layer.get_submodule(member)
                pruned = solver(linear.weight.data, H, Options(0.5, "unstructured", 128, 0.01, "torch", None))
                linear.weight.data.copy_(pruned.weight)
    got = load_weights(tmp_path / "seq")
    for name, W in model.state_dict().items():
        if name in got:
            assert torch.equal(got[name], W), name
    dense = _dense_pruned(tiny_model_dir, params_file, tmp_path, calib)
    assert not torch.equal(got["model.layers.1.mlp.down_proj.weight"], dense["model.layers.1.mlp.down_proj.weight"])
    assert torch.equal(got["model.layers.0.mlp.down_proj.weight"], dense["model.layers.0.mlp.down_proj.weight"])
    report = json.loads((tmp_path / "seq" / "report.json").read_text())
    assert report["calibration"] == "sequential" and report["memory_plan_gb"]["peak"] > 0


def _dense_pruned(model_dir: Path, params_file: Callable[..., Path], tmp_path: Path, calib: Path) -> dict:
    p = load_params(params_file(model_dir, {"sparsity": 0.5, "activations": {"batch_tokens": 64}}))
    hessians.run(p, calib, tmp_path / "h.zarr", 1)
    prune.run(p, tmp_path / "h.zarr", None, tmp_path / "dense")
    assert json.loads((tmp_path / "dense" / "report.json").read_text())["calibration"] == "dense"
    return load_weights(tmp_path / "dense")


@pytest.mark.parametrize(
    ("pruner", "pattern", "sparsity"),
    [
        ("sparsegpt", "2:4", 0.5),
        ("wanda", "unstructured", 0.6),
        ("alps", "unstructured", 0.6),
        ("magnitude", "2:4", 0.5),
    ],
)
def test_sequential_with_every_pruner_and_pattern(
    pruner: str, pattern: str, sparsity: float, tiny_model_dir: Path, params_file: Callable[..., Path], tmp_path: Path
) -> None:
    calib = _calibration(tmp_path / "calib.parquet", seed=3)
    overrides = {"pruner": pruner, "sparsity": sparsity, "prune": {"calibration": "sequential", "pattern": pattern}}
    p = load_params(params_file(tiny_model_dir, overrides))
    prune.run(p, None, calib, tmp_path / "out")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["calibration"] == "sequential" and report["pruner"] == pruner
    assert abs(report["achieved_sparsity"] - sparsity) < 1e-2
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out") is not None


def test_scratch_is_removed_after_a_failure(
    tiny_model_dir: Path, params_file: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calib = _calibration(tmp_path / "calib.parquet", seed=4)
    scratch = tmp_path / "scratch"
    overrides = {
        "prune": {"calibration": "sequential"},
        "activations": {"batch_tokens": 64, "memory_gb": 2e-5, "disk_dir": str(scratch)},
    }
    p = load_params(params_file(tiny_model_dir, overrides))
    seen: list[int] = []
    real = prune._compressed_layer

    def fail_on_layer_1(*args: object, **kwargs: object) -> object:
        seen.append(sum(1 for _ in scratch.rglob("*.pt")))  # spilled activations are on disk now
        if len(seen) == 2:
            raise RuntimeError("solver died")
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(prune, "_compressed_layer", fail_on_layer_1)
    with pytest.raises(RuntimeError, match="solver died"):
        prune.run(p, None, calib, tmp_path / "out")
    assert seen[0] > 0
    assert not scratch.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("overrides", "args", "needles"),
    [
        (
            {"activations": {"batch_tokens": 64, "memory_gb": 1e-6}},
            ["hessians"],
            ("activations.memory_gb=1e-06", "below one batch", "at least"),
        ),
        (
            {"activations": {"memory_gb": 2e-5, "batch_tokens": 64, "disk_dir": "afile/sub"}},
            ["hessians"],
            ("activations.disk_dir", "afile/sub", "not writable"),
        ),
        ({"prune": {"calibration": "sequential"}}, ["prune-store"], ("prune.calibration=sequential", "--calib")),
        ({}, ["prune-calib"], ("prune.calibration=dense", "--hessians")),
    ],
    ids=["budget-below-one-batch", "disk-dir-not-writable", "sequential-with-a-store", "dense-without-a-store"],
)
def test_bad_layer_walk_settings_are_one_line(
    overrides: dict,
    args: list[str],
    needles: tuple[str, ...],
    tiny_model_dir: Path,
    params_file: Callable[..., Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("a file, not a folder")
    calib = _calibration(tmp_path / "calib.parquet", seed=5)
    params = str(params_file(tiny_model_dir, overrides))
    command = {
        "hessians": ["hessians", "--params", params, "--calib", str(calib), "--out", "h.zarr"],
        "prune-store": ["prune", "--params", params, "--hessians", "h.zarr", "--out", "out"],
        "prune-calib": ["prune", "--params", params, "--calib", str(calib), "--out", "out"],
    }[args[0]]
    assert_bad_input(CliRunner().invoke(main, command), *needles)
    assert not (tmp_path / "h.zarr").exists() and not (tmp_path / "out").exists() and not (tmp_path / ".rac").exists()


# The high-water mark of this process's RSS (VmHWM), reset after the imports: ru_maxrss would keep the peak of the
# pytest process this one was forked from.
_RSS_SCRIPT = """
import json, re, sys
from pathlib import Path
from stages import hessians
from stages.params import load_params
def hwm():
    return int(re.search(r"VmHWM:\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1)) / 2**20
Path("/proc/self/clear_refs").write_text("5")
before = hwm()
measured = hessians.run(load_params(Path(sys.argv[1])), Path(sys.argv[2]), Path(sys.argv[3]), 1)
print(json.dumps({"before": before, "peak": hwm(), **measured}))
"""


@pytest.mark.slow
def test_memory_plan_counts_the_embedding_against_peak_rss(params_file: Callable[..., Path], tmp_path: Path) -> None:
    """A model whose embedding table (2^19 x 64 fp32, 128 MB) outweighs everything else the walk holds: the
    plan's peak is within a generous factor of the peak RSS a fresh process gains building the store (the plan
    without the table would be ~2 MB)."""
    model = tmp_path / "wide"
    torch.manual_seed(0)
    tokenizer = toy.build_tokenizer()
    config = Qwen3Config(**(toy.decoder_config(TINY, tokenizer) | {"vocab_size": 2**19}), tie_word_embeddings=True)
    Qwen3ForCausalLM(config).save_pretrained(model)
    tokenizer.save_pretrained(model)
    params = params_file(model, {"activations": {"batch_tokens": 64}})
    calib = _calibration(tmp_path / "calib.parquet", seed=4)
    proc = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, str(params), str(calib), str(tmp_path / "h.zarr")],
        capture_output=True, text=True, check=True, env=os.environ | {"PYTHONPATH": str(Path(__file__).parents[1])},
    )  # fmt: skip
    measured = json.loads(proc.stdout.splitlines()[-1])
    grown = measured["peak"] - measured["before"]
    planned = measured["plan_peak_gb"]
    assert measured["plan_embedding_gb"] >= 0.25  # the fp32 table and the stored one it is read from
    assert 0.5 * planned <= grown <= 1.5 * planned + 0.1, (grown, measured)
