"""rac against llm-compressor's oneshot SparseGPT on SmolLM2-135M-Instruct, on the same calibration token ids.

Measures, at sparsity 0.5 and 0.6: wall seconds and peak RSS (``/usr/bin/time -v``, one process per step) of
``rac hessians`` (once) and ``rac prune`` (``prune.calibration: dense`` on the cached store, and ``sequential``),
and of llm-compressor's ``oneshot`` with ``SparseGPTModifier`` (each sparsity from scratch, in its own venv and
process); the Hessian store's size; and for every pruned model and the dense one: held-out perplexity, the mean
over held-out tokens of ‖h_dense − h_pruned‖₂ of the last hidden state, and the achieved sparsity of the decoder
linears (lm_head and embed_tokens must stay dense). Calibration: 64 × 256 tokens of Python-docs prose; held
out: 16 × 256 tokens from later documents. Everything is written under a temporary folder.

    python benchmarks/llmcompressor_compare.py --llmc-python /work/llmc-venv/bin/python
"""

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from stages.corpus import documents
from stages.schemas import CALIBRATION, write_parquet

ROOT = Path(__file__).resolve().parents[1]
SPARSITIES = (0.5, 0.6)
N_CALIB, N_HELD, SEQ_LEN = 64, 16, 256
THREADS = 2
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

LLMC_DRIVER = textwrap.dedent(
    """
    import json, sys, time
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier

    cfg = json.loads(open(sys.argv[1]).read())
    torch.set_num_threads(cfg["threads"])
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(cfg["model"], dtype=torch.float32)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(cfg["model"])
    ids = json.loads(open(cfg["ids"]).read())
    dataset = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids]})
    modifier = SparseGPTModifier(
        sparsity=cfg["sparsity"],
        block_size=cfg["block_size"],
        dampening_frac=cfg["damp"],
        targets=[r"re:.*layers\\.\\d+\\.(self_attn|mlp)\\.(q|k|v|o|gate|up|down)_proj$"],
        ignore=["re:.*lm_head"],
    )
    loaded = time.perf_counter()
    model = oneshot(
        model=model,
        processor=tokenizer,
        dataset=dataset,
        recipe=[modifier],
        num_calibration_samples=len(ids),
        max_seq_length=cfg["seq_len"],
        shuffle_calibration_samples=False,
    )
    calibrated = time.perf_counter()
    # As rac does: write the weights in the checkpoint's dtype (bf16). The class's own save_pretrained, not
    # llm-compressor's wrapper, so that transformers alone loads the result.
    model = model.to(torch.bfloat16)
    type(model).save_pretrained(model, cfg["out"])
    tokenizer.save_pretrained(cfg["out"])
    done = time.perf_counter()
    times = {"load": loaded - start, "oneshot": calibrated - loaded, "save": done - calibrated}
    print("LLMC_TIMES " + json.dumps(times))
    """
)


def build_data(model: Path, work: Path) -> tuple[Path, list[list[int]], list[list[int]]]:
    """The calibration Parquet (64 × 256 tokens, all segment 0) and the held-out ids (16 × 256), from
    Python-docs documents in one seeded order: the held-out set starts at the first document after the
    calibration tokens, so no document feeds both."""
    tokenizer = PreTrainedTokenizerFast.from_pretrained(model)
    tokenizer.model_max_length = 2**30  # whole documents are encoded here, then cut into SEQ_LEN windows
    sep = tokenizer.encode("\n\n", add_special_tokens=False)
    need = N_CALIB * SEQ_LEN
    calib_stream: list[int] = []
    held_stream: list[int] = []
    for doc in documents("python-docs", 0, seed=0):
        ids = tokenizer.encode(doc, add_special_tokens=False) + sep
        if len(calib_stream) < need:
            calib_stream += ids
        else:
            held_stream += ids
            if len(held_stream) >= N_HELD * SEQ_LEN:
                break
    if len(held_stream) < N_HELD * SEQ_LEN:
        raise SystemExit("python-docs is too short for the calibration and held-out sets")
    calib = [calib_stream[i * SEQ_LEN : (i + 1) * SEQ_LEN] for i in range(N_CALIB)]
    held = [held_stream[i * SEQ_LEN : (i + 1) * SEQ_LEN] for i in range(N_HELD)]
    rows = [{"seq_id": i, "token_ids": x, "segment": [0] * len(x), "source": "generic"} for i, x in enumerate(calib)]
    path = work / "calib.parquet"
    write_parquet(rows, CALIBRATION, path, {"source": "generic"})
    (work / "calib_ids.json").write_text(json.dumps(calib))
    return path, calib, held


def timed(cmd: list[str], cwd: Path, log: Path) -> tuple[float, float, str]:
    """Run ``cmd`` under ``/usr/bin/time -v``; return its wall seconds, peak RSS in GB and its output."""
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    output = proc.stdout + proc.stderr
    log.write_text(output)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{output[-4000:]}")
    kb = re.search(r"Maximum resident set size \(kbytes\): (\d+)", output)
    assert kb is not None, output[-2000:]
    return seconds, int(kb.group(1)) / 2**20, output


def rac_runs(model: Path, calib: Path, work: Path) -> list[dict[str, Any]]:
    """``rac hessians`` once, then ``rac prune`` per sparsity in dense and in sequential mode."""
    rac = str(Path(sys.executable).parent / "rac")
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    base["model"] = str(model)
    base["activations"]["disk_dir"] = str(work / "scratch")
    store = work / "H.zarr"
    params = work / "params_hessians.yaml"
    params.write_text(yaml.safe_dump(base))
    cmd = [rac, "hessians", "--params", str(params), "--calib", str(calib), "--out", str(store)]
    seconds, rss, _ = timed(cmd, work, work / "hessians.log")
    size = sum(f.stat().st_size for f in store.rglob("*") if f.is_file()) / 2**20
    runs = [{"method": "rac hessians", "sparsity": None, "seconds": seconds, "rss": rss, "store_mb": size}]
    for mode in ("dense", "sequential"):
        for s in SPARSITIES:
            p = {**base, "sparsity": s, "pruner": "sparsegpt", "prune": {**base["prune"], "calibration": mode}}
            params = work / f"params_{mode}_{s}.yaml"
            params.write_text(yaml.safe_dump(p))
            out = work / f"rac_{mode}_{s}"
            source = ["--hessians", str(store)] if mode == "dense" else ["--calib", str(calib)]
            cmd = [rac, "prune", "--params", str(params), *source, "--out", str(out)]
            cmd += ["--timings", str(work / f"timings_{mode}_{s}.json")]
            seconds, rss, _ = timed(cmd, work, work / f"prune_{mode}_{s}.log")
            runs.append({"method": f"rac {mode}", "sparsity": s, "seconds": seconds, "rss": rss, "dir": out})
            print(f"  rac prune {mode} {s}: {seconds:.1f} s, {rss:.2f} GB", flush=True)
    return runs


def llmc_runs(llmc_python: str, model: Path, work: Path, damp: float, block_size: int) -> list[dict[str, Any]]:
    """llm-compressor's oneshot SparseGPT, from scratch at each sparsity, in its own venv and process."""
    driver = work / "llmc_driver.py"
    driver.write_text(LLMC_DRIVER)
    runs = []
    for s in SPARSITIES:
        out = work / f"llmc_{s}"
        cfg = {
            "model": str(model),
            "ids": str(work / "calib_ids.json"),
            "sparsity": s,
            "damp": damp,
            "block_size": block_size,
            "seq_len": SEQ_LEN,
            "threads": THREADS,
            "out": str(out),
        }
        cfg_path = work / f"llmc_{s}.json"
        cfg_path.write_text(json.dumps(cfg))
        seconds, rss, output = timed([llmc_python, str(driver), str(cfg_path)], work, work / f"llmc_{s}.log")
        inner = json.loads(output.split("LLMC_TIMES ", 1)[1].splitlines()[0])
        runs.append({"method": "llmc", "sparsity": s, "seconds": seconds, "rss": rss, "dir": out, "inner": inner})
        print(f"  llmc {s}: {seconds:.1f} s, {rss:.2f} GB, inner {inner}", flush=True)
    return runs


@torch.no_grad()
def forward(model_dir: Path, held: torch.Tensor) -> tuple[torch.Tensor, float, torch.nn.Module]:
    """Last hidden states [N, T, d] and mean next-token NLL of ``held`` [N, T]."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    hidden, nll = [], []
    for seq in held.split(4):
        out = model(input_ids=seq, output_hidden_states=True)
        hidden.append(out.hidden_states[-1])
        logp = torch.log_softmax(out.logits[:, :-1].float(), dim=-1)
        nll.append(-logp.gather(-1, seq[:, 1:, None]).squeeze(-1).flatten())
    return torch.cat(hidden), float(torch.cat(nll).mean()), model


def sparsity_check(model: torch.nn.Module, dense: torch.nn.Module) -> tuple[float, bool]:
    """Fraction of zeros over the decoder linears; whether embed_tokens and lm_head equal the dense ones."""
    zeros = total = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in LINEARS:
            zeros += int((module.weight == 0).sum())
            total += module.weight.numel()
    intact = all(
        torch.equal(getattr(model, f)().weight, getattr(dense, f)().weight)
        for f in ("get_input_embeddings", "get_output_embeddings")
    )
    return zeros / total, intact


def quality(model: Path, runs: list[dict[str, Any]], held_ids: list[list[int]]) -> dict[str, Any]:
    held = torch.tensor(held_ids)
    h_dense, nll, dense = forward(model, held)
    zeros, _ = sparsity_check(dense, dense)
    result = {"ppl": math.exp(nll), "err": 0.0, "achieved": zeros, "intact": True}
    for run in runs:
        if "dir" not in run:
            continue
        h, nll, pruned = forward(run["dir"], held)
        achieved, intact = sparsity_check(pruned, dense)
        err = float((h - h_dense).norm(dim=-1).mean())
        run.update(ppl=math.exp(nll), err=err, achieved=achieved, intact=intact)
    return result


def fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llmc-python", default="/work/llmc-venv/bin/python")
    parser.add_argument("--keep", type=Path, help="Work folder to keep (default: a removed temporary folder).")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    load_start = os.getloadavg()
    t0 = time.perf_counter()
    model = Path(
        subprocess.run(
            [str(Path(sys.executable).parent / "rac"), "real-model", "smollm2-135m-instruct"],
            capture_output=True,
            text=True,
            check=True,
        )
        .stdout.strip()
        .splitlines()[-1]
    )
    version = subprocess.run(
        [
            args.llmc_python,
            "-c",
            "import importlib.metadata as m; print(m.version('llmcompressor'), "
            "m.version('torch'), m.version('transformers'))",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    print(f"model {model}; llmcompressor, torch, transformers: {version}; rac torch {torch.__version__}")
    work = args.keep or Path(tempfile.mkdtemp(prefix="llmc-compare-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        calib, calib_ids, held_ids = build_data(model, work)
        print(f"calibration {len(calib_ids)} x {SEQ_LEN} tokens, held out {len(held_ids)} x {SEQ_LEN}", flush=True)
        params = yaml.safe_load((ROOT / "params.yaml").read_text())
        runs = rac_runs(model, calib, work)
        print(f"  rac hessians: {runs[0]['seconds']:.1f} s, {runs[0]['rss']:.2f} GB", flush=True)
        runs += llmc_runs(args.llmc_python, model, work, params["prune"]["damp"], params["prune"]["block_size"])
        dense = quality(model, runs, held_ids)
        report(runs, dense)
    finally:
        if args.keep is None:
            shutil.rmtree(work)
    load_end = os.getloadavg()
    print(f"load average (1, 5, 15 min) at start {load_start}, at end {load_end}; {os.cpu_count()} CPUs")
    print(f"whole run: {time.perf_counter() - t0:.0f} s")


def report(runs: list[dict[str, Any]], dense: dict[str, Any]) -> None:
    header = f"{'method':<14} {'sparsity':>8} {'wall s':>8} {'peak GB':>8} {'store MB':>9} {'ppl':>8} "
    header += f"{'hidden err':>10} {'achieved':>9} {'emb/lm_head':>11}"
    print("\n" + header)
    rows = [{"method": "dense", "sparsity": None, "seconds": None, "rss": None, **dense}, *runs]
    for r in rows:
        intact = "-" if "intact" not in r else ("intact" if r["intact"] else "PRUNED")
        print(
            f"{r['method']:<14} {fmt(r['sparsity'], '8.1f')} {fmt(r['seconds'], '8.1f')} {fmt(r['rss'], '8.2f')} "
            f"{fmt(r.get('store_mb'), '9.1f')} {fmt(r.get('ppl'), '8.2f')} {fmt(r.get('err'), '10.3f')} "
            f"{fmt(r.get('achieved'), '9.4f')} {intact:>11}"
        )
    hess = runs[0]
    by = {(r["method"], r["sparsity"]): r for r in runs[1:]}
    print()
    for s in SPARSITIES:
        llmc = by[("llmc", s)]
        for mode in ("dense", "sequential"):
            rac = by[(f"rac {mode}", s)]
            first = hess["seconds"] + rac["seconds"] if mode == "dense" else rac["seconds"]
            rss = max(hess["rss"], rac["rss"]) if mode == "dense" else rac["rss"]
            print(
                f"s={s} rac {mode:<10}: first run ({'hessians + prune' if mode == 'dense' else 'prune'}) / llmc "
                f"time {first / llmc['seconds']:.2f}; prune only: {llmc['seconds'] / rac['seconds']:.2f}x faster "
                f"than llmc; peak RSS rac / llmc {rss / llmc['rss']:.2f}"
            )
        print(
            f"s={s} llmc: load {llmc['inner']['load']:.1f} s, oneshot {llmc['inner']['oneshot']:.1f} s, "
            f"save {llmc['inner']['save']:.1f} s"
        )


if __name__ == "__main__":
    main()
