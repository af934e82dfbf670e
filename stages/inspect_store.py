"""``rac hessians info``, ``verify`` and ``merge``: read complete Hessian stores; merge writes a new one."""

import logging
from pathlib import Path

import numpy as np
import torch

from stages.errors import RacError
from stages.layers import open_skeleton, plan
from stages.models import fingerprint
from stages.params import Params
from stages.schemas import SEGMENT_IDS, tmp_sibling
from stages.solvers import hessian_from_sums
from stages.solvers.hessian import damped
from stages.store import HessianStore, HessianWriter

log = logging.getLogger(__name__)


def _disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def info(p: Params, path: Path) -> None:
    """Print per layer and group: token counts per segment, trace and condition number of H after
    ``prune.damp`` damping (H mixed by ``prune.mix``), and the group's size on disk."""
    store = HessianStore(path, None)
    a = store.attrs
    print(f"{path}: model {a['model_id']} ({a['model_fingerprint']}), source {a['source']}, {a['dtype']}")
    print(f"{'layer':>5} {'group':<22} {'n_prompt':>9} {'n_decode':>9} {'trace':>11} {'cond':>10} {'MB':>7}")
    total = 0
    for g in store.groups():
        sums = {s: torch.from_numpy(x).double() for s, x in store.sums(g).items()}
        H, _ = damped(hessian_from_sums(sums, g.n_tokens, p.prune.mix), p.prune.damp)  # [d, d], as the solvers see it
        eig = torch.linalg.eigvalsh(H)
        cond = float(eig[-1] / eig[0]) if eig[0] > 0 else float("inf")
        size = _disk_bytes(store.path / g.key)
        total += size
        print(
            f"{g.layer:>5} {g.name:<22} {g.n_tokens['prompt']:>9} {g.n_tokens['decode']:>9} "
            f"{float(torch.trace(H)):>11.4g} {cond:>10.3g} {size / 2**20:>7.2f}"
        )
    files = sum(1 for f in store.path.rglob("*") if f.is_file())
    print(f"total {total / 2**20:.2f} MB on disk in {files} files")
    _memory(p, store)


def _memory(p: Params, store: HessianStore) -> None:
    """What a layer walk over this store's tokens holds at most under ``activations`` (padding aside): the memory
    its build used, or a sequential prune on the same sequences will."""
    if store.attrs["model_fingerprint"] != fingerprint(p.dense):
        print(f"memory: `model` in params is not the store's model {store.attrs['model_id']!r}; not planned")
        return
    skeleton, groups = open_skeleton(p.dense, torch.device("cpu"))
    n, per_batch = sum(store.n_tokens.values()), p.activations.batch_tokens
    positions = [per_batch] * (n // per_batch) + ([n % per_batch] if n % per_batch else [])
    memory = plan(skeleton, groups, positions, p.activations.memory_gb * 2**30)
    parts = ", ".join(f"{k.replace('_', ' ')} {v:g}" for k, v in memory.as_dict().items())
    print(f"layer walk memory (GB, activations.memory_gb={p.activations.memory_gb:g}): {parts}")


def verify(path: Path) -> None:
    """Hash every file of the store at ``path`` against its manifest; a one-line error names a damaged file."""
    store = HessianStore(path, None)
    store.verify()
    print(f"{path}: {len(store.files)} files match the manifest ({len(store.specs)} groups, tokens {store.n_tokens})")


def merge(p: Params, paths: list[Path], out: Path) -> None:
    """Add the sums and counts of ``paths`` (complete stores of one model and source) into ``out``."""
    first = HessianStore(paths[0], None)
    stores = [first] + [HessianStore(path, first.attrs["model_fingerprint"], first.specs) for path in paths[1:]]
    for store in stores[1:]:
        if store.attrs["source"] != first.attrs["source"]:
            raise RacError(
                f"cannot merge {str(store.path)!r} (source={store.attrs['source']!r}) with "
                f"{str(first.path)!r} (source={first.attrs['source']!r}); merge shards of one model and source"
            )
    writer = HessianWriter(
        tmp_sibling(out),
        model_id=first.attrs["model_id"],
        fingerprint=first.attrs["model_fingerprint"],
        source=first.attrs["source"],
        chunk=p.hessians.chunk,
        n_tokens={s: sum(store.n_tokens[s] for store in stores) for s in SEGMENT_IDS},
        groups=first.specs,
    )
    try:
        for g in first.groups():
            xtx: dict[str, np.ndarray] = {}
            for store in stores:
                for s, x in store.sums(g).items():
                    xtx[s] = xtx[s] + x if s in xtx else x
            writer.write_group(g.layer, g.name, g.members, xtx, writer.attrs["n_tokens"])
        writer.seal()
        writer.publish(out)
    except BaseException:
        writer.abort()
        raise
    log.info("merged %d stores into %s", len(stores), out)
