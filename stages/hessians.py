"""Reads: calibration Parquet of one source, the dense model, params ``model``, ``hessians``.
Writes: the Hessian store (``schemas.HessianWriter``): per decoder layer and input group, the
prompt and decode sums of x·xᵀ with their token counts.
"""

import logging
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from stages.models import compute_device, decoder_layers, fingerprint, linear_groups, load_model, load_tokenizer
from stages.params import Params
from stages.schemas import CALIBRATION, SEGMENT_IDS, HessianWriter, read_parquet

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


def batches(table_ids: list[list[int]], table_seg: list[list[int]], size: int, pad: int) -> list[tuple]:
    """Right-padded (ids [B, T], segment [B, T] with -1 on padding) batches, longest first."""
    order = sorted(range(len(table_ids)), key=lambda i: -len(table_ids[i]))
    out = []
    for start in range(0, len(order), size):
        rows = order[start : start + size]
        width = max(len(table_ids[i]) for i in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        seg = torch.full((len(rows), width), -1, dtype=torch.long)
        for r, i in enumerate(rows):
            ids[r, : len(table_ids[i])] = torch.tensor(table_ids[i])
            seg[r, : len(table_seg[i])] = torch.tensor(table_seg[i])
        out.append((ids, seg))
    return out


@torch.no_grad()
def collect(model: nn.Module, ids: list[list[int]], segments: list[list[int]], batch_size: int, pad: int) -> dict:
    """Forward the sequences through ``model``; return {(layer, group name): (members, Accumulator)}."""
    device = next(model.parameters()).device
    layers = decoder_layers(model)
    accumulators: dict[tuple[int, str], tuple[list[str], Accumulator]] = {}
    hooks = []
    for group in linear_groups(model):
        first = layers[group.layer].get_submodule(group.name)
        acc = Accumulator(first.in_features, device)
        accumulators[(group.layer, group.name)] = (group.members, acc)
        hooks.append(first.register_forward_pre_hook(acc))
    try:
        for batch_ids, batch_seg in tqdm(batches(ids, segments, batch_size, pad), desc="hessians", unit="batch"):
            batch_ids, batch_seg = batch_ids.to(device), batch_seg.to(device)
            for _, acc in accumulators.values():
                acc.segment = batch_seg
            model(input_ids=batch_ids, attention_mask=(batch_seg >= 0).long())
    finally:
        for hook in hooks:
            hook.remove()
    return accumulators


def run(p: Params, calib: Path, out: Path) -> None:
    """Accumulate the store of one calibration source at ``out``."""
    table, meta = read_parquet(calib, CALIBRATION, "calibration")
    tokenizer = load_tokenizer(p.model)
    model = load_model(p.model, compute_device())
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    accumulators = collect(
        model, table["token_ids"].to_pylist(), table["segment"].to_pylist(), p.hessians.batch_size, pad
    )
    writer = HessianWriter(
        out, model_id=p.model, fingerprint=fingerprint(p.model), source=meta.get("source", "?"), chunk=p.hessians.chunk
    )
    try:
        for (layer, name), (members, acc) in accumulators.items():
            writer.write_group(layer, name, members, {s: x.cpu().numpy() for s, x in acc.xtx.items()}, acc.n)
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    first = next(iter(accumulators.values()))[1].n
    log.info("hessians %s: %d groups, tokens per group %s", meta.get("source"), len(accumulators), first)
