"""Reads: params ``model``, ``calib_task``, ``benchmarks``, ``rollout``. Writes: traces Parquet (``schemas.TRACES``).

Samples on-policy chains of thought from the dense model on calibration prompts.
"""

import logging
from pathlib import Path

from stages.generation import generate
from stages.models import encode_prompt, fingerprint, load_tokenizer, vocab_hash
from stages.params import Params
from stages.schemas import TRACES, generation_columns, write_parquet
from stages.tasks import get_task

log = logging.getLogger(__name__)


def run(p: Params, out: Path, model: str) -> None:
    """Sample ``rollout.samples_per_prompt`` CoTs per prompt from ``model`` and write them with exact token ids.

    ``model`` is ``p.model`` for on-policy traces, or another model for the ``offpolicy`` source.
    """
    task, s = get_task(p.calib_task, p.benchmarks), p.rollout
    tokenizer = load_tokenizer(model)
    problems = task.problems(s.n_prompts, s.seed)
    prompts = [encode_prompt(tokenizer, pr.prompt) for pr in problems]
    generations = generate(model, prompts, s, s.samples_per_prompt)
    rows = []
    for prompt_id, (problem, prompt_ids, samples) in enumerate(zip(problems, prompts, generations, strict=True)):
        for sample_idx, g in enumerate(samples):
            completion = tokenizer.decode(g.token_ids, skip_special_tokens=True)
            rows.append(
                {
                    "prompt_id": prompt_id,
                    "sample_idx": sample_idx,
                    "prompt_token_ids": prompt_ids,
                    "completion_token_ids": g.token_ids,
                    **generation_columns(
                        problem.prompt, completion, prompt_ids, g.token_ids, g.finish_reason, problem.answer
                    ),
                    "correct": task.is_correct(completion, problem.answer),
                }
            )
    n_tokens = sum(r["n_prompt_tokens"] + r["n_completion_tokens"] for r in rows)
    accuracy = sum(r["correct"] for r in rows) / len(rows)
    log.info("rollout: %d traces, %d tokens, dense accuracy %.3f", len(rows), n_tokens, accuracy)
    write_parquet(
        rows,
        TRACES,
        out,
        {
            "model": model,
            "model_fingerprint": fingerprint(model),
            "tokenizer": vocab_hash(tokenizer),
            "task": p.calib_task,
            "sampling": {k: getattr(s, k) for k in ("temperature", "top_p", "max_new_tokens")},
            "backend": s.backend,
            "seed": s.seed,
            "n_tokens": n_tokens,
        },
    )
