"""Dense against sequential calibration (``prune.calibration``), side by side in one run.

For every calibration source and sparsity: prune with the cached dense store and with the sequential layer walk
(same calibration sequences, same pruner), evaluate both, and print accuracy, mean CoT tokens and the fraction
that hit the length limit, with the prune wall time of each mode. It reads the calibration sets and stores that
``dvc repro`` left in ``data/`` of the project it runs in (the embedded model by default; a preset's project
for a real model), and writes only under ``--work``.

    python benchmarks/calibration_modes.py --sparsities 0.6 0.7 0.8
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

MODES = ("dense", "sequential")


def rac(*args: str, cwd: Path) -> float:
    """Run ``rac ARGS`` in ``cwd``; return its wall seconds (its stderr on failure)."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    start = time.perf_counter()
    proc = subprocess.run(["rac", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"rac {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def row(metrics: dict[str, Any]) -> str:
    return (
        f"{metrics['accuracy']:.3f} ± {metrics['accuracy_se']:.3f} | {metrics['mean_cot_tokens']:.1f} | "
        f"{metrics['frac_hit_max']:.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--project", type=Path, default=Path.cwd(), help="project folder after `dvc repro`")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.6, 0.7, 0.8])
    parser.add_argument("--sources", nargs="+", default=None, help="default: params `sources`")
    parser.add_argument("--work", type=Path, default=None, help="where pruned models go (default: a temp folder)")
    args = parser.parse_args()
    project = args.project.resolve()
    params = yaml.safe_load((project / "params.yaml").read_text())
    sources = args.sources or params["sources"]
    print(f"model {params['model']}, pruner {params['pruner']}, task {params['task']}, {os.cpu_count()} CPUs")
    print(f"load at the start {os.getloadavg()}")
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        dense = json.loads((project / "data" / "evaluate" / "dense" / "metrics.json").read_text())
        lines = [
            "| source | sparsity | mode | accuracy | mean CoT tokens | hit max | prune s |",
            "| --- | --- | --- | --- | --- | --- | --- |",
            f"| dense | 0 | - | {row(dense)} | - |",
        ]
        for sparsity in args.sparsities:
            for source in sources:
                for mode in MODES:
                    name = f"{source}-{sparsity}-{mode}"
                    run = json.loads(json.dumps(params))
                    run["sparsity"] = sparsity
                    run["prune"]["calibration"] = mode
                    p = work / f"{name}.yaml"
                    p.write_text(yaml.safe_dump(run, sort_keys=False))
                    seconds = rac(
                        "prune", "--params", str(p), "--hessians", f"data/hessians/{source}.zarr",
                        "--calib", f"data/calibrate/{source}.parquet", "--out", str(work / name), cwd=project,
                    )  # fmt: skip
                    rac("evaluate", "--params", str(p), "--model", str(work / name), "--out", str(work / f"e-{name}"),
                        cwd=project)  # fmt: skip
                    metrics = json.loads((work / f"e-{name}" / "metrics.json").read_text())
                    lines.append(f"| {source} | {sparsity} | {mode} | {row(metrics)} | {seconds:.1f} |")
                    print(lines[-1], flush=True)
    print("\n".join(lines))
    print(f"load at the end {os.getloadavg()}")


if __name__ == "__main__":
    main()
