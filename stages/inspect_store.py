"""``rac hessians info`` and ``rac hessians merge``: read complete Hessian stores; merge writes a new one."""

import logging
from pathlib import Path

import numpy as np
import torch

from stages.errors import RacError
from stages.params import Params
from stages.schemas import SEGMENT_IDS, HessianStore, HessianWriter
from stages.solvers import hessian_from_sums

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
        H = hessian_from_sums(sums, g.n_tokens, p.prune.mix)  # [d, d]
        H += p.prune.damp * torch.diag(H).mean() * torch.eye(H.shape[0], dtype=H.dtype)
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


def merge(p: Params, paths: list[Path], out: Path) -> None:
    """Add the sums and counts of ``paths`` (complete stores of one model and source) into ``out``."""
    stores = [HessianStore(path, None) for path in paths]
    first = stores[0].attrs
    for store in stores[1:]:
        for key in ("model_fingerprint", "source"):
            if store.attrs[key] != first[key]:
                raise RacError(
                    f"cannot merge {str(store.path)!r} ({key}={store.attrs[key]!r}) with "
                    f"{str(stores[0].path)!r} ({key}={first[key]!r}); merge shards of one model and source"
                )
    groups = stores[0].groups()
    writer = HessianWriter(
        out,
        model_id=first["model_id"],
        fingerprint=first["model_fingerprint"],
        source=first["source"],
        chunk=p.hessians.chunk,
    )
    try:
        for g in groups:
            xtx = {s: np.zeros_like(x) for s, x in stores[0].sums(g).items()}
            counts = dict.fromkeys(SEGMENT_IDS, 0)
            for store in stores:
                match = [h for h in store.groups() if h.key == g.key]
                if not match:
                    raise RacError(f"{str(store.path)!r} lacks group {g.key!r}; merge stores of the same model")
                for s, x in store.sums(match[0]).items():
                    xtx[s] += x
                    counts[s] += match[0].n_tokens[s]
            writer.write_group(g.layer, g.name, g.members, xtx, counts)
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    log.info("merged %d stores into %s", len(stores), out)
