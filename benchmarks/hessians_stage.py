"""Hessian stage costs, measured side by side in one run on random models built from configs.

1. Time over a plain forward of the same batches (8-layer model): the full-model path rac used before the
   layer walk (``stages/hessians.py`` at commit bd7f509, read from git: one pass per window of layers,
   each stopping after its window) at 1, 2 and 4 windows, against the layer walk (``stages.layers``) with
   every activation in memory and with all but one batch spilled to disk. Goal: ≤ 1.3× at every count.
2. Peak RSS of a whole ``rac hessians`` run (each in its own process) on a 16-layer model whose fp32 weights
   are over 3× the activation budget given: the layer walk against the full-model path.
3. ``dvc push`` and ``dvc pull`` of the store to a local-directory remote: seconds and file count.

    python benchmarks/hessians_stage.py                  # all three
    python benchmarks/hessians_stage.py --parts 2 --rss-paths full   # the full-model path's peak RSS alone
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import torch
import yaml
from transformers import Qwen2Config, Qwen2ForCausalLM

from stages import toy
from stages.hessians import layer_sums
from stages.layers import ActivationCache, LayerWalk, Skeleton, batches
from stages.schemas import CALIBRATION, write_parquet

ROOT = Path(__file__).resolve().parents[1]
BEFORE = "bd7f509"  # the last commit with the full-model windowed path
N_SEQ, SEQ_LEN, BATCH_TOKENS = 64, 256, 4096
TIMED = {"hidden": 512, "intermediate": 2816, "layers": 8}
BIG = {"hidden": 1024, "intermediate": 5632, "layers": 16}


def make_model(path: Path, hidden: int, intermediate: int, layers: int) -> int:
    """Save a seeded random Qwen2 of this shape with the character tokenizer; return its fp32 weight bytes."""
    config = Qwen2Config(
        vocab_size=64,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(path)
    toy.build_tokenizer().save_pretrained(path)
    return sum(p.numel() for p in model.parameters()) * 4


def old_hessians() -> types.ModuleType:
    """``stages/hessians.py`` as of BEFORE, bound to that commit's ``stages/models.py``."""
    modules = {}
    for name in ("models", "hessians"):
        source = subprocess.run(
            ["git", "show", f"{BEFORE}:stages/{name}.py"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout
        module = types.ModuleType(f"old_{name}")
        saved = sys.modules["stages.models"]
        sys.modules["stages.models"] = modules.get("models", saved)
        try:
            exec(compile(source, f"{BEFORE}:stages/{name}.py", "exec"), module.__dict__)
        finally:
            sys.modules["stages.models"] = saved
        modules[name] = module
    return modules["hessians"]


def overhead(model_dir: Path, ids: list[list[int]], segs: list[list[int]], work: Path) -> None:
    old = old_hessians()
    model = old.load_model(str(model_dir), torch.device("cpu"))
    n_tokens = sum(map(len, ids))
    layers = TIMED["layers"]

    @torch.no_grad()
    def plain() -> None:
        for batch_ids, batch_seg in old.batches(ids, segs, BATCH_TOKENS, 0):
            model(input_ids=batch_ids, attention_mask=(batch_seg >= 0).long())

    def walk(budget: float) -> None:
        skeleton = Skeleton(str(model_dir), torch.device("cpu"))
        groups = skeleton.groups()
        cache = ActivationCache(budget, work / "scratch")
        try:
            for _ in layer_sums(LayerWalk(skeleton, batches(ids, segs, BATCH_TOKENS, 0), cache), groups):
                pass
        finally:
            cache.close()

    one_batch = BATCH_TOKENS * TIMED["hidden"] * 4
    runs = {
        "plain forward": plain,
        **{
            f"full model, {k} window{'s' * (k > 1)}": lambda k=k: [
                old.collect(model, ids, segs, BATCH_TOKENS, 0, list(range(w, w + layers // k)))
                for w in range(0, layers, layers // k)
            ]
            for k in (1, 2, 4)
        },
        "layer walk, in memory": lambda: walk(float("inf")),
        "layer walk, spilled to disk": lambda: walk(one_batch),
    }
    plain()  # warm-up
    timings = {}
    for label, fn in runs.items():
        start = time.perf_counter()
        fn()
        timings[label] = time.perf_counter() - start
    base = timings["plain forward"]
    print(f"\n1. time over a plain forward ({n_tokens} tokens, {layers} layers, hidden {TIMED['hidden']})")
    for label, seconds in timings.items():
        print(f"   {label:<30} {seconds:7.2f} s  {n_tokens / seconds:8.0f} tokens/s  {seconds / base:5.2f}x plain")


RSS_DRIVER = """
import sys, types
from stages.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exit:
    if exit.code:
        raise
print([line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM')][0])
"""

OLD_DRIVER = """
import sys, types
from pathlib import Path
sys.path.insert(0, {bench!r})
from hessians_stage import old_hessians
from stages.params import load_params
p = load_params(Path(sys.argv[1]))
old = old_hessians()
params = types.SimpleNamespace(dense=p.dense, hessians=types.SimpleNamespace(
    batch_tokens=p.activations.batch_tokens, max_memory_gb=float(sys.argv[4]), chunk=p.hessians.chunk))
old.build(params, Path(sys.argv[2]), Path(sys.argv[3]), 0, 1)
print([line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM')][0])
"""


def peak_rss(model_dir: Path, weight_bytes: int, calib: Path, work: Path, paths: list[str]) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    budget_gb = weight_bytes / 2**30 / 4  # the weights are 4x the activation budget
    params["model"] = str(model_dir)
    params["activations"].update(batch_tokens=BATCH_TOKENS, memory_gb=budget_gb, disk_dir=str(work / "scratch"))
    p = work / "params.yaml"
    p.write_text(yaml.safe_dump(params))
    h, d, i = BIG["hidden"], BIG["intermediate"], BIG["layers"]
    sums_gb = i * 2 * 4 * (3 * h * h + d * d) / 2**30
    print(
        f"\n2. peak RSS of a whole build ({BIG['layers']} layers, fp32 weights {weight_bytes / 2**30:.2f} GB, "
        f"activations {N_SEQ * SEQ_LEN * h * 4 / 2**30:.2f} GB, all sums {sums_gb:.2f} GB)"
    )
    out = work / "walk.zarr"
    runs = {
        f"walk: layer walk, activations.memory_gb {budget_gb:.3f}": [
            sys.executable,
            "-c",
            RSS_DRIVER,
            "hessians",
            "--params",
            str(p),
            "--calib",
            str(calib),
            "--out",
            str(out),
        ],
        f"full: full model ({BEFORE}), max_memory_gb {sums_gb / 4:.3f}": [
            sys.executable,
            "-c",
            OLD_DRIVER.format(bench=str(Path(__file__).parent)),
            str(p),
            str(calib),
            str(work / "old.zarr"),
            str(sums_gb / 4),
        ],
    }
    for label, cmd in runs.items():
        if label.split(":")[0] not in paths:
            continue
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(proc.stderr[-3000:])
        rss_gb = int(proc.stdout.strip().splitlines()[-1]) / 2**20
        print(f"   {label:<48} peak RSS {rss_gb:6.2f} GB  {time.perf_counter() - start:6.1f} s")
    return out


def dvc_transfer(store: Path, work: Path) -> None:
    repo = work / "repo"
    repo.mkdir()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}

    def sh(*args: str) -> float:
        start = time.perf_counter()
        subprocess.run(args, cwd=repo, env=env, check=True, capture_output=True)
        return time.perf_counter() - start

    sh("git", "init", "-q")
    sh("dvc", "init", "-q")
    shutil.copy(ROOT / ".dvc" / "config", repo / ".dvc" / "config")
    sh("dvc", "remote", "add", "-d", "team", str(work / "remote"))
    shutil.copytree(store, repo / "h.zarr")
    files = sum(1 for f in (repo / "h.zarr").rglob("*") if f.is_file())
    size = sum(f.stat().st_size for f in (repo / "h.zarr").rglob("*") if f.is_file()) / 2**20
    sh("dvc", "add", "h.zarr")
    links = {f.stat().st_nlink for f in (repo / "h.zarr").rglob("*") if f.is_file()}
    push = sh("dvc", "push")
    shutil.rmtree(repo / ".dvc" / "cache")
    shutil.rmtree(repo / "h.zarr")
    pull = sh("dvc", "pull")
    print(
        f"\n3. dvc with a local remote: store of {files} files, {size:.0f} MB (link counts {sorted(links)}): "
        f"push {push:.1f} s, pull {pull:.1f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", type=int, nargs="+", choices=(1, 2, 3), default=[1, 2, 3], help="which to run")
    parser.add_argument(
        "--rss-paths",
        nargs="+",
        choices=("walk", "full"),
        default=["walk", "full"],
        help="part 2's builds: the layer walk, the full-model path (slow: windows re-run layers); 3 needs walk",
    )
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, {os.cpu_count()} CPUs, load {os.getloadavg()}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        g = torch.Generator().manual_seed(0)
        ids = [[1, *torch.randint(4, 46, (SEQ_LEN - 1,), generator=g).tolist()] for _ in range(N_SEQ)]
        segs = [[0] * 32 + [1] * (SEQ_LEN - 32) for _ in ids]
        calib = work / "calib.parquet"
        rows = [
            {"seq_id": i, "token_ids": x, "segment": s, "source": "rac"}
            for i, (x, s) in enumerate(zip(ids, segs, strict=True))
        ]
        write_parquet(rows, CALIBRATION, calib, {"source": "rac"})
        if 1 in args.parts:
            make_model(work / "timed", TIMED["hidden"], TIMED["intermediate"], TIMED["layers"])
            overhead(work / "timed", ids, segs, work)
        if 3 in args.parts and "walk" not in args.rss_paths:
            raise SystemExit("part 3 pushes the layer walk's store: keep walk in --rss-paths")
        if 2 in args.parts or 3 in args.parts:
            weight_bytes = make_model(work / "big", BIG["hidden"], BIG["intermediate"], BIG["layers"])
            store = peak_rss(work / "big", weight_bytes, calib, work, args.rss_paths)
            if 3 in args.parts:
                dvc_transfer(store, work)
    print(f"load at the end {os.getloadavg()}")


if __name__ == "__main__":
    main()
