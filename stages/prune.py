"""Reads: the dense model (one decoder layer at a time), params ``model``, ``sparsity``, ``pruner``, ``prune``, and
either a Hessian store (``prune.calibration: dense``) or a calibration Parquet with ``activations``
(``sequential``).
Writes: a pruned HF model directory: one safetensors shard per decoder layer plus one for the other tensors,
with their index, the dense model's config and tokenizer files verbatim, and ``report.json`` (per-layer loss,
achieved sparsity, damping used, the calibration mode); returns the solver seconds and peak memory, which the CLI
writes to ``--timings`` outside the out, so that identical weights give an identical directory.

Dense mode reads each group's H from the cached store, which every pruner and sparsity shares. Sequential
mode walks the layers itself (``stages.layers``): layer i's sums come from the activations of the model pruned
up to layer i-1, layer i is pruned, and the pruned layer's outputs become layer i+1's inputs, as the
reference SparseGPT does. Its Hessians depend on the sparsity and the pruner, so nothing is cached.
"""

import dataclasses
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from stages.allocate import Allocation, allocate
from stages.errors import RacError
from stages.export import linear_tensors, quantization_config
from stages.hessians import check_token_ids
from stages.kernels import resolve_kernel
from stages.layers import (
    Accumulator,
    ActivationCache,
    LayerWalk,
    Skeleton,
    batches,
    check_budget,
    open_skeleton,
    peak_rss_gb,
    plan,
    scratch_root,
    stored_layout,
)
from stages.models import (
    LINEAR_LIKE,
    LinearGroup,
    compute_device,
    expert_member,
    fingerprint,
    member_weight,
    pad_id,
    tokenizer_files,
)
from stages.params import Params, in_params_terms
from stages.schemas import CALIBRATION, SEGMENT_IDS, atomic_path, read_parquet
from stages.selection import in_scope, selected_layers
from stages.solvers import Compressed, OptionError, Quantized, hessian_from_sums, mixed_count, solve_group
from stages.solvers.masks import layer_pattern
from stages.solvers.quant import check_spec
from stages.store import HessianStore
from stages.workspace import repo_root

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
ALLOCATION_CSV = "allocation.csv"  # per-layer target, achieved sparsity and loss: what `dvc plots` draws


def _check_mix(counts: dict[str, int], p: Params, where: str) -> None:
    """Every group saw ``counts``: refuse a mix that weighs no tokens before any solve."""
    try:
        mixed_count(counts, p.prune.mix)
    except ValueError as err:
        raise RacError(f"prune.mix on {where}: {err}") from err


class _Sequential:
    """The layer walk of sequential mode over one calibration set."""

    def __init__(self, p: Params, calib: Path, skeleton: Skeleton, groups: list[LinearGroup], out: Path) -> None:
        table, meta = read_parquet(calib, CALIBRATION, "calibration")
        ids, segments = table["token_ids"].to_pylist(), table["segment"].to_pylist()
        if not ids:
            raise RacError(f"calibration {str(calib)!r} has no sequences; rerun calibrate")
        check_token_ids(ids, skeleton.model.config.get_text_config().vocab_size, calib)
        self.counts = {s: sum(seg.count(i) for seg in segments) for s, i in SEGMENT_IDS.items()}
        _check_mix(self.counts, p, repr(str(calib)))
        self.source = str(meta.get("source", "?"))
        pad = pad_id(p.dense)
        work = batches(ids, segments, p.activations.batch_tokens, pad)
        budget = p.activations.memory_gb * 2**30
        check_budget(budget, work, skeleton.hidden_size())
        self.memory = plan(skeleton, groups, [b.ids.numel() for b in work], budget)
        self.cache = ActivationCache(budget, scratch_root(p.activations.disk_dir, repo_root(Path(out).parent)))
        if self.memory.activations_on_disk:
            self.cache.check_writable()
        self.walk = LayerWalk(skeleton, work, self.cache)


Sums = Callable[[LinearGroup], tuple[dict[str, torch.Tensor], dict[str, int]]]  # a group's sums and counts


def _compressed_layer(
    p: Params,
    layer: torch.nn.Module,
    i: int,
    groups: list[LinearGroup],
    target: float,
    quantize: bool,
    sums_of: Sums,
    kernel: str,
) -> tuple[list[dict[str, Any]], dict[str, Quantized], float]:
    """Compress the in-scope linears and experts of decoder layer ``i`` in place with H from ``sums_of(group)``:
    prune to ``target`` and, if ``quantize``, round to ``quant``'s grid; return the report rows, the integer form
    of each quantized linear (by its name in the layer) and the solver seconds. An expert routed fewer than
    ``prune.expert_min_tokens`` tokens gets the identity Hessian."""
    rows: list[dict[str, Any]] = []
    quantized: dict[str, Quantized] = {}
    seconds = 0.0
    sparse_experts: list[str] = []
    for group in groups:
        chosen = [m for m in group.members if in_scope(m, p.prune.scope) and (target > 0 or quantize)]
        weights = {m: member_weight(layer, m) for m in group.members}  # W [out, in], views into the layer
        results: dict[str, Compressed] = {}
        tokens = 0
        fallback = False
        if chosen:
            opts = dataclasses.replace(p.options(target), kernel=kernel, quant=p.quant.spec if quantize else None)
            sums, counts = sums_of(group)
            tokens = sum(n for s, n in counts.items() if p.prune.mix[s] > 0)
            fallback = expert_member(group.name) is not None and tokens < p.prune.expert_min_tokens
            if fallback:
                sparse_experts.append(group.name)
                d = weights[group.name].shape[1]
                H = torch.eye(d, device=weights[group.name].device)  # [in, in]
            else:
                H = hessian_from_sums(sums, counts, p.prune.mix)  # [in, in]
            start = time.perf_counter()
            try:
                # The members share H: the OBS solvers factor it once for all of them.
                solved = solve_group(p.pruner, [weights[m] for m in chosen], H, opts)
            except OptionError as err:
                raise RacError(f"layer {i} {'/'.join(chosen)}: {in_params_terms(err)}") from err
            seconds += time.perf_counter() - start
            results = dict(zip(chosen, solved, strict=True))
        for member in group.members:
            result = results.get(member)
            if result is None:
                rows.append(_row(i, member, weights[member], 0.0, 0.0, 0.0, None, tokens, fallback))
                continue
            if result.damp_used > p.prune.damp:
                log.warning(
                    "layer %d %s: Cholesky failed at damp=%g; used damp=%g", i, member, p.prune.damp, result.damp_used
                )
            weights[member].copy_(result.weight)
            if result.quant is not None:
                quantized[member] = result.quant
            bits = result.quant.bits if result.quant is not None else None
            rows.append(_row(i, member, result.weight, target, result.loss, result.damp_used, bits, tokens, fallback))
    if sparse_experts:
        log.warning(
            "layer %d: %d expert weight(s) saw fewer than prune.expert_min_tokens=%d tokens (%s): identity Hessian",
            i, len(sparse_experts), p.prune.expert_min_tokens, ", ".join(sparse_experts[:4]),
        )  # fmt: skip
    return rows, quantized, seconds


def _row(
    i: int,
    member: str,
    weight: torch.Tensor,
    target: float,
    loss: float,
    damp_used: float,
    bits: int | None,
    tokens: int,
    fallback: bool,
) -> dict[str, Any]:
    """report.json's row of one linear or expert after compression (target 0: left as it was); ``tokens`` that
    entered its Hessian (mixed segments), and whether it fell back to the identity Hessian."""
    sparsity = float((weight == 0).float().mean())
    shape = list(weight.shape)
    expert = expert_member(member)
    return {"layer": i, "module": member, "shape": shape, "target": target, "loss": loss, "sparsity": sparsity,
            "damp_used": damp_used, "bits": bits, "tokens": tokens,
            "expert": f"{expert[0]}.{expert[2]}" if expert else None, "identity_hessian": fallback}  # fmt: skip


def check_layer_shapes(p: Params, skeleton: Skeleton, groups: list[LinearGroup], targets: dict[int, float]) -> None:
    """Every linear that will be compressed takes the pattern's groups of M and the quantizer's groups, before
    anything is solved or written."""
    selected = selected_layers(p.prune.layers, p.prune.overrides, len(skeleton.layers))
    for group in groups:
        quantize = p.quant.spec is not None and group.layer in selected
        if not (targets[group.layer] > 0 or quantize):
            continue
        d = member_weight(skeleton.layers[group.layer], group.name).shape[1]
        if quantize and p.prune.export != "hf":
            for member in group.members:
                kind = "expert" if expert_member(member) else type(skeleton.layers[group.layer].get_submodule(member))
                if kind is not torch.nn.Linear:
                    raise RacError(
                        f"layer {group.layer} {member}: prune.export={p.prune.export!r} packs nn.Linear weights, "
                        f"not {getattr(kind, '__name__', kind)} ones; set prune.export hf"
                    )
        try:
            if targets[group.layer] > 0:
                layer_pattern(p.prune.pattern, targets[group.layer], d)
            if quantize:
                assert p.quant.spec is not None
                check_spec(p.quant.spec, d)
        except OptionError as err:
            raise RacError(f"layer {group.layer} {group.name}: {in_params_terms(err)}") from err


def _shard_name(k: int, n: int) -> str:
    return f"model-{k + 1:05d}-of-{n:05d}.safetensors"


@torch.no_grad()
def run(
    p: Params, hessians: Path | None, calib: Path | None, out: Path, losses: Path | None = None
) -> dict[str, float]:
    """Prune the selected linears of every decoder layer with ``p.pruner`` on H of ``p.prune.calibration``, to the
    targets of ``p.prune.allocation`` (read from the store and, for ``loss``, the table ``losses``); return the
    solver and allocation seconds and the peak RSS."""
    mode = p.prune.calibration
    if mode == "dense" and hessians is None:
        raise RacError("prune.calibration=dense reads a Hessian store: pass --hessians data/hessians/SOURCE.zarr")
    if mode == "sequential" and calib is None:
        raise RacError(
            "prune.calibration=sequential accumulates its own Hessians from the pruned model's activations (a "
            "Hessian store serves only prune.allocation): pass --calib data/calibrate/SOURCE.parquet"
        )
    kernel = resolve_kernel(p.prune.kernel, p.quant.spec is not None)
    device = compute_device()
    skeleton, groups = open_skeleton(p.dense, device)
    store: HessianStore | None = None
    counts: dict[tuple[int, str], dict[str, int]] = {}  # dense mode: each stored group's tokens
    sequential: _Sequential | None = None
    if hessians is not None and (mode == "dense" or p.prune.allocation != "uniform"):
        store = HessianStore(hessians, fingerprint(p.dense))
        _check_mix(store.n_tokens, p, repr(str(hessians)))
        store.require_groups(groups)  # else a layer missing from the store would stay dense, unreported
        counts = {(g.layer, g.name): g.n_tokens for g in store.groups()}  # an expert's: its routed tokens
    if mode == "dense":
        assert store is not None
        source, inputs = store.attrs["source"], str(hessians)
    else:
        assert calib is not None
        sequential = _Sequential(p, calib, skeleton, groups, out)
        source, inputs = sequential.source, str(calib)
        log.info("sequential calibration memory plan (GB): %s", sequential.memory.as_dict())
    if sequential is not None and store is not None and store.attrs["source"] != source:
        raise RacError(
            f"prune allocates from store {str(hessians)!r} of source {store.attrs['source']!r} but calibrates on "
            f"{source!r}; pass the store of the same source"
        )
    n_layers = len(skeleton.layers)
    start = time.perf_counter()
    allocation = allocate(p, skeleton, groups, store, losses, device)
    allocation_seconds = time.perf_counter() - start
    targets = allocation.targets
    selected = selected_layers(p.prune.layers, p.prune.overrides, n_layers)
    check_layer_shapes(p, skeleton, groups, targets)
    rows: list[dict[str, Any]] = []
    solver_seconds = 0.0
    weight_map: dict[str, str] = {}
    packed: list[str] = []  # the linears whose integer form the export holds
    total_bytes = 0
    try:
        with atomic_path(out) as tmp:
            tmp.mkdir()
            if sequential is not None:
                sequential.walk.embed()
            for i in tqdm(range(n_layers), desc=f"prune ({p.pruner}, {mode})", unit="layer"):
                mine = [g for g in groups if g.layer == i]
                name = skeleton.prefix(i).rstrip(".")
                quantize = p.quant.spec is not None and i in selected
                with skeleton.loaded(name) as layer:
                    if sequential is None:  # dense mode; a store beside sequential mode serves the allocation
                        assert store is not None
                        sums_of = _store_sums(store, counts, device)
                    else:
                        sums_of = _walk_sums(sequential, layer, i, mine, targets[i] > 0 or quantize, device)
                    layer_rows, quantized, seconds = _compressed_layer(
                        p, layer, i, mine, targets[i], quantize, sums_of, kernel
                    )
                    rows += layer_rows
                    solver_seconds += seconds
                    if sequential is not None and i < n_layers - 1:
                        sequential.walk.forward(i, layer, keep=True, label=f"layer {i} (pruned) forward")
                    tensors = _layer_tensors(p.prune.export, name, layer, skeleton, quantized)
                    packed += [f"{name}.{member}" for member in quantized]
                total_bytes += _write_shard(tmp, _shard_name(i, n_layers + 1), tensors, weight_map)
            total_bytes += _write_shard(tmp, _shard_name(n_layers, n_layers + 1), _rest(skeleton), weight_map)
            index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
            for file in tokenizer_files(p.dense):
                shutil.copyfile(file, tmp / file.name)
            _write_config(skeleton, p, packed, tmp / "config.json")
            if (skeleton.directory / "generation_config.json").is_file():
                shutil.copyfile(skeleton.directory / "generation_config.json", tmp / "generation_config.json")
            report = _report(p, rows, kernel, source, inputs, sequential, allocation)
            (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
            _write_allocation_csv(report, tmp / ALLOCATION_CSV)
    finally:
        if sequential is not None:
            sequential.cache.close()
    log.info("pruned %s (%s): achieved sparsity %.4f", out, mode, report["achieved_sparsity"])
    return {
        "solver_seconds": solver_seconds,
        "allocation_seconds": allocation_seconds,
        "peak_rss_gb": round(peak_rss_gb(), 4),
    }


def _layer_tensors(
    fmt: str, name: str, layer: torch.nn.Module, skeleton: Skeleton, quantized: dict[str, Quantized]
) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of decoder layer ``name`` in export ``fmt``, each in its stored dtype, in the layout
    the dense checkpoint has."""
    state = {f"{name}.{k}": v.to(skeleton.dtypes[f"{name}.{k}"]).contiguous() for k, v in layer.state_dict().items()}
    state = stored_layout(skeleton.model, state)
    if fmt == "hf":  # grid values in place: the weights as they are
        return state
    for member, q in quantized.items():
        prefix = f"{name}.{member}"
        state.update(linear_tensors(fmt, prefix, state.pop(f"{prefix}.weight"), q))
    return state


def _rest(skeleton: Skeleton) -> dict[str, torch.Tensor]:
    """The checkpoint tensors outside the decoder layers (embedding, final norm, LM head unless tied), as stored."""
    layers = skeleton.layers_name + "."
    names = [n for n in skeleton.checkpoint.covers if not n.startswith(layers)]
    return stored_layout(skeleton.model, {k: v.contiguous() for k, v in skeleton.tensors(names).items()})


def _write_config(skeleton: Skeleton, p: Params, packed: list[str], path: Path) -> None:
    """The dense model's config.json, verbatim for ``hf``; with its ``quantization_config`` for a packed export."""
    source = skeleton.directory / "config.json"
    linears = [n for n, m in skeleton.model.named_modules() if isinstance(m, LINEAR_LIKE)]
    qc = quantization_config(p.prune.export, p.quant.spec, sorted(set(linears) - set(packed)))
    if qc is None:
        shutil.copyfile(source, path)
        return
    config = json.loads(source.read_text())
    config["quantization_config"] = qc
    path.write_text(json.dumps(config, indent=2) + "\n")


def _store_sums(store: HessianStore, counts: dict[tuple[int, str], dict[str, int]], device: torch.device) -> Sums:
    """A group's sums from the cached store, with its token ``counts`` (by layer and name)."""

    def sums_of(group: LinearGroup) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        sums = {s: torch.from_numpy(x).to(device) for s, x in store.sums(group).items()}
        return sums, counts[(group.layer, group.name)]

    return sums_of


def _walk_sums(
    sequential: _Sequential,
    layer: torch.nn.Module,
    i: int,
    groups: list[LinearGroup],
    compresses: bool,
    device: torch.device,
) -> Sums:
    """A group of layer ``i``'s sums over the activations that reach it in the model compressed so far (one forward
    of the still-dense layer ``i``, outputs discarded); nothing runs when the layer compresses nothing."""
    accumulators: dict[str, Accumulator] = {}
    if compresses:
        accumulators = {g.name: Accumulator(member_weight(layer, g.name).shape[1], device) for g in groups}
        sequential.walk.forward(i, layer, keep=False, accumulators=accumulators, label=f"layer {i} sums")

    def sums_of(group: LinearGroup) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        acc = accumulators[group.name]
        return acc.xtx, acc.n

    return sums_of


def _experts(p: Params, rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Mixture of experts: how many experts were compressed, how many saw fewer than ``prune.expert_min_tokens``
    calibration tokens (identity Hessian), and the coverage, the fraction that saw at least that many; None for a
    dense model. Every compressed expert below the threshold is an error: the calibration routed nothing useful."""
    compressed = [r for r in rows if r["expert"] is not None and (r["target"] > 0 or r["bits"] is not None)]
    tokens = {(r["layer"], r["expert"]): r["tokens"] for r in compressed}
    if not tokens:
        return None
    below = sum(n < p.prune.expert_min_tokens for n in tokens.values())
    if below == len(tokens):
        raise RacError(
            f"every one of the {len(tokens)} compressed experts saw fewer than prune.expert_min_tokens="
            f"{p.prune.expert_min_tokens} calibration tokens (at most {max(tokens.values())}); lower it, or "
            "calibrate on more tokens"
        )
    return {"compressed": len(tokens), "min_tokens": p.prune.expert_min_tokens, "below_min_tokens": below,
            "coverage": 1 - below / len(tokens), "fallback": "identity Hessian"}  # fmt: skip


def _write_shard(folder: Path, name: str, tensors: dict[str, torch.Tensor], weight_map: dict[str, str]) -> int:
    """Write ``tensors`` as the safetensors file ``folder/name``; return its tensor bytes."""
    save_file(tensors, str(folder / name), metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(tensors, name))
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _report(
    p: Params,
    rows: list[dict[str, Any]],
    kernel: str,
    source: str,
    inputs: str,
    sequential: _Sequential | None,
    allocation: Allocation,
) -> dict[str, Any]:
    """report.json: what was pruned and quantized, how, in which format, and from which calibration."""
    numel = [math.prod(r["shape"]) for r in rows]
    pruned = [(r, n) for r, n in zip(rows, numel, strict=True) if r["target"] > 0]
    by_layer = sorted({r["layer"] for r in rows})
    return {
        "pruner": p.pruner,
        "target_sparsity": p.sparsity,
        # Over every decoder linear and expert (routers are not compressed), and over the pruned ones only (they
        # differ under scope/layers).
        "achieved_sparsity": sum(r["sparsity"] * n for r, n in zip(rows, numel, strict=True)) / sum(numel),
        "achieved_sparsity_pruned": sum(r["sparsity"] * n for r, n in pruned) / max(1, sum(n for _, n in pruned)),
        "calibration": p.prune.calibration,
        "scope": p.prune.scope,
        "layers_spec": p.prune.layers,
        "overrides": p.prune.overrides,
        "calibration_input": inputs,
        "source": source,
        "pattern": p.prune.pattern,
        "kernel": kernel,
        "mix": p.prune.mix,
        # The grid every quantized linear (rows with `bits`) is on, and the checkpoint format.
        "quant": dataclasses.asdict(p.quant.spec) if p.quant.spec is not None else None,
        "quantized_linears": sum(r["bits"] is not None for r in rows),
        "export": p.prune.export,
        # Sequential mode's layer walk: what it held at most (GB), by plan (measured RSS goes to --timings).
        "memory_plan_gb": sequential.memory.as_dict() if sequential is not None else None,
        # Per decoder layer: its target (from prune.allocation, or an override), achieved sparsity over its
        # pruned linears, and total loss; and over the allocated layers, the achieved weighted mean.
        "allocation": allocation.as_dict()
        | {
            "achieved_sparsity_allocated": _achieved([(r, n) for r, n in pruned if r["layer"] in allocation.units]),
            "per_layer": [
                {
                    "layer": i,
                    "target": allocation.targets[i],
                    "achieved": _achieved([(r, n) for r, n in pruned if r["layer"] == i]),
                    "loss": math.fsum(r["loss"] for r in rows if r["layer"] == i),
                    "score": allocation.scores[allocation.units.index(i)]
                    if allocation.scores and i in allocation.units
                    else None,
                }
                for i in by_layer
            ],
        },
        "experts": _experts(p, rows),
        "layers": rows,
    }


def _achieved(pruned: list[tuple[dict[str, Any], int]]) -> float:
    """The sparsity of ``pruned`` linears (report rows with their weight counts) taken together; 0 for none."""
    return sum(r["sparsity"] * n for r, n in pruned) / max(1, sum(n for _, n in pruned))


def _write_allocation_csv(report: dict[str, Any], path: Path) -> None:
    """The per-layer table of report.json's ``allocation`` as CSV, for ``dvc plots``."""
    lines = ["layer,target,achieved,loss"]
    rows = report["allocation"]["per_layer"]
    lines += [f"{r['layer']},{r['target']!r},{r['achieved']!r},{r['loss']!r}" for r in rows]
    path.write_text("\n".join(lines) + "\n")
