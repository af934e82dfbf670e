"""The analyze stage: per-token error of pruned models along the dense model's greedy rollout (figure 2)."""

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from stages import analyze
from stages.cli import main
from stages.params import Params, load_params

SOURCES = ["prompt", "rac"]


def _copy(dense: Path, out: Path, scale: dict[str, float] | None = None) -> Path:
    """A copy of ``dense``, with the named weights multiplied by a factor."""
    shutil.copytree(dense, out)
    if scale:
        weights = load_file(out / "model.safetensors")
        for name, factor in scale.items():
            weights[name] = weights[name] * factor
        save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.fixture
def setup(tiny_model_dir: Path, params_file: Callable[..., Path], tmp_path: Path) -> tuple[Params, Path]:
    overrides = {"sources": SOURCES, "analyze": {"backend": "hf", "n_problems": 3, "max_new_tokens": 12}}
    return load_params(params_file(tiny_model_dir, overrides)), tmp_path / "prune"


def test_identical_copy_has_zero_error(setup: tuple[Params, Path], tiny_model_dir: Path, tmp_path: Path) -> None:
    p, pruned = setup
    for source in SOURCES:
        _copy(tiny_model_dir, pruned / source)
    analyze.run(p, pruned, tmp_path / "out")
    rows = pq.read_table(tmp_path / "out" / "errors.parquet").to_pylist()
    assert sorted((r["model"], r["problem_id"]) for r in rows) == [(s, i) for s in SOURCES for i in range(3)]
    for r in rows:
        assert len(r["errors"]) == len(r["token_ids"]) > r["n_prompt_tokens"] > 0
        assert all(e == 0.0 for e in r["errors"])  # exactly: the same weights give the same hidden states
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert m["rac"] == m["prompt"] == {"mean_error_prompt": 0.0, "mean_error_decode": 0.0}
    assert m["prompt_over_rac"] == {"prompt": None, "decode": None}  # 0 / 0 is no ratio
    assert (tmp_path / "out" / "heatmap.png").read_bytes().startswith(b"\x89PNG")


def test_errors_are_final_hidden_state_distances(
    setup: tuple[Params, Path], tiny_model_dir: Path, tmp_path: Path
) -> None:
    p, pruned = setup
    _copy(tiny_model_dir, pruned / "prompt", {"model.layers.0.mlp.down_proj.weight": 0.5})
    _copy(tiny_model_dir, pruned / "rac", {"model.layers.1.mlp.down_proj.weight": 0.9})
    analyze.run(p, pruned, tmp_path / "out")
    rows = pq.read_table(tmp_path / "out" / "errors.parquet").to_pylist()
    # Recomputed independently: the last of `hidden_states` is the normed state that the LM head reads.
    dense = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    for r in rows:
        other = AutoModelForCausalLM.from_pretrained(pruned / r["model"], dtype=torch.float32).eval()
        ids = torch.tensor([r["token_ids"]])
        with torch.no_grad():
            h_dense = dense(ids, output_hidden_states=True).hidden_states[-1][0]
            h_other = other(ids, output_hidden_states=True).hidden_states[-1][0]
        expected = torch.linalg.vector_norm(h_dense - h_other, dim=-1).numpy()
        np.testing.assert_allclose(r["errors"], expected, rtol=1e-5, atol=1e-6)  # fp32 reductions, same order
        assert min(r["errors"]) > 0
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    for source in SOURCES:
        errors = [(r["errors"], r["n_prompt_tokens"]) for r in rows if r["model"] == source]
        prompt = np.concatenate([e[:n] for e, n in errors])
        decode = np.concatenate([e[n:] for e, n in errors])
        assert m[source]["mean_error_prompt"] == pytest.approx(prompt.mean(), rel=1e-6)
        assert m[source]["mean_error_decode"] == pytest.approx(decode.mean(), rel=1e-6)
    ratio = m["prompt_over_rac"]["decode"]
    assert ratio == pytest.approx(m["prompt"]["mean_error_decode"] / m["rac"]["mean_error_decode"])


@pytest.mark.parametrize(
    ("sources", "make", "needles"),
    [
        (["generic", "rac"], ["generic", "rac"], ["sources=['generic', 'rac'] lacks ['prompt']"]),
        (["prompt", "rac"], ["prompt"], ["pruned models", "rac", "do not exist"]),
    ],
)
def test_bad_input(
    tiny_model_dir: Path,
    params_file: Callable[..., Path],
    tmp_path: Path,
    sources: list[str],
    make: list[str],
    needles: list[str],
) -> None:
    for source in make:
        _copy(tiny_model_dir, tmp_path / "prune" / source)
    params = params_file(tiny_model_dir, {"sources": sources, "analyze": {"backend": "hf"}})
    out = tmp_path / "analyze"
    result = CliRunner().invoke(
        main, ["analyze", "--params", str(params), "--pruned", str(tmp_path / "prune"), "--out", str(out)]
    )
    assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1, result.output
    assert all(n in result.stderr for n in needles), result.stderr
    assert not out.exists()
