"""Reads: params ``model``, ``calib_task``, ``task``, ``benchmarks``, ``chat``, ``rollout``, ``vllm``
(and ``evaluate.n_problems``/``seed``, to keep evaluation problems out). Writes: traces Parquet
(``schemas.TRACES``), every sampled trace with its grade; ``rollout.keep`` is applied by the rac source.

Samples on-policy chains of thought from the dense model on calibration prompts.
"""

import logging
from pathlib import Path

from stages.evaluate import held_out_texts
from stages.generation import generate
from stages.models import check_chat_template, encode_prompt, fingerprint, load_tokenizer, vocab_hash
from stages.params import Params
from stages.schemas import TRACES, generation_columns, write_parquet
from stages.tasks import calibration_problems, get_task

log = logging.getLogger(__name__)


def run(p: Params, out: Path, model: str) -> None:
    """Sample ``rollout.samples_per_prompt`` CoTs per prompt from ``model`` and write them with exact token ids.

    ``model`` is the dense model for on-policy traces, or another model for the ``offpolicy`` source.
    """
    task, s = get_task(p.calib_task, p.benchmarks), p.rollout
    tokenizer = load_tokenizer(model)
    check_chat_template(tokenizer, model, p.chat.require_template)
    problems = calibration_problems(task, s.n_prompts, s.seed, held_out_texts(p), p.allow_overlap)
    prompts = [encode_prompt(tokenizer, pr.prompt, p.chat.system_prompt) for pr in problems]
    generations = generate(model, prompts, s, s.samples_per_prompt, p.vllm)
    flat = [
        (i, j, problem, prompt_ids, g)
        for i, (problem, prompt_ids, samples) in enumerate(zip(problems, prompts, generations, strict=True))
        for j, g in enumerate(samples)
    ]
    completions = [tokenizer.decode(g.token_ids, skip_special_tokens=True) for *_, g in flat]
    verdicts = task.verdicts(completions, [pr.answer for _, _, pr, _, _ in flat], p.sandbox.limits, p.sandbox.workers)
    rows = [
        {
            "prompt_id": prompt_id,
            "sample_idx": sample_idx,
            "prompt_token_ids": prompt_ids,
            "completion_token_ids": g.token_ids,
            **generation_columns(
                problem.prompt, completion, prompt_ids, g.token_ids, g.finish_reason, task.answer_text(problem.answer)
            ),
            "correct": verdict == "passed",
        }
        for (prompt_id, sample_idx, problem, prompt_ids, g), completion, verdict in zip(
            flat, completions, verdicts, strict=True
        )
    ]
    n_tokens = sum(r["n_prompt_tokens"] + r["n_completion_tokens"] for r in rows)
    n_correct = sum(r["correct"] for r in rows)
    log.info("rollout: %d traces (%d correct), %d tokens", len(rows), n_correct, n_tokens)
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
            "n_correct": n_correct,
        },
    )
