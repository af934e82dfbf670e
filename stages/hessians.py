"""Reads: calibration Parquet of one source, the dense model, params ``model``, ``hessians``.
Writes: the Hessian store (``store.HessianWriter``): per decoder layer and input group, the
prompt and decode sums of x·xᵀ with their token counts.

Memory is bounded by windows of consecutive decoder layers whose fp32 sums fit in
``hessians.max_memory_gb``: each window is a pass over the calibration set that stops after the
window's last layer, and is written (and recorded with the digests of its files) before the next one
starts. The partial build lives in ``<repo>/.rac/partial/<hash of the inputs>/``, outside DVC's outs,
under a lock; a killed run resumes at the first window whose files do not verify. A failed build
removes its partial build; an interrupted one keeps it for the rerun (``rac clean`` lists and removes
those left behind). Sequences can be sharded over processes (``--world-size`` with gloo,
or ``torchrun``); the sums are all-reduced per window, which the sum-plus-count contract makes exact
up to fp32 summation order.

Precision: sums accumulate in fp32 on the compute device (addmm of fp32 activations); against an
fp64 accumulation the relative error per entry is ~1e-6 at 1M tokens (tests/test_hessians.py).
"""

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm
from transformers import AutoConfig

from stages.errors import RacError
from stages.models import (
    LinearGroup,
    compute_device,
    decoder_layers,
    fingerprint,
    linear_groups,
    load_model,
    load_tokenizer,
    model_dir,
)
from stages.params import Params
from stages.schemas import CALIBRATION, SEGMENT_IDS, atomic_path, read_parquet
from stages.store import Digests, HessianWriter
from stages.workspace import build_lock, partial_root, remove_build

log = logging.getLogger(__name__)


class Accumulator:
    """Σ x·xᵀ per segment over the valid (unpadded) tokens seen by one input group."""

    def __init__(self, d: int, device: torch.device) -> None:
        self.xtx = {s: torch.zeros(d, d, dtype=torch.float32, device=device) for s in SEGMENT_IDS}
        self.n = dict.fromkeys(SEGMENT_IDS, 0)
        self.segment: torch.Tensor | None = None  # [B, T] per-token segment id, -1 on padding

    def __call__(self, _module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        assert self.segment is not None
        X = args[0].float()  # [B, T, d]
        for name, seg_id in SEGMENT_IDS.items():
            Xs = X[self.segment == seg_id]  # [n, d]: padding (-1) never enters a sum
            self.xtx[name].addmm_(Xs.T, Xs)
            self.n[name] += Xs.shape[0]


class _StopForward(Exception):
    """Raised after the window's last layer: the layers above it have nothing to collect."""


def batches(ids: list[list[int]], segments: list[list[int]], batch_tokens: int, pad: int) -> list[tuple]:
    """Right-padded (ids [B, T], segment [B, T] with -1 on padding) batches, longest first, each holding
    at most ``batch_tokens`` padded positions (a longer sequence goes alone)."""
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    out: list[tuple] = []
    start = 0
    while start < len(order):
        width = len(ids[order[start]])
        rows = order[start : start + max(1, batch_tokens // max(width, 1))]
        batch_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        batch_seg = torch.full((len(rows), width), -1, dtype=torch.long)
        for r, i in enumerate(rows):
            batch_ids[r, : len(ids[i])] = torch.tensor(ids[i])
            batch_seg[r, : len(segments[i])] = torch.tensor(segments[i])
        out.append((batch_ids, batch_seg))
        start += len(rows)
    return out


def plan_windows(groups: list[LinearGroup], dims: dict[tuple[int, str], int], max_bytes: float) -> list[list[int]]:
    """Consecutive decoder layers whose fp32 sums (two segments per group) fit in ``max_bytes``."""
    per_layer: dict[int, int] = {}
    for g in groups:
        per_layer[g.layer] = per_layer.get(g.layer, 0) + 2 * 4 * dims[(g.layer, g.name)] ** 2
    windows: list[list[int]] = []
    for layer in sorted(per_layer):
        if per_layer[layer] > max_bytes:
            raise RacError(
                f"hessians.max_memory_gb={max_bytes / 2**30:g} is below one decoder layer's sums "
                f"({per_layer[layer] / 2**30:.3f} GB); raise it"
            )
        if windows and sum(per_layer[i] for i in windows[-1]) + per_layer[layer] <= max_bytes:
            windows[-1].append(layer)
        else:
            windows.append([layer])
    return windows


@torch.no_grad()
def collect(
    model: nn.Module,
    ids: list[list[int]],
    segments: list[list[int]],
    batch_tokens: int,
    pad: int,
    window: list[int] | None = None,
) -> dict[tuple[int, str], tuple[list[str], Accumulator]]:
    """Forward the sequences; return {(layer, group name): (members, Accumulator)} for ``window``'s layers
    (all layers when None), stopping each pass after the window's last layer."""
    device = next(model.parameters()).device
    layers = decoder_layers(model)
    wanted = set(range(len(layers)) if window is None else window)
    accumulators: dict[tuple[int, str], tuple[list[str], Accumulator]] = {}
    hooks = []
    for group in linear_groups(model):
        if group.layer not in wanted:
            continue
        first = layers[group.layer].get_submodule(group.name)
        acc = Accumulator(first.in_features, device)
        accumulators[(group.layer, group.name)] = (group.members, acc)
        hooks.append(first.register_forward_pre_hook(acc))

    def stop(_module: nn.Module, _args: object, _output: object) -> None:
        raise _StopForward

    if max(wanted) < len(layers) - 1:
        hooks.append(layers[max(wanted)].register_forward_hook(stop))
    try:
        label = f"hessians layers {min(wanted)}-{max(wanted)}"
        for batch_ids, batch_seg in tqdm(batches(ids, segments, batch_tokens, pad), desc=label, unit="batch"):
            batch_ids, batch_seg = batch_ids.to(device), batch_seg.to(device)
            for _, acc in accumulators.values():
                acc.segment = batch_seg
            with contextlib.suppress(_StopForward):
                model(input_ids=batch_ids, attention_mask=(batch_seg >= 0).long())
    finally:
        for hook in hooks:
            hook.remove()
    return accumulators


def partial_dir(calib: Path, p: Params, model_fingerprint: str, out: Path) -> Path:
    """Where a build of these inputs keeps its finished windows: the repository's partial root, keyed by a hash
    of the calibration bytes, the model and the hessians params."""
    h = hashlib.sha256(Path(calib).read_bytes())
    h.update(json.dumps([p.dense, model_fingerprint, vars(p.hessians)], sort_keys=True).encode())
    return partial_root(out) / h.hexdigest()[:16]


def _all_reduce(accumulators: dict[tuple[int, str], tuple[list[str], Accumulator]]) -> None:
    for _, acc in accumulators.values():
        for s in SEGMENT_IDS:
            dist.all_reduce(acc.xtx[s])
        counts = torch.tensor([acc.n[s] for s in SEGMENT_IDS], dtype=torch.float64, device=acc.xtx["prompt"].device)
        dist.all_reduce(counts)
        acc.n = {s: int(c) for s, c in zip(SEGMENT_IDS, counts.tolist(), strict=True)}


def check_token_ids(ids: list[list[int]], vocab_size: int, calib: Path) -> None:
    """Every token id indexes the model's embedding table; else a one-line error before any forward pass."""
    top = max(max(seq) for seq in ids)
    if top >= vocab_size:
        raise RacError(
            f"calibration {str(calib)!r} has token id {top}, outside the model's {vocab_size} embeddings; "
            "it was built for another model: rerun calibrate with this `model`"
        )


def _trusted_record(writer: HessianWriter, progress: Path, n_windows: int) -> dict[str, Digests]:
    """The recorded windows whose files are on disk with their digests; a record that does not verify is redone."""
    if not progress.is_file():
        return {}
    try:
        record = json.loads(progress.read_text())["windows"]
        trusted = {w: files for w, files in record.items() if int(w) < n_windows and files and writer.verify(files)}
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        log.warning("unreadable progress record %s (%s): rebuilding every window", progress, err)
        return {}
    if len(trusted) < len(record):
        log.warning(
            "%d recorded window(s) in %s fail verification: rebuilding them", len(record) - len(trusted), progress
        )
    return trusted


def build(p: Params, calib: Path, out: Path, rank: int, world_size: int) -> None:
    """Accumulate the store at ``out``; with ``world_size`` > 1, this rank takes sequences rank::world_size."""
    table, meta = read_parquet(calib, CALIBRATION, "calibration")
    ids, segments = table["token_ids"].to_pylist(), table["segment"].to_pylist()
    if not ids:
        raise RacError(f"calibration {str(calib)!r} has no sequences; rerun calibrate")
    if world_size > len(ids):
        raise RacError(
            f"world size {world_size} exceeds the {len(ids)} calibration sequences of {str(calib)!r}; use fewer ranks"
        )
    n_tokens = {s: sum(seg.count(i) for seg in segments) for s, i in SEGMENT_IDS.items()}
    tokenizer = load_tokenizer(p.dense)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = compute_device() if world_size == 1 or not torch.cuda.is_available() else torch.device("cuda", rank)
    check_token_ids(ids, AutoConfig.from_pretrained(model_dir(p.dense)).get_text_config().vocab_size, calib)
    model = load_model(p.dense, device)
    model_fingerprint = fingerprint(p.dense)
    layers = decoder_layers(model)
    groups = linear_groups(model)
    dims = {(g.layer, g.name): layers[g.layer].get_submodule(g.name).in_features for g in groups}
    windows = plan_windows(groups, dims, p.hessians.max_memory_gb * 2**30)
    work = partial_dir(calib, p, model_fingerprint, out)
    with build_lock(work) if rank == 0 else contextlib.nullcontext():
        try:
            writer = None
            record: dict[str, Digests] = {}
            done: list[int] = []
            if rank == 0:
                writer = HessianWriter(
                    work / "store.zarr",
                    model_id=p.dense,
                    fingerprint=model_fingerprint,
                    source=str(meta.get("source", "?")),
                    chunk=p.hessians.chunk,
                    n_tokens=n_tokens,
                    groups=groups,
                )
                record = _trusted_record(writer, work / "progress.json", len(windows))
                done = sorted(int(w) for w in record)
            if world_size > 1:
                shared = [done]
                dist.broadcast_object_list(shared, src=0)
                done = shared[0]
            if done:
                log.info("resuming %s: windows %s of %d verified on disk", work, done, len(windows))
            for w, window in enumerate(windows):
                if w in done:
                    continue
                accumulators = collect(
                    model, ids[rank::world_size], segments[rank::world_size], p.hessians.batch_tokens, pad, window
                )
                if world_size > 1:
                    _all_reduce(accumulators)
                if writer is not None:
                    for (layer, name), (members, acc) in accumulators.items():
                        xtx = {s: x.cpu().numpy() for s, x in acc.xtx.items()}
                        writer.write_group(layer, name, members, xtx, acc.n)
                    record[str(w)] = writer.digest_layers(window)
                    with atomic_path(work / "progress.json") as tmp:  # only once the window's files are on disk
                        tmp.write_text(json.dumps({"windows": record}))
                del accumulators  # before the next window allocates: one window's sums alive at a time
                if world_size > 1:
                    dist.barrier()
            if writer is not None:
                writer.seal()
                writer.publish(out)
                remove_build(work)
                log.info("hessians %s: %d groups in %d windows", meta.get("source"), len(groups), len(windows))
        except KeyboardInterrupt:
            if rank == 0:
                log.warning("interrupted: %s is kept, so a rerun resumes; `rac clean` removes it", work)
            raise
        except BaseException:
            if rank == 0:  # a failed build removes its own partial build; an interrupted one keeps it (above)
                remove_build(work)
            raise


def _worker(rank: int, world_size: int, init_file: str, p: Params, calib: Path, out: Path) -> None:
    dist.init_process_group(
        "nccl" if torch.cuda.is_available() else "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world_size,
    )
    try:
        build(p, calib, out, rank, world_size)
    finally:
        dist.destroy_process_group()


def run(p: Params, calib: Path, out: Path, world_size: int) -> None:
    """Build the store at ``out``: in this process, over ``world_size`` spawned ranks, or as a torchrun rank."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # launched by torchrun
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        try:
            build(p, calib, out, dist.get_rank(), dist.get_world_size())
        finally:
            dist.destroy_process_group()
    elif world_size == 1:
        build(p, calib, out, 0, 1)
    else:
        read_parquet(calib, CALIBRATION, "calibration")  # a one-line error before any process starts
        with tempfile.TemporaryDirectory() as tmp:
            torch.multiprocessing.spawn(_worker, args=(world_size, f"{tmp}/init", p, calib, out), nprocs=world_size)
