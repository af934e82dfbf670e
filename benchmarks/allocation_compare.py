"""Per-layer allocation against uniform: every ``prune.allocation`` × sparsity × calibration source, pruned from the
project's cached stores and evaluated in one run, with the extra cost of each method over a uniform prune.

Per model: accuracy ± SE, mean CoT tokens, the fraction that hit the length limit (``rac evaluate``), and the
held-out perplexity of chains of thought the dense model samples (temperature 1) on the evaluation problems
(completion tokens only; generated in this run, never seen by calibration). Its log is the cross-entropy
E_{x~dense}[−log q(x)] = H(dense) + KL(dense ‖ q), so it grows with how far a pruned model q drifts from the dense
one on the tokens a reasoning model generates (greedy chains would not do: a sharper model scores them higher).
Per prune: the stage's wall seconds and, from its timings, ``allocation_seconds`` (the method's whole extra work:
the store and weights read again, the scores or the table read, the targets solved; no forward pass). The ``loss``
table (``rac losses``) is paid once per source and is shown apart. It reads what ``dvc repro`` left in ``data/``
(rollout, calibrate, hessians) of the project it runs in and writes only under ``--work``.

    python benchmarks/allocation_compare.py --sparsities 0.7 0.8 --sources prompt rac
"""

import argparse
import copy
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch
import yaml
from compare_settings import rac  # the same `rac` runner, beside this script
from transformers import AutoModelForCausalLM

from stages.models import encode_prompt, load_tokenizer

METHODS = ("uniform", "owl", "loss", "decode_shift")


def write_params(base: dict[str, Any], changes: dict[str, Any], path: Path) -> Path:
    """``base`` with the nested ``changes`` set, written to ``path``."""
    out = copy.deepcopy(base)
    for key, value in changes.items():
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node[part]
        node[leaf] = value
    path.write_text(yaml.safe_dump(out, sort_keys=False))
    return path


def held_out(samples: Path, model: str, system_prompt: str) -> list[tuple[list[int], int]]:
    """(token ids of prompt + completion, number of prompt tokens) of each sample: the prompt as the model saw it
    (BOS or chat template), the completion re-encoded, and EOS where the sample stopped on it."""
    tokenizer = load_tokenizer(model)
    out = []
    for row in pq.read_table(samples).to_pylist():
        prompt = encode_prompt(tokenizer, row["prompt"], system_prompt)
        completion = tokenizer.encode(row["completion"], add_special_tokens=False)
        if row["finish_reason"] == "stop":
            completion.append(tokenizer.eos_token_id)
        if len(completion) != row["n_completion_tokens"]:
            raise SystemExit(f"{samples}: a completion re-encodes to other tokens than the model generated")
        out.append((prompt + completion, len(prompt)))
    return out


@torch.no_grad()
def perplexity(model_dir: Path | str, sequences: list[tuple[list[int], int]]) -> float:
    """exp of the mean negative log-likelihood of the completion tokens of ``sequences``."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    nll, count = 0.0, 0
    for ids, n_prompt in sequences:
        x = torch.tensor([ids])  # [1, T]
        logprobs = torch.log_softmax(model(input_ids=x).logits[0, :-1].double(), dim=-1)  # [T-1, vocab]
        targets = x[0, 1:]  # [T-1]
        picked = logprobs.gather(1, targets[:, None])[:, 0][n_prompt - 1 :]  # the completion tokens
        nll -= float(picked.sum())
        count += picked.numel()
    return math.exp(nll / count)


def evaluated(project: Path, params: Path, model: Path | None, out: Path) -> dict[str, Any]:
    """``rac evaluate`` of ``model`` (None: the dense one): its metrics."""
    args = ["--model", str(model)] if model is not None else ["--dense"]
    rac("evaluate", "--params", str(params), *args, "--out", str(out), cwd=project)
    return json.loads((out / "metrics.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--project", type=Path, default=Path.cwd(), help="project folder after `dvc repro`")
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.7, 0.8])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--sources", nargs="+", default=["prompt", "rac"])
    parser.add_argument("--work", type=Path, default=None, help="where models go, kept (default: a temp folder)")
    args = parser.parse_args()
    project = args.project.resolve()
    base = yaml.safe_load((project / "params.yaml").read_text())
    pruner = base["pruner"]
    print(
        f"model {base['model']}, task {base['task']}, pruner {pruner}, spread {base['prune']['spread']}, "
        f"{os.cpu_count()} CPUs, load {os.getloadavg()}",
        flush=True,
    )
    lines = [
        "| sparsity | allocation | source | accuracy | mean CoT tokens | hit max | held-out CoT ppl | prune s | "
        "allocation s | targets (layer 0 …) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work.resolve() if args.work is not None else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        dense_params = write_params(base, {}, work / "dense.yaml")
        dense = evaluated(project, dense_params, None, work / "e-dense")
        sampling = write_params(base, {"evaluate.temperature": 1.0, "evaluate.top_p": 1.0}, work / "sampled.yaml")
        evaluated(project, sampling, None, work / "e-dense-sampled")
        sequences = held_out(work / "e-dense-sampled" / "samples.parquet", base["model"], base["chat"]["system_prompt"])
        ppl = perplexity(project / base["model"], sequences)
        lines.append(
            f"| 0 | dense | - | {dense['accuracy']:.3f} ± {dense['accuracy_se']:.3f} | "
            f"{dense['mean_cot_tokens']:.1f} | {dense['frac_hit_max']:.3f} | {ppl:.5f} | - | - | - |"
        )
        print(lines[-1], flush=True)
        table_seconds: dict[str, float] = {}

        def table(source: str) -> Path:
            return work / f"losses-{source}.parquet"

        if "loss" in args.methods:
            tables = write_params(base, {"losses.pruners": [pruner]}, work / "tables.yaml")
            for source in args.sources:
                table_seconds[source] = rac(
                    "losses", "--params", str(tables), "--hessians", f"data/hessians/{source}.zarr",
                    "--out", str(table(source)), cwd=project,
                )  # fmt: skip
                print(f"loss table {source} ({pruner}): {table_seconds[source]:.1f} s", flush=True)
        for sparsity in args.sparsities:
            for method in args.methods:
                changes = {"sparsity": sparsity, "prune.allocation": method, "losses.pruners": [pruner]}
                params = write_params(base, changes, work / f"{method}-{sparsity}.yaml")
                for source in args.sources:
                    name = f"{method}-{sparsity}-{source}"
                    model, timings = work / name, work / f"t-{name}.json"
                    seconds = rac(
                        "prune", "--params", str(params), "--hessians", f"data/hessians/{source}.zarr",
                        "--calib", f"data/calibrate/{source}.parquet", "--losses", str(table(source)),
                        "--out", str(model), "--timings", str(timings), cwd=project,
                    )  # fmt: skip
                    t = json.loads(timings.read_text())
                    targets = json.loads((model / "report.json").read_text())["allocation"]["targets"]
                    m = evaluated(project, params, model, work / f"e-{name}")
                    lines.append(
                        f"| {sparsity} | {method} | {source} | {m['accuracy']:.3f} ± {m['accuracy_se']:.3f} | "
                        f"{m['mean_cot_tokens']:.1f} | {m['frac_hit_max']:.3f} | {perplexity(model, sequences):.5f} | "
                        f"{seconds:.1f} | {t['allocation_seconds']:.2f} | {' '.join(f'{x:.3f}' for x in targets)} |"
                    )
                    print(lines[-1], flush=True)
    print("\n".join(lines))
    if table_seconds:
        paid = ", ".join(f"{s} {v:.1f} s" for s, v in table_seconds.items())
        print(f"loss tables (once per source and pruner): {paid}")
    print(f"load at the end {os.getloadavg()}")


if __name__ == "__main__":
    main()
