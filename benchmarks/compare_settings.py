"""Compressed models side by side: named params settings × calibration sources, pruned and evaluated in one run.

For every setting (a few params keys over the project's params.yaml) and every calibration source, run
``rac prune`` on the project's cached store (or, in ``prune.calibration: sequential``, its calibration set) and
``rac evaluate``, then print one table: accuracy ± SE, mean CoT tokens, the fraction that hit the length limit,
prune seconds and generation tokens/s, with the dense model first (evaluated in the same run, so that its
tokens/s is measured beside the others'). It reads what ``dvc repro`` left in ``data/`` of the project it runs
in (the embedded model by default; a preset's project for a real model) and writes only under ``--work``.

    python benchmarks/compare_settings.py --set dense-0.6 sparsity=0.6 --set seq-0.6 sparsity=0.6 \\
        prune.calibration=sequential
    python benchmarks/compare_settings.py --base vllm.dtype=bfloat16 --set w4a16 pruner=gptq sparsity=0 \
        quant.bits=4 prune.export=compressed-tensors
"""

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml


def rac(*args: str, cwd: Path) -> float:
    """Run ``rac ARGS`` in ``cwd``; return its wall seconds (its stderr on failure)."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    start = time.perf_counter()
    proc = subprocess.run(["rac", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"rac {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def overridden(params: dict[str, Any], assignments: list[str]) -> dict[str, Any]:
    """``params`` with each ``dotted.key=value`` set (values parsed as YAML, as ``dvc exp run -S`` does)."""
    out = copy.deepcopy(params)
    for assignment in assignments:
        key, sep, value = assignment.partition("=")
        if not sep:
            raise SystemExit(f"--set {assignment!r} is not KEY=VALUE")
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node[part]
        if leaf not in node:
            raise SystemExit(f"--set {key!r}: no such key in params.yaml")
        node[leaf] = yaml.safe_load(value)
    return out


def evaluated(project: Path, params: Path, model: Path | None, out: Path) -> dict[str, Any]:
    """``rac evaluate`` of ``model`` (None: the dense one): its metrics and generation tokens/s."""
    args = ["--model", str(model)] if model is not None else ["--dense"]
    rac("evaluate", "--params", str(params), *args, "--out", str(out), "--timings", str(out / "t.json"), cwd=project)
    metrics = json.loads((out / "metrics.json").read_text())
    return metrics | {"tokens_per_second": json.loads((out / "t.json").read_text())["tokens_per_second"]}


def row(name: str, source: str, m: dict[str, Any], prune_s: float | None) -> str:
    seconds = "-" if prune_s is None else f"{prune_s:.1f}"
    return (
        f"| {name} | {source} | {m['accuracy']:.3f} ± {m['accuracy_se']:.3f} | {m['mean_cot_tokens']:.1f} | "
        f"{m['frac_hit_max']:.3f} | {seconds} | {m['tokens_per_second']:.0f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--project", type=Path, default=Path.cwd(), help="project folder after `dvc repro`")
    parser.add_argument(
        "--set",
        nargs="+",
        action="append",
        required=True,
        metavar="NAME KEY=VALUE",
        help="a named setting: its name, then params keys to set (repeat --set for each setting)",
    )
    parser.add_argument(
        "--base", nargs="*", default=[], metavar="KEY=VALUE", help="params keys set for every row, dense included"
    )
    parser.add_argument("--sources", nargs="+", default=None, help="default: params `sources`")
    parser.add_argument("--work", type=Path, default=None, help="where models go (default: a temp folder)")
    args = parser.parse_args()
    project = args.project.resolve()
    base = overridden(yaml.safe_load((project / "params.yaml").read_text()), args.base)
    sources = args.sources or base["sources"]
    print(f"model {base['model']}, task {base['task']}, {os.cpu_count()} CPUs, load {os.getloadavg()}", flush=True)
    lines = [
        "| setting | source | accuracy | mean CoT tokens | hit max | prune s | tokens/s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        (work / "base.yaml").write_text(yaml.safe_dump(base, sort_keys=False))
        lines.append(row("dense", "-", evaluated(project, work / "base.yaml", None, work / "e-dense"), None))
        print(lines[-1], flush=True)
        for name, *assignments in args.set:
            params = work / f"{name}.yaml"
            settings = overridden(base, assignments)
            params.write_text(yaml.safe_dump(settings, sort_keys=False))
            for source in sources:
                model = work / f"{name}-{source}"
                seconds = rac(
                    "prune", "--params", str(params), "--hessians", f"data/hessians/{source}.zarr",
                    "--calib", f"data/calibrate/{source}.parquet", "--out", str(model), cwd=project,
                )  # fmt: skip
                lines.append(row(name, source, evaluated(project, params, model, work / f"e-{name}-{source}"), seconds))
                print(lines[-1], flush=True)
    print("\n".join(lines))
    print(f"load at the end {os.getloadavg()}")


if __name__ == "__main__":
    main()
