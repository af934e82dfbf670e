"""Reads: a model directory (dense or pruned), params ``task``, ``benchmarks``, ``chat``, ``evaluate``, ``vllm``.
Writes: ``samples.parquet`` (``schemas.SAMPLES``) and ``metrics.json`` (accuracy ± SE, pass@k, CoT length
mean/median/p90, fraction that hit the max length, fraction with an answer the extractor parses); returns the
volatile wall seconds and generated tokens/s, which the CLI writes to ``--timings`` (outside the DVC outs, so
they stay pure functions of their inputs).
"""

import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from stages.generation import generate
from stages.models import check_chat_template, encode_prompt, load_tokenizer
from stages.params import Params
from stages.sandbox import isolation, limit_scope
from stages.schemas import SAMPLES, atomic_path, generation_columns, write_parquet
from stages.tasks import get_task, normalized

log = logging.getLogger(__name__)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with ``c`` correct among ``n`` samples: 1 - C(n-c, k) / C(n, k)."""
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def metrics(
    correct: list[list[bool]],
    lengths: list[int],
    hit_max: list[bool],
    parseable: list[bool],
    verdicts: list[str],
    names: tuple[str, ...],
) -> dict[str, Any]:
    """Accuracy (acc@1 averaged over each problem's samples) ± its standard error over problems, pass@k for
    k = 1, 2, 4, … up to the samples per problem, CoT length statistics, the rambling fraction, and the fraction
    of completions whose answer the benchmark's extractor can read (0 says: the model answers in another format).

    ``correct`` holds one list of samples per problem; ``lengths``, ``hit_max``, ``parseable`` and ``verdicts``
    (each one of ``names``) one entry per sample.
    """
    n_samples = len(correct[0])
    per_problem = np.array([np.mean(c) for c in correct])  # [problems]
    ks = sorted({2**i for i in range(n_samples.bit_length()) if 2**i <= n_samples} | {n_samples})
    return {
        "accuracy": float(per_problem.mean()),
        "accuracy_se": float(per_problem.std() / math.sqrt(len(per_problem))),
        **{f"pass@{k}": float(np.mean([pass_at_k(n_samples, sum(c), k) for c in correct])) for k in ks},
        "mean_cot_tokens": float(np.mean(lengths)),
        "median_cot_tokens": float(np.median(lengths)),
        "p90_cot_tokens": float(np.percentile(lengths, 90)),
        "frac_hit_max": sum(hit_max) / len(hit_max),
        "frac_parseable": sum(parseable) / len(parseable),
        "n_problems": len(correct),
        "samples_per_problem": n_samples,
        "verdicts": {name: verdicts.count(name) for name in names},
    }


def held_out_texts(p: Params) -> set[str]:
    """The normalized texts of the problems evaluate grades, which calibration must not see."""
    problems = get_task(p.task, p.benchmarks).problems(p.evaluate.n_problems, p.evaluate.seed)
    return {normalized(pr.text) for pr in problems}


def run(p: Params, model: str, out: Path) -> dict[str, float]:
    """Sample ``evaluate.samples_per_problem`` completions on each of ``evaluate.n_problems`` held-out problems
    with ``model``, grade them, and write ``out``; return the generation's wall seconds and tokens/s, and the
    grading's seconds (a code benchmark runs every program)."""
    task, s = get_task(p.task, p.benchmarks), p.evaluate
    tokenizer = load_tokenizer(model)
    check_chat_template(tokenizer, model, p.chat.require_template)
    problems = task.problems(s.n_problems, s.seed)
    prompts = [encode_prompt(tokenizer, pr.prompt, p.chat.system_prompt) for pr in problems]
    start = time.perf_counter()
    engine = p.vllm
    if s.quantization is not None:  # vLLM quantizes the weights as it loads them
        engine = dataclasses.replace(engine, options={**engine.options, "quantization": s.quantization})
    generations = generate(model, prompts, s, s.samples_per_problem, engine)
    wall_s = time.perf_counter() - start
    flat = [
        (problem, prompt_ids, g)
        for problem, prompt_ids, samples in zip(problems, prompts, generations, strict=True)
        for g in samples
    ]
    completions = [tokenizer.decode(g.token_ids, skip_special_tokens=True) for _, _, g in flat]
    start = time.perf_counter()
    verdicts = task.verdicts(completions, [pr.answer for pr, _, _ in flat], p.sandbox.limits, p.sandbox.workers)
    grading_s = time.perf_counter() - start
    k = s.samples_per_problem
    rows = [
        {
            "problem_id": i // k,
            "sample_idx": i % k,
            **generation_columns(
                problem.prompt, completion, prompt_ids, g.token_ids, g.finish_reason, task.answer_text(problem.answer)
            ),
            "extracted": task.extract_answer(completion),
            "correct": verdict == "passed",
            "verdict": verdict,
        }
        for i, ((problem, prompt_ids, g), completion, verdict) in enumerate(
            zip(flat, completions, verdicts, strict=True)
        )
    ]
    result = metrics(
        [[r["correct"] for r in rows[i : i + k]] for i in range(0, len(rows), k)],
        [r["n_completion_tokens"] for r in rows],
        [r["finish_reason"] == "length" for r in rows],
        [r["extracted"] is not None for r in rows],
        verdicts,
        task.verdict_names,
    )
    if task.sandboxed:
        result["sandbox_isolation"] = isolation()
        result["sandbox_limits"] = limit_scope()
        if result["sandbox_isolation"] == "none":
            log.warning("the sandbox has no namespaces here: programs could reach the network and other files")
        if result["sandbox_limits"] == "process":
            log.warning("no cgroup may be made here: the sandbox limits memory per process, not per run")
    write_parquet(rows, SAMPLES, out / "samples.parquet", {"model": model, "task": p.task, "seed": s.seed})
    with atomic_path(out / "metrics.json") as tmp:  # last, so metrics never describe stale samples
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    log.info(
        "evaluate %s: accuracy %.3f, mean CoT %.1f tokens, parseable %.3f",
        model,
        result["accuracy"],
        result["mean_cot_tokens"],
        result["frac_parseable"],
    )
    n_generated = sum(r["n_completion_tokens"] for r in rows)
    return {"wall_seconds": wall_s, "tokens_per_second": n_generated / wall_s, "grading_seconds": grading_s}
