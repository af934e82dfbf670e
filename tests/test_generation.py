"""Both generation backends on the embedded reasoner: exact ids, EOS handling, and agreement."""

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from stages.errors import RacError
from stages.generation import (
    Generation,
    cut_at_stop,
    engine_fields,
    engine_kwargs,
    generate,
    rank_environment,
    shards,
    stop_ids,
)
from stages.models import encode_prompt, load_tokenizer
from stages.params import load_params
from stages.tasks import get_task

ROOT = Path(__file__).resolve().parents[1]
EMBEDDED = ROOT / "data" / "embedded"


@pytest.mark.slow
def test_vllm_and_hf_greedy_agree_on_embedded_model() -> None:
    p = load_params(ROOT / "params.yaml")
    task, tokenizer = get_task(p.task, p.benchmarks), load_tokenizer(str(EMBEDDED))
    problems = task.problems(24, 99)
    prompts = [encode_prompt(tokenizer, pr.prompt, p.chat.system_prompt) for pr in problems]
    greedy = dataclasses.replace(p.evaluate, temperature=0.0, max_new_tokens=200)
    by_vllm = generate(str(EMBEDDED), prompts, dataclasses.replace(greedy, backend="vllm"), 1, p.vllm)
    by_hf = generate(str(EMBEDDED), prompts, dataclasses.replace(greedy, backend="hf"), 1, p.vllm)
    same = 0
    for (v,), (h,) in zip(by_vllm, by_hf, strict=True):
        for g in (v, h):
            assert g.finish_reason in {"stop", "length"}
            # EOS is kept as the last produced id when the model stopped, and appears nowhere else.
            assert (g.token_ids[-1] == tokenizer.eos_token_id) == (g.finish_reason == "stop")
            assert tokenizer.eos_token_id not in g.token_ids[:-1]
        same += v.token_ids == h.token_ids
    # fp32 on both sides; a trained model's greedy margins are wide, so nearly every completion
    # must match token for token (a rare near-tie may flip one argmax).
    assert same >= 22, f"only {same}/24 greedy completions agree between vLLM and HF"


@pytest.mark.slow
def test_vllm_sampling_gives_n_distinct_samples() -> None:
    p = load_params(ROOT / "params.yaml")
    tokenizer = load_tokenizer(str(EMBEDDED))
    # Generic text is where the model is uncertain (word choice is random in its training data);
    # its arithmetic is near-deterministic even when sampled.
    prompt = encode_prompt(tokenizer, "the cat sees a", p.chat.system_prompt)
    (samples,) = generate(str(EMBEDDED), [prompt], dataclasses.replace(p.rollout, backend="vllm"), 4, p.vllm)
    assert len(samples) == 4
    assert len({tuple(s.token_ids) for s in samples}) > 1


def test_stop_ids_and_cut() -> None:
    assert stop_ids(2, None) == [2]
    assert stop_ids(2, [7, 2]) == [2, 7]
    assert stop_ids(None, 5) == [5]
    assert cut_at_stop([4, 9, 7, 3, 2], [2, 7]) == Generation([4, 9, 7], "stop")  # the first stop, whichever
    assert cut_at_stop([4, 9], [2, 7]) == Generation([4, 9], "length")


def test_hf_backend_stops_at_every_eos_of_generation_config(tmp_path: Path) -> None:
    """A model whose generation_config lists a second EOS (as Qwen's <|im_end|>, <|endoftext|>) stops at either."""
    model = tmp_path / "two-eos"
    shutil.copytree(EMBEDDED, model)
    tokenizer = load_tokenizer(str(model))
    newline = tokenizer.convert_tokens_to_ids("\n")
    config = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(
        json.dumps(config | {"eos_token_id": [tokenizer.eos_token_id, newline]})
    )
    p = load_params(ROOT / "params.yaml")
    task = get_task(p.task, p.benchmarks)
    prompts = [encode_prompt(tokenizer, pr.prompt, p.chat.system_prompt) for pr in task.problems(6, 5)]
    greedy = dataclasses.replace(p.evaluate, backend="hf", temperature=0.0, max_new_tokens=200)
    for (g,) in generate(str(model), prompts, greedy, 1, p.vllm):
        assert g.finish_reason == "stop" and g.token_ids[-1] == newline  # every CoT has a line break
        assert newline not in g.token_ids[:-1] and tokenizer.eos_token_id not in g.token_ids


ENGINE = load_params(Path(__file__).parents[1] / "params.yaml").vllm
KNOWN = {
    "tensor_parallel_size",
    "dtype",
    "max_num_seqs",
    "max_model_len",
    "gpu_memory_utilization",
    "enforce_eager",
    "swap_space",
    "quantization",
    "pipeline_parallel_size",
}


def test_engine_kwargs_on_gpu_pass_every_setting() -> None:
    engine = dataclasses.replace(ENGINE, tensor_parallel_size=4, dtype="bfloat16", options={"swap_space": 8})
    kwargs = engine_kwargs(engine, on_gpu=True, known=KNOWN, max_model_len=300)
    assert kwargs == {
        "tensor_parallel_size": 4,
        "dtype": "bfloat16",
        "max_num_seqs": ENGINE.max_num_seqs,
        "max_model_len": 300,
        "gpu_memory_utilization": ENGINE.gpu_memory_utilization,
        "enforce_eager": False,
        "swap_space": 8,
    }


def test_engine_kwargs_on_cpu() -> None:
    kwargs = engine_kwargs(ENGINE, on_gpu=False, known=KNOWN, max_model_len=300)
    assert kwargs["gpu_memory_utilization"] == 0.05 and kwargs["enforce_eager"] is True


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"options": {"tensor_paralel_size": 2}},
            r"vllm.options \['tensor_paralel_size'\] are not vLLM engine arguments",
        ),
        ({"tensor_parallel_size": 2}, r"vllm.tensor_parallel_size=2 needs CUDA GPUs and this machine has none"),
        ({"data_parallel_size": 2}, r"vllm.data_parallel_size=2 needs CUDA GPUs"),
        ({"options": {"pipeline_parallel_size": 2}}, r"vllm.pipeline_parallel_size=2 needs CUDA GPUs"),
    ],
)
def test_engine_kwargs_refusals_on_cpu(changes: dict, message: str) -> None:
    with pytest.raises(RacError, match=message):
        engine_kwargs(dataclasses.replace(ENGINE, **changes), on_gpu=False, known=KNOWN, max_model_len=300)


def test_engine_fields_are_vllms() -> None:
    fields = engine_fields()
    assert {"tensor_parallel_size", "data_parallel_size", "max_num_seqs", "dtype", "seed"} <= fields


@pytest.mark.parametrize(("n_prompts", "size"), [(10, 3), (2, 4), (8, 2), (1, 1)])
def test_data_parallel_shards_cover_every_prompt_once(n_prompts: int, size: int) -> None:
    parts = shards(n_prompts, size)
    assert len(parts) == size and sorted(i for part in parts for i in part) == list(range(n_prompts))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_rank_environment_gives_each_rank_its_gpus() -> None:
    engine = dataclasses.replace(ENGINE, tensor_parallel_size=2, data_parallel_size=3)
    envs = [rank_environment(rank, engine) for rank in range(3)]
    assert envs == [{"CUDA_VISIBLE_DEVICES": gpus} for gpus in ("0,1", "2,3", "4,5")]


def test_unknown_vllm_option_fails_before_loading(tmp_path: Path) -> None:
    p = load_params(Path(__file__).parents[1] / "params.yaml")
    engine = dataclasses.replace(p.vllm, options={"no_such_option": 1})
    with pytest.raises(RacError, match=r"\['no_such_option'\] are not vLLM engine arguments"):
        generate(str(EMBEDDED), [[1, 5]], dataclasses.replace(p.rollout, backend="vllm"), 1, engine)


@pytest.mark.gpu
def test_data_parallel_engines_match_one_engine_on_gpus() -> None:
    """CUDA vLLM: two engines on a shard of the prompts each give the greedy completions of one engine."""
    if torch.cuda.device_count() < 2:
        pytest.skip("data parallelism needs 2 GPUs")
    p = load_params(Path(__file__).parents[1] / "params.yaml")
    tokenizer, task = load_tokenizer(str(EMBEDDED)), get_task(p.task, p.benchmarks)
    prompts = [encode_prompt(tokenizer, pr.prompt, p.chat.system_prompt) for pr in task.problems(8, 5)]
    greedy = dataclasses.replace(p.evaluate, backend="vllm", temperature=0.0, max_new_tokens=64)
    one = generate(str(EMBEDDED), prompts, greedy, 1, p.vllm)
    two = generate(str(EMBEDDED), prompts, greedy, 1, dataclasses.replace(p.vllm, data_parallel_size=2))
    assert two == one
