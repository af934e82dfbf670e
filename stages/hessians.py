"""Reads: calibration Parquet of one source, the dense model, params ``model``, ``activations``, ``hessians``.
Writes: the Hessian store (``store.HessianWriter``): per decoder layer and input group, the
prompt and decode sums of x·xᵀ with their token counts.

The model is walked one decoder layer at a time (``stages.layers``): every layer runs once on the cached
inputs, its groups' sums are written (and recorded with the digests of their files) before the next layer
loads, and only one layer's weights and sums are ever in memory. The partial build lives in
``<repo>/.rac/partial/<hash of the inputs>/``, outside DVC's outs, under a lock; a killed run resumes at
the first layer whose files do not verify, after recomputing that layer's inputs (a forward through the
finished layers, without sums). A failed build removes its partial build; an interrupted one, or one stopped by
a full disk or a read-only folder, keeps it for the rerun (``rac clean`` lists and removes those left behind):
a sealed build whose publish failed is published by the rerun without recomputing any layer. Sequences can be
sharded over processes (``--world-size`` with gloo, or ``torchrun``); the sums are all-reduced per layer, which
the sum-plus-count contract makes exact up to fp32 summation order.

Precision: sums accumulate in fp32 on the compute device (addmm of fp32 activations); against an
fp64 accumulation the relative error per entry is ~1e-6 at 1M tokens (tests/test_hessians.py).
"""

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoConfig

from stages.errors import RacError, disk_fault, disk_message
from stages.layers import (
    Accumulator,
    ActivationCache,
    LayerWalk,
    MemoryPlan,
    Skeleton,
    batches,
    check_budget,
    open_skeleton,
    peak_rss_gb,
    plan,
    scratch_root,
)
from stages.models import (
    LinearGroup,
    compute_device,
    expert_member,
    fingerprint,
    member_weight,
    model_dir,
    pad_id,
)
from stages.params import Params
from stages.schemas import CALIBRATION, SEGMENT_IDS, atomic_path, read_parquet
from stages.store import Digests, HessianStore, HessianWriter
from stages.workspace import build_lock, partial_root, remove_build, repo_root

log = logging.getLogger(__name__)

Sums = dict[str, Accumulator]  # one decoder layer's accumulators, by the first member of each input group


def partial_dir(calib: Path, p: Params, model_fingerprint: str, out: Path) -> Path:
    """Where a build of these inputs keeps its finished layers: the repository's partial root, keyed by a hash
    of the calibration bytes, the model and the params that change the bytes (not the memory settings)."""
    h = hashlib.sha256(Path(calib).read_bytes())
    settings = [p.dense, model_fingerprint, p.activations.batch_tokens, vars(p.hessians)]
    h.update(json.dumps(settings, sort_keys=True).encode())
    return partial_root(out) / h.hexdigest()[:16]


def _all_reduce(accumulators: list[Accumulator]) -> None:
    for acc in accumulators:
        for s in SEGMENT_IDS:
            dist.all_reduce(acc.xtx[s])
        counts = torch.tensor([acc.n[s] for s in SEGMENT_IDS], dtype=torch.float64, device=acc.xtx["prompt"].device)
        dist.all_reduce(counts)
        acc.n = {s: int(c) for s, c in zip(SEGMENT_IDS, counts.tolist(), strict=True)}


def layer_sums(
    walk: LayerWalk, groups: list[LinearGroup], start: int = 0
) -> Iterator[tuple[int, dict[str, Accumulator]]]:
    """For each decoder layer from ``start`` on: its groups' sums (by first member) over the walk's batches; the
    layers before ``start`` only pass their outputs on."""
    walk.embed()
    for i in range(start):
        walk.advance(i)
    skeleton, n_layers = walk.skeleton, len(walk.skeleton.layers)
    for i in range(start, n_layers):
        with skeleton.loaded(skeleton.prefix(i).rstrip(".")) as layer:
            accumulators = {
                g.name: Accumulator(member_weight(layer, g.name).shape[1], skeleton.device)
                for g in groups
                if g.layer == i
            }
            last = i == n_layers - 1  # its outputs feed no layer
            walk.forward(i, layer, keep=not last, accumulators=accumulators, label=f"hessians layer {i}")
        yield i, accumulators
        del accumulators  # before the next layer's are allocated


# More chunk files than this make a build, and DVC's hashing and transfers of the store, crawl (155k files of a
# chunk-1 store took 150 s to write on the embedded model; a 7B store at the default 2048 is ~6.6k files).
MAX_STORE_FILES = 50_000


def check_chunk(skeleton: Skeleton, groups: list[LinearGroup], n_tokens: dict[str, int], chunk: int) -> None:
    """The store of these groups at ``hessians.chunk`` stays under ``MAX_STORE_FILES`` chunk files; else a one-line
    error naming the chunk that would."""

    def files(edge: int) -> int:
        segments = sum(n > 0 for n in n_tokens.values())  # a segment of no tokens has no array
        widths = [member_weight(skeleton.layers[g.layer], g.name).shape[1] for g in groups]
        return segments * sum(-(-d // edge) * (-(-d // edge) + 1) // 2 for d in widths)  # upper-triangle chunks

    if files(chunk) > MAX_STORE_FILES:
        enough = next(c for c in (2**k for k in range(4, 20)) if c >= chunk and files(c) <= MAX_STORE_FILES)
        raise RacError(
            f"hessians.chunk={chunk} makes {files(chunk)} chunk files for this model, over {MAX_STORE_FILES}; "
            f"raise it to {enough} or more (2048 is the default)"
        )


def check_token_ids(ids: list[list[int]], vocab_size: int, calib: Path) -> None:
    """Every token id indexes the model's embedding table; else a one-line error before any forward pass."""
    top = max(max(seq) for seq in ids)
    if top >= vocab_size:
        raise RacError(
            f"calibration {str(calib)!r} has token id {top}, outside the model's {vocab_size} embeddings; "
            "it was built for another model: rerun calibrate with this `model`"
        )


def _trusted_record(writer: HessianWriter, progress: Path, n_layers: int) -> dict[str, Digests]:
    """The recorded layers whose files are on disk with their digests; a record that does not verify is redone."""
    if not progress.is_file():
        return {}
    try:
        record = json.loads(progress.read_text())["layers"]
        trusted = {i: files for i, files in record.items() if int(i) < n_layers and files and writer.verify(files)}
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        log.warning("unreadable progress record %s (%s): rebuilding every layer", progress, err)
        return {}
    if len(trusted) < len(record):
        log.warning(
            "%d recorded layer(s) in %s fail verification: rebuilding them", len(record) - len(trusted), progress
        )
    return trusted


def build(p: Params, calib: Path, out: Path, rank: int, world_size: int) -> MemoryPlan:
    """Accumulate the store at ``out``; with ``world_size`` > 1, this rank takes sequences rank::world_size.
    Returns the memory plan it ran under."""
    table, meta = read_parquet(calib, CALIBRATION, "calibration")
    ids, segments = table["token_ids"].to_pylist(), table["segment"].to_pylist()
    if not ids:
        raise RacError(f"calibration {str(calib)!r} has no sequences; rerun calibrate")
    if world_size > len(ids):
        raise RacError(
            f"world size {world_size} exceeds the {len(ids)} calibration sequences of {str(calib)!r}; use fewer ranks"
        )
    n_tokens = {s: sum(seg.count(i) for seg in segments) for s, i in SEGMENT_IDS.items()}
    pad = pad_id(p.dense)
    device = compute_device() if world_size == 1 or not torch.cuda.is_available() else torch.device("cuda", rank)
    check_token_ids(ids, AutoConfig.from_pretrained(model_dir(p.dense)).get_text_config().vocab_size, calib)
    skeleton, groups = open_skeleton(p.dense, device)
    model_fingerprint = fingerprint(p.dense)
    check_chunk(skeleton, groups, n_tokens, p.hessians.chunk)
    work_batches = batches(ids[rank::world_size], segments[rank::world_size], p.activations.batch_tokens, pad)
    budget = p.activations.memory_gb * 2**30
    check_budget(budget, work_batches, skeleton.hidden_size())
    memory = plan(skeleton, groups, [b.ids.numel() for b in work_batches], budget)
    cache = ActivationCache(budget, scratch_root(p.activations.disk_dir, repo_root(Path(out).parent)))
    if memory.activations_on_disk:
        cache.check_writable()
    log.info("hessians memory plan (GB): %s", memory.as_dict())
    work = partial_dir(calib, p, model_fingerprint, out)
    n_layers = len(skeleton.layers)
    with build_lock(work) if rank == 0 else contextlib.nullcontext():
        try:
            writer = None
            record: dict[str, Digests] = {}
            start = 0
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
                record = _trusted_record(writer, work / "progress.json", n_layers)
                while str(start) in record:
                    start += 1
                record = {k: v for k, v in record.items() if int(k) < start}
            if world_size > 1:
                shared = [start]
                dist.broadcast_object_list(shared, src=0)
                start = shared[0]
            walk = LayerWalk(skeleton, work_batches, cache)
            if start == n_layers:  # a sealed build whose publish failed: nothing to recompute
                log.info("resuming %s: every layer verified; publishing it", work)
            elif start:
                log.info("resuming %s: layers 0-%d verified; recomputing layer %d's inputs", work, start - 1, start)
            for i, accumulators in layer_sums(walk, groups, start) if start < n_layers else ():
                if world_size > 1:
                    _all_reduce(list(accumulators.values()))
                if writer is not None:
                    for g in (g for g in groups if g.layer == i):
                        acc = accumulators[g.name]
                        xtx = {s: x.cpu().numpy() for s, x in acc.xtx.items()}
                        writer.write_group(i, g.name, g.members, xtx, acc.n)
                    record[str(i)] = writer.digest_layers([i])
                    with atomic_path(work / "progress.json") as tmp:  # only once the layer's files are on disk
                        tmp.write_text(json.dumps({"layers": record}))
                del accumulators  # before the next layer allocates: one layer's sums alive at a time
                if world_size > 1:
                    dist.barrier()
            cache.close()  # the walk is over: its scratch goes before the store is published
            if writer is not None:
                writer.seal()
                writer.publish(out)
                remove_build(work)
                log.info("hessians %s: %d groups over %d layers", meta.get("source"), len(groups), n_layers)
                _log_expert_coverage(p, out, str(meta.get("source")))
        except KeyboardInterrupt:
            if rank == 0:
                log.warning("interrupted: %s is kept, so a rerun resumes; `rac clean` removes it", work)
            raise
        except OSError as err:
            if not disk_fault(err):
                if rank == 0:
                    remove_build(work)
                raise
            # A full disk or a read-only --out: the finished layers (or the sealed store) stay for the rerun.
            raise RacError(
                f"{disk_message(err)}; the finished layers are kept in {str(work)!r} and the rerun resumes from "
                "them (`rac clean` removes them)"
            ) from err
        except BaseException:
            if rank == 0:  # a failed build removes its own partial build; an interrupted one keeps it (above)
                remove_build(work)
            raise
        finally:
            cache.close()
    return memory


def _log_expert_coverage(p: Params, store: Path, source: str) -> None:
    """For a mixture of experts: how many experts this source's tokens reached at least
    ``prune.expert_min_tokens`` times (mixed segments); the others will be compressed with the identity Hessian."""
    tokens: dict[tuple[int, str, int], int] = {}
    for g in HessianStore(store, None).groups():
        expert = expert_member(g.name)
        if expert is not None:
            tokens[(g.layer, expert[0], expert[2])] = sum(n for s, n in g.n_tokens.items() if p.prune.mix[s] > 0)
    if tokens:
        covered = sum(n >= p.prune.expert_min_tokens for n in tokens.values())
        log.info(
            "hessians %s: %d of %d experts (%.1f%%) saw >= prune.expert_min_tokens=%d tokens",
            source, covered, len(tokens), 100 * covered / len(tokens), p.prune.expert_min_tokens,
        )  # fmt: skip


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


def run(p: Params, calib: Path, out: Path, world_size: int) -> dict[str, float] | None:
    """Build the store at ``out``: in this process, over ``world_size`` spawned ranks, or as a torchrun rank.
    In this process, return the memory plan and the peak RSS (GB) for ``--timings``."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # launched by torchrun
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        try:
            build(p, calib, out, dist.get_rank(), dist.get_world_size())
        finally:
            dist.destroy_process_group()
    elif world_size == 1:
        memory = build(p, calib, out, 0, 1)
        planned = {f"plan_{k}_gb": v for k, v in memory.as_dict().items()}
        return planned | {"peak_rss_gb": round(peak_rss_gb(), 4)}
    else:
        read_parquet(calib, CALIBRATION, "calibration")  # a one-line error before any process starts
        with tempfile.TemporaryDirectory() as tmp:
            torch.multiprocessing.spawn(_worker, args=(world_size, f"{tmp}/init", p, calib, out), nprocs=world_size)
    return None
