"""What the Hessian store's integrity checks cost, measured side by side in one run.

A store with one Qwen-7B decoder layer's groups, scaled by --scale (q/k/v and gate/up read hidden,
o reads hidden, down reads intermediate), both segments, chunk 2048, as `rac hessians` writes it:

1. write: zarr + zstd of every array (what a build does anyway);
2. seal: the sha256 manifest of every file (new: once per build);
3. open: the reader's size check of every file against the manifest (new: every open);
4. read: decoding every group's sums (what prune does anyway);
5. verify: the digests of every file (new: before each group is used, and `rac hessians verify`).

    python benchmarks/store_integrity.py --scale 0.25
"""

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from stages.models import LinearGroup
from stages.schemas import tmp_sibling
from stages.store import HessianStore, HessianWriter

HIDDEN, INTERMEDIATE = 3584, 18944  # Qwen-7B
GROUPS = {
    "self_attn.q_proj": (["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], HIDDEN),
    "self_attn.o_proj": (["self_attn.o_proj"], HIDDEN),
    "mlp.gate_proj": (["mlp.gate_proj", "mlp.up_proj"], HIDDEN),
    "mlp.down_proj": (["mlp.down_proj"], INTERMEDIATE),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=0.25, help="Fraction of Qwen-7B's widths.")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    groups = [LinearGroup(0, members) for members, _ in GROUPS.values()]
    sums = {}
    for name, (_, width) in GROUPS.items():
        d = int(width * args.scale)
        X = rng.standard_normal((d, 256), dtype=np.float32)  # a low-rank PSD matrix, like real sums of x·xᵀ
        sums[name] = {s: (X @ X.T) for s in ("prompt", "decode")}
    n_tokens = {"prompt": 1000, "decode": 9000}
    total_mb = sum(x.nbytes for g in sums.values() for x in g.values()) / 2**20
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        dest = Path(tmp) / "rac.zarr"
        writer = HessianWriter(
            tmp_sibling(dest),
            model_id="bench",
            fingerprint="0" * 16,
            source="rac",
            chunk=2048,
            n_tokens=n_tokens,
            groups=groups,
        )
        times = {}
        start = time.perf_counter()
        for g in groups:
            writer.write_group(g.layer, g.name, g.members, sums[g.name], n_tokens)
        times["write (zarr + zstd)"] = time.perf_counter() - start
        start = time.perf_counter()
        writer.seal()
        times["seal (sha256 manifest)"] = time.perf_counter() - start
        writer.publish(dest)
        start = time.perf_counter()
        store = HessianStore(dest, "0" * 16, groups)
        times["open (size checks)"] = time.perf_counter() - start
        start = time.perf_counter()
        for g in store.groups():
            store.verify(f"layers/0/{g.name}")
        times["verify (sha256 of every file)"] = time.perf_counter() - start
        start = time.perf_counter()
        for g in store.groups():
            for s in ("prompt", "decode"):
                np.asarray(store.root[f"layers/0/{g.name}/xtx_{s}"][...])
        times["read (decode all sums)"] = time.perf_counter() - start
        disk_mb = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file()) / 2**20
        files = sum(1 for f in dest.rglob("*") if f.is_file())
        shutil.rmtree(dest)
    print(
        f"one Qwen-7B layer x {args.scale}: {total_mb:.0f} MB of fp32 sums, {disk_mb:.0f} MB on disk in {files} files"
    )
    print(f"{'step':<32} {'seconds':>8} {'MB/s':>8} {'vs write':>9} {'vs read':>8}")
    for step, seconds in times.items():
        print(
            f"{step:<32} {seconds:>8.3f} {disk_mb / seconds:>8.0f} {seconds / times['write (zarr + zstd)']:>8.2f}x "
            f"{seconds / times['read (decode all sums)']:>7.2f}x"
        )


if __name__ == "__main__":
    main()
