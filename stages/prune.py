"""Reads: a Hessian store, the dense model, params ``model``, ``sparsity``, ``pruner``, ``prune``.
Writes: a pruned HF model directory (safetensors, config, tokenizer) with ``report.json``
(per-layer loss, achieved sparsity, damping used, seconds).
"""

import json
import logging
import os
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoConfig

from stages.errors import RacError
from stages.models import compute_device, decoder_layers, fingerprint, load_model, load_tokenizer, model_dir
from stages.params import Params
from stages.schemas import HessianStore, atomic_path
from stages.solvers import get_solver, hessian_from_sums

log = logging.getLogger(__name__)


def resolve_kernel(kernel: str) -> str:
    """``auto`` is the fused Triton kernel on CUDA and torch elsewhere; ``triton`` needs CUDA or the interpreter."""
    if kernel == "auto":
        return "triton" if torch.cuda.is_available() else "torch"
    if kernel == "triton" and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        raise RacError("prune.kernel='triton' needs a CUDA GPU (or TRITON_INTERPRET=1 to test); use auto or torch")
    return kernel


@torch.no_grad()
def run(p: Params, hessians: Path, out: Path) -> None:
    """Prune every linear of every decoder layer with ``p.pruner`` on the cached Hessians."""
    solver = get_solver(p.pruner)
    kernel = resolve_kernel(p.prune.kernel)
    store = HessianStore(hessians, fingerprint(p.model))
    device = compute_device()
    model = load_model(p.model, device)
    layers = decoder_layers(model)
    rows = []
    total_zero = total_numel = 0
    for group in tqdm(store.groups(), desc=f"prune ({p.pruner})", unit="group"):
        sums = store.sums(group)
        H = hessian_from_sums(
            {s: torch.from_numpy(x).to(device) for s, x in sums.items()}, group.n_tokens, p.prune.mix
        )  # [in, in]
        for member in group.members:
            linear = layers[group.layer].get_submodule(member)
            start = time.perf_counter()
            result = solver(
                linear.weight.data,
                H,
                sparsity=p.sparsity,
                pattern=p.prune.pattern,
                block_size=p.prune.block_size,
                damp=p.prune.damp,
                kernel=kernel,
            )
            seconds = time.perf_counter() - start
            if result.damp_used > p.prune.damp:
                log.warning(
                    "layer %d %s: Cholesky failed at damp=%g; used damp=%g",
                    group.layer,
                    member,
                    p.prune.damp,
                    result.damp_used,
                )
            linear.weight.data.copy_(result.weight)
            n_zero = int((result.weight == 0).sum())
            total_zero, total_numel = total_zero + n_zero, total_numel + result.weight.numel()
            rows.append(
                {
                    "layer": group.layer,
                    "module": member,
                    "shape": list(result.weight.shape),
                    "loss": result.loss,
                    "sparsity": n_zero / result.weight.numel(),
                    "damp_used": result.damp_used,
                    "seconds": seconds,
                }
            )
    report = {
        "pruner": p.pruner,
        "target_sparsity": p.sparsity,
        "achieved_sparsity": total_zero / total_numel,
        "hessians": str(hessians),
        "source": store.attrs["source"],
        "pattern": p.prune.pattern,
        "kernel": kernel,
        "mix": p.prune.mix,
        "layers": rows,
    }
    # Solved in float32; saved in the checkpoint's own dtype, so a bf16 model stays bf16 on disk.
    model.to(AutoConfig.from_pretrained(model_dir(p.model)).dtype or torch.float32)
    with atomic_path(out) as tmp:
        model.save_pretrained(tmp)
        load_tokenizer(p.model).save_pretrained(tmp)
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    log.info("pruned %s: achieved sparsity %.4f over %d linears", out, report["achieved_sparsity"], len(rows))
