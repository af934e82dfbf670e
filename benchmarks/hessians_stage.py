"""Hessian stage costs, measured side by side in one run on a tiny model built from a config.

1. Overhead: tokens/s of `collect` (one window, and windows of 2 layers) against a plain forward
   over the same batches. Goal: one window ≤ 1.5× the plain forward's time.
2. Peak RSS of `rac hessians` against `hessians.max_memory_gb`, for a model whose full sums exceed
   the smallest budget (each run in its own process).
3. `dvc push` and `dvc pull` of the store to a local-directory remote: seconds and file count.

    python benchmarks/hessians_stage.py
"""

import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from transformers import Qwen2Config, Qwen2ForCausalLM

from stages import toy
from stages.hessians import batches, collect
from stages.models import decoder_layers, load_model
from stages.schemas import CALIBRATION, write_parquet

ROOT = Path(__file__).resolve().parents[1]
HIDDEN, INTERMEDIATE, LAYERS = 512, 2816, 8
N_SEQ, SEQ_LEN, BATCH_TOKENS = 64, 256, 4096


def make_model(path: Path) -> None:
    config = Qwen2Config(
        vocab_size=64,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HIDDEN // 64,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(path)
    toy.build_tokenizer().save_pretrained(path)


def sums_gb() -> float:
    """fp32 bytes of every layer's prompt and decode sums, in GB."""
    per_layer = 2 * 4 * (3 * HIDDEN**2 + INTERMEDIATE**2)
    return LAYERS * per_layer / 2**30


def overhead(model_dir: Path, ids: list[list[int]], segs: list[list[int]]) -> None:
    model = load_model(str(model_dir), torch.device("cpu"))
    n_tokens = sum(map(len, ids))

    @torch.no_grad()
    def plain() -> None:
        for batch_ids, batch_seg in batches(ids, segs, BATCH_TOKENS, 0):
            model(input_ids=batch_ids, attention_mask=(batch_seg >= 0).long())

    plain()  # warm-up
    timings = {}
    for label, fn in {
        "plain forward": plain,
        "collect, 1 window": lambda: collect(model, ids, segs, BATCH_TOKENS, 0),
        "collect, 4 windows": lambda: [
            collect(model, ids, segs, BATCH_TOKENS, 0, [i, i + 1]) for i in range(0, LAYERS, 2)
        ],
    }.items():
        start = time.perf_counter()
        fn()
        timings[label] = time.perf_counter() - start
    base = timings["plain forward"]
    print(f"\n1. overhead ({n_tokens} tokens, {LAYERS} layers, hidden {HIDDEN}, {len(decoder_layers(model))} layers)")
    for label, seconds in timings.items():
        print(f"   {label:<20} {n_tokens / seconds:9.0f} tokens/s  {seconds / base:5.2f}x plain")


def peak_rss(model_dir: Path, calib: Path, work: Path) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["model"] = str(model_dir)
    print(f"\n2. peak RSS of `rac hessians` (all layers' sums: {sums_gb():.2f} GB fp32)")
    for budget in (sums_gb() * 2, sums_gb() / 2, sums_gb() / 4):
        params["hessians"].update(max_memory_gb=budget, batch_tokens=BATCH_TOKENS)
        p = work / "params.yaml"
        p.write_text(yaml.safe_dump(params))
        # VmHWM is this process's own peak; ru_maxrss would carry the parent's across fork and exec.
        code = (
            "import sys\nfrom stages.cli import main\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "print([line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM')][0])"
        )
        out = work / f"h{budget:.3f}.zarr"
        proc = subprocess.run(
            [sys.executable, "-c", code, "hessians", "--params", str(p), "--calib", str(calib), "--out", str(out)],
            cwd=work,
            capture_output=True,
            text=True,
            check=True,
        )
        rss_mb = int(proc.stdout.strip().splitlines()[-1]) / 1024
        windows = math.ceil(sums_gb() / budget) if budget < sums_gb() else 1
        print(f"   max_memory_gb {budget:6.3f} (~{windows} windows): peak RSS {rss_mb:7.0f} MB")
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
    sh("dvc", "remote", "add", "-d", "team", str(work / "remote"))
    shutil.copytree(store, repo / "h.zarr")
    files = sum(1 for f in (repo / "h.zarr").rglob("*") if f.is_file())
    size = sum(f.stat().st_size for f in (repo / "h.zarr").rglob("*") if f.is_file()) / 2**20
    sh("dvc", "add", "h.zarr")
    push = sh("dvc", "push")
    shutil.rmtree(repo / ".dvc" / "cache")
    shutil.rmtree(repo / "h.zarr")
    pull = sh("dvc", "pull")
    print(f"\n3. dvc with a local remote: store of {files} files, {size:.0f} MB: push {push:.1f} s, pull {pull:.1f} s")


def main() -> None:
    torch.set_num_threads(os.cpu_count() or 1)
    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = work / "model"
        make_model(model_dir)
        g = torch.Generator().manual_seed(0)
        ids = [[1, *torch.randint(4, 46, (SEQ_LEN - 1,), generator=g).tolist()] for _ in range(N_SEQ)]
        segs = [[0] * 32 + [1] * (SEQ_LEN - 32) for _ in ids]
        calib = work / "calib.parquet"
        rows = [
            {"seq_id": i, "token_ids": x, "segment": s, "source": "rac"}
            for i, (x, s) in enumerate(zip(ids, segs, strict=True))
        ]
        write_parquet(
            rows,
            CALIBRATION,
            calib,
            {"source": "rac"},
        )
        overhead(model_dir, ids, segs)
        store = peak_rss(model_dir, calib, work)
        dvc_transfer(store, work)


if __name__ == "__main__":
    main()
