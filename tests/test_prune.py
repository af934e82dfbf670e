"""The prune stage on a tiny model: only decoder linears change, at the target sparsity."""

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import load_weights
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from stages import hessians, prune
from stages.errors import RacError
from stages.params import load_params
from stages.schemas import CALIBRATION, write_parquet


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prune_changes_only_decoder_linears(
    tmp_path: Path, tiny_model_dir: Path, params_file: Callable[..., Path], dtype: torch.dtype
) -> None:
    dense = tmp_path / "dense"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype).save_pretrained(dense)
    for f in tiny_model_dir.glob("tokenizer*"):
        (dense / f.name).write_bytes(f.read_bytes())
    p = load_params(
        params_file(dense, {"sparsity": 0.6, "activations": {"batch_tokens": 256}, "hessians": {"chunk": 32}})
    )
    g = torch.Generator().manual_seed(0)
    rows = [
        {
            "seq_id": i,
            "token_ids": torch.randint(4, 46, (40,), generator=g).tolist(),
            "segment": [0] * 10 + [1] * 30,
            "source": "rac",
        }
        for i in range(8)
    ]
    calib, store, out = tmp_path / "rac.parquet", tmp_path / "rac.zarr", tmp_path / "pruned"
    write_parquet(rows, CALIBRATION, calib, {"source": "rac"})
    hessians.run(p, calib, store, 1)
    prune.run(p, store, None, out)

    before, after = load_file(dense / "model.safetensors"), load_weights(out)
    assert before.keys() == after.keys()
    n_linear = 0
    for name, w in before.items():
        assert after[name].dtype == dtype  # saved in the checkpoint's own dtype
        if name.startswith("model.layers.") and name.endswith("proj.weight"):
            n_linear += 1
            assert abs((after[name] == 0).float().mean().item() - 0.6) < 1e-2, name
        else:  # embeddings, norms, biases and lm_head are never pruned
            assert torch.equal(after[name], w), name
    assert n_linear == 2 * 7
    report = json.loads((out / "report.json").read_text())
    assert len(report["layers"]) == n_linear
    assert abs(report["achieved_sparsity"] - 0.6) < 1e-3
    assert all(r["loss"] >= 0 and "seconds" not in r and r["damp_used"] >= p.prune.damp for r in report["layers"])
    assert AutoModelForCausalLM.from_pretrained(out) is not None
    for f in dense.glob("tokenizer*"):  # copied verbatim: re-saving rewrites tokenizer_config.json
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name


def test_scope_layers_and_overrides(tmp_path: Path, tiny_model_dir: Path, params_file: Callable[..., Path]) -> None:
    overrides = {"sparsity": 0.5, "prune": {"scope": "mlp", "layers": "1", "overrides": {"0": 0.25}}}
    p = load_params(
        params_file(tiny_model_dir, overrides | {"activations": {"batch_tokens": 256}, "hessians": {"chunk": 32}})
    )
    g = torch.Generator().manual_seed(1)
    rows = [
        {
            "seq_id": 0,
            "token_ids": torch.randint(4, 46, (64,), generator=g).tolist(),
            "segment": [0] * 64,
            "source": "generic",
        }
    ]
    calib, store, out = tmp_path / "g.parquet", tmp_path / "g.zarr", tmp_path / "pruned"
    write_parquet(rows, CALIBRATION, calib, {"source": "generic"})
    hessians.run(p, calib, store, 1)
    prune.run(p, store, None, out)
    before, after = load_file(tiny_model_dir / "model.safetensors"), load_weights(out)
    for name, w in before.items():
        if not (name.startswith("model.layers.") and name.endswith("proj.weight")):
            continue
        zeros = (after[name] == 0).float().mean().item()
        if ".mlp." not in name:  # attention is out of scope
            assert torch.equal(after[name], w), name
        elif name.startswith("model.layers.0."):  # the override
            assert abs(zeros - 0.25) < 1e-2, name
        else:  # layer 1 at `sparsity`
            assert abs(zeros - 0.5) < 1e-2, name
    report = json.loads((out / "report.json").read_text())
    targets = {(r["layer"], r["module"]): r["target"] for r in report["layers"]}
    assert targets[(0, "mlp.up_proj")] == 0.25 and targets[(1, "mlp.up_proj")] == 0.5
    assert targets[(1, "self_attn.q_proj")] == 0.0
    assert 0 < report["achieved_sparsity"] < report["achieved_sparsity_pruned"] < 0.5


def test_layer_range_out_of_bounds(tmp_path: Path, tiny_model_dir: Path, params_file: Callable[..., Path]) -> None:
    p = load_params(
        params_file(
            tiny_model_dir,
            {"prune": {"layers": "0-5"}, "activations": {"batch_tokens": 256}, "hessians": {"chunk": 32}},
        )
    )
    rows = [{"seq_id": 0, "token_ids": [1, 5, 6, 7], "segment": [0, 0, 1, 1], "source": "rac"}]
    calib, store = tmp_path / "r.parquet", tmp_path / "r.zarr"
    write_parquet(rows, CALIBRATION, calib, {"source": "rac"})
    hessians.run(p, calib, store, 1)
    with pytest.raises(RacError, match="'0-5' is out of bounds: the model has layers 0-1"):
        prune.run(p, store, None, tmp_path / "pruned")
    assert not (tmp_path / "pruned").exists()
