"""Reads: a model directory (dense or pruned), params ``task``, ``evaluate``.
Writes: ``samples.parquet`` (``schemas.SAMPLES``) and ``metrics.json`` (accuracy ± SE, CoT length
mean/median/p90, fraction that hit the max length, wall seconds, generated tokens/s).
"""

import json
import logging
import math
import time
from pathlib import Path

import numpy as np

from stages.generation import generate
from stages.models import check_model_ref, encode_prompt, load_tokenizer
from stages.params import Params
from stages.schemas import SAMPLES, atomic_path, write_parquet
from stages.tasks import get_task

log = logging.getLogger(__name__)


def metrics(correct: list[bool], lengths: list[int], hit_max: list[bool], wall_s: float) -> dict[str, float]:
    """Accuracy with its standard error, CoT length statistics, rambling fraction and speed."""
    n = len(correct)
    accuracy = sum(correct) / n
    return {
        "accuracy": accuracy,
        "accuracy_se": math.sqrt(accuracy * (1 - accuracy) / n),
        "mean_cot_tokens": float(np.mean(lengths)),
        "median_cot_tokens": float(np.median(lengths)),
        "p90_cot_tokens": float(np.percentile(lengths, 90)),
        "frac_hit_max": sum(hit_max) / n,
        "wall_seconds": wall_s,
        "tokens_per_second": sum(lengths) / wall_s,
        "n_samples": n,
    }


def run(p: Params, model: str, out: Path) -> None:
    """Generate on ``evaluate.n_problems`` held-out problems with ``model``, grade, and write ``out``."""
    task, s = get_task(p.task), p.evaluate
    check_model_ref(model)
    tokenizer = load_tokenizer(model)
    problems = task.problems(s.n_problems, s.seed)
    prompts = [encode_prompt(tokenizer, pr.prompt) for pr in problems]
    start = time.perf_counter()
    generations = generate(model, prompts, s, 1)
    wall_s = time.perf_counter() - start
    rows = []
    for problem_id, (problem, prompt_ids, (g,)) in enumerate(zip(problems, prompts, generations, strict=True)):
        completion = tokenizer.decode(g.token_ids, skip_special_tokens=True)
        extracted = task.extract_answer(completion)
        rows.append(
            {
                "problem_id": problem_id,
                "sample_idx": 0,
                "prompt": problem.prompt,
                "completion": completion,
                "n_prompt_tokens": len(prompt_ids),
                "n_completion_tokens": len(g.token_ids),
                "finish_reason": g.finish_reason,
                "answer": problem.answer,
                "extracted": extracted,
                "correct": task.is_correct(completion, problem.answer),
            }
        )
    result = metrics(
        [r["correct"] for r in rows],
        [r["n_completion_tokens"] for r in rows],
        [r["finish_reason"] == "length" for r in rows],
        wall_s,
    )
    write_parquet(rows, SAMPLES, out / "samples.parquet", {"model": model, "task": p.task, "seed": s.seed})
    with atomic_path(out / "metrics.json") as tmp:  # last, so metrics never describe stale samples
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    log.info("evaluate %s: accuracy %.3f, mean CoT %.1f tokens", model, result["accuracy"], result["mean_cot_tokens"])
