"""Reads: a Hessian store, the dense model, params ``model``, ``sparsity``, ``pruner``, ``prune``.
Writes: a pruned HF model directory (safetensors, config, tokenizer) with ``report.json``
(per-layer loss, achieved sparsity, damping used); returns the solver seconds, which the CLI writes to
``--timings`` outside the out, so that identical weights give an identical directory.
"""

import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoConfig

from stages.errors import RacError
from stages.models import (
    compute_device,
    decoder_layers,
    fingerprint,
    linear_groups,
    load_model,
    model_dir,
    tokenizer_files,
)
from stages.params import Params
from stages.schemas import atomic_path
from stages.selection import in_scope, layer_sparsities
from stages.solvers import get_solver, hessian_from_sums, mixed_count
from stages.store import HessianStore

log = logging.getLogger(__name__)


def resolve_kernel(kernel: str) -> str:
    """``auto`` is the fused Triton kernel on CUDA and torch elsewhere; ``triton`` needs CUDA or the interpreter."""
    if kernel == "auto":
        return "triton" if torch.cuda.is_available() else "torch"
    if kernel == "triton" and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        raise RacError("prune.kernel='triton' needs a CUDA GPU (or TRITON_INTERPRET=1 to test); use auto or torch")
    return kernel


@torch.no_grad()
def run(p: Params, hessians: Path, out: Path) -> dict[str, float]:
    """Prune the selected linears of every decoder layer with ``p.pruner`` on the cached Hessians; return the
    seconds spent in the solver."""
    solver = get_solver(p.pruner)
    kernel = resolve_kernel(p.prune.kernel)
    store = HessianStore(hessians, fingerprint(p.dense))
    try:
        mixed_count(store.n_tokens, p.prune.mix)  # every group saw these counts: refuse an empty mix up front
    except ValueError as err:
        raise RacError(f"prune.mix on {str(hessians)!r}: {err}") from err
    device = compute_device()
    model = load_model(p.dense, device)
    store.require_groups(linear_groups(model))  # else a layer missing from the store would stay dense, unreported
    layers = decoder_layers(model)
    targets = layer_sparsities(p.sparsity, p.prune.scope, p.prune.layers, p.prune.overrides, len(layers))
    rows = []
    solver_seconds = 0.0
    for group in tqdm(store.groups(), desc=f"prune ({p.pruner})", unit="group"):
        members = {m: targets[group.layer] if in_scope(m, p.prune.scope) else 0.0 for m in group.members}
        if any(members.values()):
            sums = {s: torch.from_numpy(x).to(device) for s, x in store.sums(group).items()}
            H = hessian_from_sums(sums, group.n_tokens, p.prune.mix)  # [in, in]
        for member, target in members.items():
            linear = layers[group.layer].get_submodule(member)
            row = {"layer": group.layer, "module": member, "shape": list(linear.weight.shape), "target": target}
            if target == 0:
                sparsity = float((linear.weight == 0).float().mean())
                rows.append(row | {"loss": 0.0, "sparsity": sparsity, "damp_used": 0.0})
                continue
            start = time.perf_counter()
            try:
                result = solver(
                    linear.weight.data,
                    H,
                    sparsity=target,
                    pattern=p.prune.pattern,
                    block_size=p.prune.block_size,
                    damp=p.prune.damp,
                    kernel=kernel,
                )
            except ValueError as err:
                raise RacError(f"layer {group.layer} {member}: {err}; raise prune.damp or rebuild the store") from err
            solver_seconds += time.perf_counter() - start
            if result.damp_used > p.prune.damp:
                log.warning(
                    "layer %d %s: Cholesky failed at damp=%g; used damp=%g",
                    group.layer,
                    member,
                    p.prune.damp,
                    result.damp_used,
                )
            linear.weight.data.copy_(result.weight)
            sparsity = float((result.weight == 0).float().mean())
            rows.append(row | {"loss": result.loss, "sparsity": sparsity, "damp_used": result.damp_used})
    numel = [math.prod(r["shape"]) for r in rows]
    pruned = [(r, n) for r, n in zip(rows, numel, strict=True) if r["target"] > 0]
    report = {
        "pruner": p.pruner,
        "target_sparsity": p.sparsity,
        # Over every decoder linear, and over the pruned ones only (they differ under scope/layers).
        "achieved_sparsity": sum(r["sparsity"] * n for r, n in zip(rows, numel, strict=True)) / sum(numel),
        "achieved_sparsity_pruned": sum(r["sparsity"] * n for r, n in pruned) / max(1, sum(n for _, n in pruned)),
        "scope": p.prune.scope,
        "layers_spec": p.prune.layers,
        "overrides": p.prune.overrides,
        "hessians": str(hessians),
        "source": store.attrs["source"],
        "pattern": p.prune.pattern,
        "kernel": kernel,
        "mix": p.prune.mix,
        "layers": rows,
    }
    # Solved in float32; saved in the checkpoint's own dtype, so a bf16 model stays bf16 on disk.
    model.to(AutoConfig.from_pretrained(model_dir(p.dense)).dtype or torch.float32)
    with atomic_path(out) as tmp:
        model.save_pretrained(tmp)
        for file in tokenizer_files(p.dense):
            shutil.copyfile(file, tmp / file.name)
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    log.info("pruned %s: achieved sparsity %.4f over %d linears", out, report["achieved_sparsity"], len(rows))
    return {"solver_seconds": solver_seconds}
