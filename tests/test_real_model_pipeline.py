"""A real pretrained model through the whole DVC pipeline: SmolLM2-135M-Instruct (built from its PyPI wheel) with
the shipped preset at small sizes, every stage; then the model re-converted in place re-runs what reads it, and an
unchanged model re-runs nothing."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import DVC, ROOT, dvc_project, git_commit, merge, run_cmd
from safetensors.torch import load_file, save_file

SMALL = {
    "rollout": {"n_prompts": 16, "max_new_tokens": 96},
    "calibrate": {"budget_tokens": 1024, "generic_seq_len": 128},
    "evaluate": {"n_problems": 8, "max_new_tokens": 96},
    "analyze": {"n_problems": 2, "max_new_tokens": 48},
}
READERS = ("rollout", "calibrate@rac", "hessians@rac", "prune@rac", "evaluate_dense", "analyze")


@pytest.mark.slow
def test_smollm2_pipeline_end_to_end(smollm2: Path, tmp_path: Path) -> None:
    model = tmp_path / "smollm2"  # a copy: the test re-converts it in place
    shutil.copytree(smollm2, model)
    preset = yaml.safe_load((ROOT / "presets" / "smollm2-135m-instruct.yaml").read_text())
    repo = tmp_path / "repo"
    params = dvc_project(repo, merge(preset, {"model": str(model), **SMALL}))

    first = run_cmd([*DVC, "repro"], repo)
    for stage in ("model", *READERS, "evaluate@generic", "evaluate@prompt", "evaluate@rac", "report"):
        assert f"Running stage '{stage}'" in first
    for name in ("dense", *params["sources"]):
        metrics = json.loads((repo / "data" / "evaluate" / name / "metrics.json").read_text())
        assert metrics["n_problems"] == 8 and 0 <= metrics["accuracy"] <= 1
        assert "frac_parseable" in metrics
    dense = json.loads((repo / "data" / "evaluate" / "dense" / "metrics.json").read_text())
    assert dense["frac_parseable"] >= 0.5  # the instruction asks for the number, and SmolLM2 writes it
    errors = json.loads((repo / "data" / "analyze" / "metrics.json").read_text())
    assert {"mean_error_prompt", "mean_error_decode"} <= errors["rac"].keys()
    identity = json.loads((repo / "data" / "model" / "identity.json").read_text())
    assert {"model.safetensors", "tokenizer.json", "config.json"} <= identity["files"].keys()
    git_commit(repo, "repro")

    again = run_cmd([*DVC, "repro"], repo)  # versions and model always run; an unchanged model re-runs nothing else
    ran = [line for line in again.splitlines() if line.startswith("Running stage")]
    assert sorted(ran) == ["Running stage 'model':", "Running stage 'versions':"]

    weights = load_file(model / "model.safetensors")  # re-converted in place: one weight differs
    name = next(k for k in sorted(weights) if k.endswith("mlp.down_proj.weight"))
    weights[name] = weights[name] + torch.finfo(weights[name].dtype).eps
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    run_cmd([*DVC, "repro", "model"], repo)
    status = run_cmd([*DVC, "status"], repo)
    for stage in READERS:
        assert f"{stage}:" in status, status
    assert "data/model/identity.json" in status
