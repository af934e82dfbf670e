"""A real model of a family outside the embedded pipeline, through rac's layer walk: the `model` stage's check, the
walk against the model's own forward, a Hessian build's memory plan against the peak RSS it measured, and
SparseGPT at 50% from that store with its held-out perplexity.

Calibration: ``--n-calib`` × ``--seq-len`` tokens of Python-docs prose (the first half of each sequence as the
prompt segment, the rest as decode); held out: 8 later sequences. The build runs in a fresh process whose RSS
high-water mark (VmHWM) is reset after its imports, so the growth is the build's alone. Everything is written under
a temporary folder.

    python benchmarks/real_family.py --model ~/.cache/rac/gemma3-270m
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from stages import prune
from stages.corpus import documents
from stages.layers import ActivationCache, LayerWalk, batches, check_walkable, open_skeleton
from stages.models import decoder_layers, load_model, load_tokenizer
from stages.params import load_params
from stages.schemas import CALIBRATION, write_parquet

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
N_HELD = 8

BUILD = """
import json, re, sys
from pathlib import Path
from stages import hessians
from stages.params import load_params
def hwm():
    return int(re.search(r"VmHWM:\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1)) / 2**20
Path("/proc/self/clear_refs").write_text("5")
before = hwm()
measured = hessians.run(load_params(Path(sys.argv[1])), Path(sys.argv[2]), Path(sys.argv[3]), 1)
print(json.dumps({"before": before, "peak": hwm(), **measured}))
"""


def sequences(model: str, n: int, seq_len: int) -> list[list[int]]:
    """``n`` sequences of ``seq_len`` token ids of Python-docs prose, in document order."""
    tokenizer = load_tokenizer(model)
    ids: list[int] = []
    for doc in documents("python-docs", 0, 0):
        ids += tokenizer.encode(doc, add_special_tokens=False)
        if len(ids) >= n * seq_len:
            break
    return [ids[i * seq_len : (i + 1) * seq_len] for i in range(n)]


@torch.no_grad()
def walk_matches_forward(model: str, seqs: list[list[int]], work_dir: Path) -> tuple[bool, float]:
    """Whether every decoder layer's outputs from the walk equal the forward's bitwise, and the largest gap."""
    lm = load_model(model, CPU)
    segs = [[1] * len(s) for s in seqs]
    work = batches(seqs, segs, 10**9, pad=0)
    want: list[torch.Tensor] = []
    hooks = [
        layer.register_forward_hook(lambda _m, _a, out: want.append(out[0] if isinstance(out, tuple) else out))
        for layer in decoder_layers(lm)
    ]
    lm(input_ids=work[0].ids, attention_mask=work[0].attention_mask)
    for hook in hooks:
        hook.remove()
    del lm
    skeleton, _ = open_skeleton(model, CPU)
    walk = LayerWalk(skeleton, work, ActivationCache(float("inf"), work_dir))
    walk.embed()
    equal, gap = True, 0.0
    for i in range(len(skeleton.layers)):
        with skeleton.loaded(skeleton.prefix(i).rstrip(".")) as layer:
            walk.forward(i, layer, keep=True)
        equal &= torch.equal(walk.cache.get(0), want[i])
        gap = max(gap, float((walk.cache.get(0) - want[i]).abs().max()))
    return equal, gap


@torch.no_grad()
def perplexity(model: str, seqs: list[list[int]]) -> float:
    lm = load_model(model, CPU)
    nll, n = 0.0, 0
    for s in seqs:
        ids = torch.tensor([s])
        nll += float(lm(input_ids=ids, labels=ids).loss) * (len(s) - 1)
        n += len(s) - 1
    return math.exp(nll / n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--n-calib", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(2)
    start = time.perf_counter()
    check_walkable(args.model, CPU)
    check_s = time.perf_counter() - start
    seqs = sequences(args.model, args.n_calib + N_HELD, args.seq_len)
    calib, held = seqs[: args.n_calib], seqs[args.n_calib :]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        equal, gap = walk_matches_forward(args.model, held[:2], work / "walk")
        rows = [{"seq_id": i, "token_ids": s, "segment": [0] * (len(s) // 2) + [1] * (len(s) - len(s) // 2),
                 "source": "rac"} for i, s in enumerate(calib)]  # fmt: skip
        write_parquet(rows, CALIBRATION, work / "calib.parquet", {"source": "rac"})
        raw = yaml.safe_load((ROOT / "params.yaml").read_text())
        raw |= {"model": args.model, "sparsity": 0.5}
        raw["activations"] |= {"batch_tokens": 2 * args.seq_len}
        (work / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-c", BUILD, str(work / "params.yaml"), str(work / "calib.parquet"), str(work / "h.zarr")],
            capture_output=True, text=True, check=True, env=os.environ | {"PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        build_s = time.perf_counter() - start
        measured = json.loads(proc.stdout.splitlines()[-1])
        p = load_params(work / "params.yaml")
        start = time.perf_counter()
        prune.run(p, work / "h.zarr", None, work / "pruned")
        prune_s = time.perf_counter() - start
        report = json.loads((work / "pruned" / "report.json").read_text())
        dense_ppl, pruned_ppl = perplexity(args.model, held), perplexity(str(work / "pruned"), held)
    print(f"model check (`rac model`, 4 tokens): {check_s:.1f} s")
    print(f"walk = forward bitwise on 2 x {args.seq_len} held-out tokens: {equal} (max |gap| {gap:g})")
    print(f"hessians on {args.n_calib} x {args.seq_len} tokens: {build_s:.1f} s")
    print("| plan peak GB | of which embedding | measured RSS growth GB | peak RSS GB |")
    print("| --- | --- | --- | --- |")
    print(f"| {measured['plan_peak_gb']:.3f} | {measured['plan_embedding_gb']:.3f} | "
          f"{measured['peak'] - measured['before']:.3f} | {measured['peak']:.3f} |")  # fmt: skip
    print(f"SparseGPT 0.5 (dense store): {prune_s:.1f} s, achieved {report['achieved_sparsity']:.4f}")
    print(f"held-out perplexity ({N_HELD} x {args.seq_len} tokens): dense {dense_ppl:.2f}, pruned {pruned_ppl:.2f}")


if __name__ == "__main__":
    main()
