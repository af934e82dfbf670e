"""Reads: the dense model, the pruned model of every source under ``--pruned``, params ``model``, ``task``,
``benchmarks``, ``sources``, ``evaluate.seed``, ``analyze``.
Writes: ``errors.parquet`` (``schemas.ERRORS``), ``metrics.json`` (mean error over prompt and decode tokens
per source) and ``heatmap.png`` (the paper's figure 2: e_prompt / e_rac per problem and token).

On held-out problems, the dense model's greedy rollout is fed to the dense and to each pruned model, and
e_t = ‖h_dense,t − h_pruned,t‖₂ is taken of the final hidden state (the one the LM head reads) at every token.
"""

import json
import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.colors import TwoSlopeNorm
from tqdm import tqdm

from stages.errors import RacError
from stages.generation import generate
from stages.models import check_chat_template, compute_device, encode_prompt, load_model, load_tokenizer
from stages.params import Params, SamplingParams
from stages.schemas import ERRORS, SEGMENT_IDS, atomic_path, write_parquet
from stages.tasks import get_task

log = logging.getLogger(__name__)

RATIO = ("prompt", "rac")  # the heatmap shows e_prompt / e_rac, as in the paper


@torch.no_grad()
def final_hidden_states(model: str, sequences: list[list[int]]) -> list[torch.Tensor]:
    """The final hidden state [T, hidden] of ``model`` at every position of each sequence, on the CPU in fp32."""
    lm = load_model(model, compute_device())
    out = []
    for ids in tqdm(sequences, desc=f"hidden states {model}", unit="seq"):
        input_ids = torch.tensor([ids], device=lm.device)  # [1, T]
        out.append(lm.base_model(input_ids=input_ids).last_hidden_state[0].float().cpu())  # [T, hidden]
    del lm
    return out


def token_errors(dense: list[torch.Tensor], pruned: list[torch.Tensor]) -> list[np.ndarray]:
    """e_t = ‖h_dense,t − h_pruned,t‖₂ at every position [T] of each sequence."""
    return [torch.linalg.vector_norm(d - q, dim=-1).numpy() for d, q in zip(dense, pruned, strict=True)]


def segment_means(errors: list[np.ndarray], n_prompt: list[int]) -> dict[str, float]:
    """Mean error over the tokens of each segment (``mean_error_prompt``, ``mean_error_decode``), each token
    weighing the same."""
    flat = np.concatenate(errors)  # [sum T]
    prompt, decode = SEGMENT_IDS["prompt"], SEGMENT_IDS["decode"]
    segment = np.concatenate(  # [sum T]: the first n_prompt positions of each sequence are the prompt
        [np.where(np.arange(len(e)) < n, prompt, decode) for e, n in zip(errors, n_prompt, strict=True)]
    )
    return {f"mean_error_{name}": float(flat[segment == i].mean()) for name, i in SEGMENT_IDS.items()}


def plot_heatmap(numerator: list[np.ndarray], denominator: list[np.ndarray], n_prompt: list[int], path: Path) -> None:
    """Heatmap of log2(e_num / e_den): rows are problems, columns token indices, black dashes the prompt end."""
    width = max(len(e) for e in numerator)
    ratio = np.full((len(numerator), width), np.nan)  # [problems, tokens]; NaN past a sequence's end
    for row, (num, den) in enumerate(zip(numerator, denominator, strict=True)):
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio[row, : len(num)] = np.log2(num / den)
    finite = np.abs(ratio[np.isfinite(ratio)])
    limit = max(float(np.percentile(finite, 99)), 1e-3) if finite.size else 1.0  # a few outliers keep their color
    fig, ax = plt.subplots(figsize=(10, 0.25 * len(numerator) + 1.5))
    cmap = plt.get_cmap("RdBu").with_extremes(bad="0.9")
    image = ax.imshow(
        np.clip(ratio, -limit, limit),
        aspect="auto",
        cmap=cmap,
        norm=TwoSlopeNorm(0.0, -limit, limit),
        interpolation="nearest",
    )
    rows = np.arange(len(n_prompt))
    ax.step(np.array(n_prompt) - 0.5, rows, where="mid", color="black", linestyle="--", linewidth=1.2)
    ax.set_xlabel("token index (black dashes: prompt/decode boundary)")
    ax.set_ylabel("held-out problem")
    ticks = np.linspace(-limit, limit, 5)
    bar = fig.colorbar(image, ax=ax, ticks=ticks)
    bar.ax.set_yticklabels([f"{2**t:.2g}" for t in ticks])
    bar.set_label(f"e_{RATIO[0]} / e_{RATIO[1]} (blue: {RATIO[1]} lower)")
    ax.set_title(f"Per-token reconstruction error ratio e_{RATIO[0]} / e_{RATIO[1]} of the final hidden state")
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)


def run(p: Params, pruned: Path, out: Path) -> None:
    """Compare each source's pruned model under ``pruned`` with the dense model, and write ``out``."""
    missing = [s for s in RATIO if s not in p.sources]
    if missing:
        raise RacError(f"analyze plots e_prompt / e_rac but sources={p.sources} lacks {missing}; add them to sources")
    models = {source: pruned / source for source in p.sources}
    absent = [str(m) for m in models.values() if not (m / "config.json").is_file()]
    if absent:
        raise RacError(f"pruned models {absent} do not exist; run `dvc repro` to prune them first")
    task, a = get_task(p.task, p.benchmarks), p.analyze
    tokenizer = load_tokenizer(p.dense)
    check_chat_template(tokenizer, p.dense, p.chat.require_template)
    problems = task.problems(a.n_problems, p.evaluate.seed)  # the first held-out evaluation problems
    prompts = [encode_prompt(tokenizer, problem.prompt, p.chat.system_prompt) for problem in problems]
    greedy = SamplingParams(a.backend, temperature=0.0, top_p=1.0, max_new_tokens=a.max_new_tokens, seed=0)
    rollouts = generate(p.dense, prompts, greedy, 1, p.vllm)
    sequences = [prompt + g.token_ids for prompt, (g,) in zip(prompts, rollouts, strict=True)]
    n_prompt = [len(prompt) for prompt in prompts]
    dense = final_hidden_states(p.dense, sequences)
    errors = {source: token_errors(dense, final_hidden_states(str(m), sequences)) for source, m in models.items()}
    result: dict[str, dict[str, float | None]] = {source: segment_means(e, n_prompt) for source, e in errors.items()}
    num, den = (result[source] for source in RATIO)
    result[f"{RATIO[0]}_over_{RATIO[1]}"] = {  # None where e_rac is 0, as for a copy of the dense model
        segment: num[f"mean_error_{segment}"] / d if (d := den[f"mean_error_{segment}"]) else None
        for segment in SEGMENT_IDS
    }
    rows = [
        {"model": source, "problem_id": i, "n_prompt_tokens": n, "token_ids": ids, "errors": e.tolist()}
        for source, per_problem in errors.items()
        for i, (n, ids, e) in enumerate(zip(n_prompt, sequences, per_problem, strict=True))
    ]
    write_parquet(rows, ERRORS, out / "errors.parquet", {"model": p.dense, "task": p.task, "sources": p.sources})
    with atomic_path(out / "heatmap.png") as tmp:
        plot_heatmap(errors[RATIO[0]], errors[RATIO[1]], n_prompt, tmp)
    with atomic_path(out / "metrics.json") as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    for source in errors:
        log.info(
            "analyze %s: mean error %.4f on prompt tokens, %.4f on decode tokens",
            source,
            result[source]["mean_error_prompt"],
            result[source]["mean_error_decode"],
        )
