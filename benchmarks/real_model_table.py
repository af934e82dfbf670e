"""The real-model table of a finished `dvc repro` (e.g. SmolLM2 with presets/smollm2-135m-instruct.yaml): per
source accuracy ± SE, parseable fraction, mean CoT tokens, hit-max fraction, analyze's prompt/decode errors,
the paired RAC − prompt-only accuracy difference on the same problems, and each stage's seconds.

    python benchmarks/real_model_table.py --repo .
"""

import argparse
import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import yaml


def paired_difference(a: list[bool], b: list[bool]) -> tuple[float, float]:
    """Mean of a − b over the same problems and its standard error (the paired test that settles a vs b)."""
    diffs = [float(x) - float(y) for x, y in zip(a, b, strict=True)]
    mean = sum(diffs) / len(diffs)
    var = sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1)
    return mean, math.sqrt(var / len(diffs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=Path("."), help="Project folder after `dvc repro`.")
    repo = parser.parse_args().repo
    params = yaml.safe_load((repo / "params.yaml").read_text())
    names = ["dense", *params["sources"]]
    errors = json.loads((repo / "data" / "analyze" / "metrics.json").read_text())
    print(f"sparsity {params['sparsity']}, pruner {params['pruner']}, {params['task']}\n")
    print("| model | accuracy ± SE | parseable | mean CoT tokens | hit max | e_t prompt | e_t decode |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    correct = {}
    for name in names:
        m = json.loads((repo / "data" / "evaluate" / name / "metrics.json").read_text())
        samples = pq.read_table(repo / "data" / "evaluate" / name / "samples.parquet").to_pylist()
        correct[name] = [r["correct"] for r in sorted(samples, key=lambda r: (r["problem_id"], r["sample_idx"]))]
        e = errors.get(name, {})
        cells = [f"{e[k]:.3f}" if k in e else "—" for k in ("mean_error_prompt", "mean_error_decode")]
        print(
            f"| {name} | {m['accuracy']:.3f} ± {m['accuracy_se']:.3f} | {m['frac_parseable']:.3f} | "
            f"{m['mean_cot_tokens']:.1f} | {m['frac_hit_max']:.3f} | {cells[0]} | {cells[1]} |"
        )
    for other in [s for s in params["sources"] if s != "rac"]:
        mean, se = paired_difference(correct["rac"], correct[other])
        print(f"\nRAC − {other} on the same {len(correct['rac'])} problems: {mean:+.3f} ± {se:.3f} (paired SE)")
    print("\n| stage | seconds |\n| --- | --- |")
    for file in sorted((repo / "data" / "timings").glob("*.json")):
        t = json.loads(file.read_text())
        extra = (
            f" (generation {t['wall_seconds']:.1f} s, {t['tokens_per_second']:.1f} tok/s)"
            if "wall_seconds" in t
            else ""
        )
        print(f"| {file.stem} | {t['stage_seconds']:.1f}{extra} |")


if __name__ == "__main__":
    main()
