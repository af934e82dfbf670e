"""Reads: the dense model (one linear at a time), a Hessian store, params ``model``, ``losses``, ``prune.damp``,
``prune.block_size``, ``prune.kernel`` and ``prune.mix``.
Writes: a loss table (Parquet, ``stages.schemas.LOSSES``): for each pruner of ``losses.pruners``, each decoder
linear and each sparsity of ``losses.sparsities``, the loss the pruner reports when the prune stage prunes that
linear to that sparsity (unstructured, unquantized, on the store's H mixed by ``prune.mix``), and the linear's
energy ½·tr(W H Wᵀ); its metadata records what the losses depend on, which prune checks before reading them.

The table depends on neither ``sparsity`` nor ``pruner`` nor ``prune.scope``/``layers``, so one table per source
serves a whole sweep; ``prune.allocation: loss`` reads it (stages/allocate.py).
"""

import logging
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from stages.errors import RacError
from stages.kernels import resolve_kernel
from stages.layers import open_skeleton, peak_rss_gb
from stages.models import compute_device, expert_member, fingerprint, member_weight
from stages.params import Params, in_params_terms
from stages.schemas import LOSSES, read_parquet, write_parquet
from stages.solvers import Options, hessian_from_sums, mixed_count, solve_group
from stages.solvers.base import layer_loss
from stages.store import HessianStore

log = logging.getLogger(__name__)

# A linear's losses, and its energy: keyed by (layer, module name in the layer).
Curves = dict[tuple[int, str], tuple[list[float], float]]


def table_key(p: Params, store: HessianStore, kernel: str) -> dict[str, Any]:
    """What a table's losses depend on besides the pruner; prune refuses a table whose key differs from its own."""
    return {
        "source": store.attrs["source"],
        "model_fingerprint": store.attrs["model_fingerprint"],
        "sparsities": p.losses.sparsities,
        "damp": p.prune.damp,
        "block_size": p.prune.block_size,
        "kernel": kernel,
        "mix": p.prune.mix,
    }


@torch.no_grad()
def run(p: Params, hessians: Path, out: Path) -> dict[str, float]:
    """Table the layer loss of every pruner of ``losses.pruners`` on every decoder linear at each sparsity of
    ``losses.sparsities``; return the solver seconds and the peak RSS."""
    device = compute_device()
    kernel = resolve_kernel(p.prune.kernel, False)
    skeleton, groups = open_skeleton(p.dense, device)
    experts = [g.name for g in groups if expert_member(g.name) is not None]
    if experts and p.losses.pruners:
        raise RacError(
            f"losses.pruners={p.losses.pruners!r}: the loss table does not cover the experts of a mixture of experts "
            f"yet ({experts[0]}, …); set losses.pruners [] (prune.allocation uniform)"
        )
    store = HessianStore(hessians, fingerprint(p.dense), groups)
    try:
        mixed_count(store.n_tokens, p.prune.mix)
    except ValueError as err:
        raise RacError(f"prune.mix on {str(hessians)!r}: {err}") from err
    rows: list[dict[str, Any]] = []
    seconds = 0.0
    for group in tqdm(groups if p.losses.pruners else [], desc="loss table", unit="group"):
        sums = {s: torch.from_numpy(x).to(device) for s, x in store.sums(group).items()}
        H = hessian_from_sums(sums, store.n_tokens, p.prune.mix)  # [in, in]
        prefix = skeleton.prefix(group.layer)
        for m in group.members:
            skeleton.load(prefix + m)
        Ws = [member_weight(skeleton.layers[group.layer], m) for m in group.members]  # [out_k, in] each
        energies = [layer_loss(W, torch.zeros_like(W), H) for W in Ws]
        for pruner in p.losses.pruners:
            for sparsity in p.losses.sparsities:
                opts = Options(sparsity, "unstructured", p.prune.block_size, p.prune.damp, kernel, None)
                start = time.perf_counter()
                try:
                    solved = solve_group(pruner, Ws, H, opts)
                except ValueError as err:
                    raise RacError(f"layer {group.layer} {group.name}: {in_params_terms(err)}") from err
                seconds += time.perf_counter() - start
                for m, r, e in zip(group.members, solved, energies, strict=True):
                    row = {"pruner": pruner, "layer": group.layer, "module": m, "sparsity": sparsity}
                    rows.append(row | {"loss": r.loss, "energy": e})
        for m in group.members:
            skeleton.release(skeleton.model.get_submodule(prefix + m))
    meta = table_key(p, store, kernel) | {"pruners": p.losses.pruners}
    write_parquet(rows, LOSSES, out, meta)
    log.info("loss table %s: %d rows", out, len(rows))
    return {"solver_seconds": seconds, "peak_rss_gb": round(peak_rss_gb(), 4)}


def read_curves(path: Path, pruner: str, key: dict[str, Any]) -> Curves:
    """The losses of ``pruner`` at the table's sparsities, per linear, from the table at ``path``, which must have
    been computed with ``key``."""
    table, meta = read_parquet(path, LOSSES, "loss table")
    where = f"loss table {str(path)!r}"
    differs = sorted(k for k in key if meta.get(k) != key[k])
    if differs:
        k = differs[0]
        raise RacError(f"{where} was computed with {k}={meta.get(k)!r}, not this run's {key[k]!r}; rerun `rac losses`")
    if pruner not in meta.get("pruners", []):
        raise RacError(f"{where} has no losses of pruner={pruner!r}; add it to losses.pruners and rerun `rac losses`")
    curves: dict[tuple[int, str], dict[float, float]] = {}
    energy: dict[tuple[int, str], float] = {}
    for row in table.to_pylist():
        if row["pruner"] == pruner:
            curves.setdefault((row["layer"], row["module"]), {})[row["sparsity"]] = row["loss"]
            energy[(row["layer"], row["module"])] = row["energy"]
    grid = key["sparsities"]
    out: Curves = {}
    for linear, by_sparsity in curves.items():
        if sorted(by_sparsity) != grid:
            raise RacError(f"{where}: linear {linear} has losses at {sorted(by_sparsity)}, not {grid}; rebuild it")
        out[linear] = ([by_sparsity[s] for s in grid], energy[linear])
    return out
