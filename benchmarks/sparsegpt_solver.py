"""SparseGPT solver speed on Qwen-7B-shaped layers, measured side by side in one run.

Paths compared, at equal loss:
- ``unfused``: a direct transcription of the SparseGPT algorithm with no lazy batching: every
  column's OBS update is applied at once to all the columns right of it (memory-bound rank-1s);
- ``torch``: rac's solver, column loop in torch per block of 128, lazy trailing updates as GEMMs;
- ``triton``: rac's solver with the fused block kernel (CUDA only);
- ``gptq-w4``: GPTQ's loop (the same OBS pass, every weight rounded to a 4-bit grid), for its cost.
Also printed: the share of the torch path's time spent in the trailing GEMMs alone (the floor a
fused kernel can approach), and one q, k, v group solved with its shared H factored once and its rows
stacked, against member by member. On a 2-core CPU use ``--scale 0.25`` (layer dims divided by 4).

    python benchmarks/sparsegpt_solver.py --scale 0.25
"""

import argparse
import platform
import time
from collections.abc import Callable
from typing import Any

import torch

from stages.solvers import Options, QuantSpec, gptq
from stages.solvers.base import block_counts, layer_loss
from stages.solvers.hessian import prepare_hessian
from stages.solvers.masks import keep_smallest_pruned
from stages.solvers.sparsegpt import sparsegpt, sparsegpt_shared

QWEN_7B = {"q/o_proj": (3584, 3584), "up/gate_proj": (18944, 3584), "down_proj": (3584, 18944)}
QWEN_7B_QKV = (3584, 512, 512)  # q, k and v rows: one input, one H
SPARSITY, BLOCK, DAMP = 0.5, 128, 0.01


def realistic_problem(out: int, in_: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """W [out, in] and H [in, in] with a decaying spectrum and outlier input scales, as in LLM activations."""
    g = torch.Generator(device="cpu").manual_seed(0)
    rank = min(in_, 1024)
    B = torch.randn(in_, rank, generator=g) * torch.arange(1, rank + 1).pow(-0.75)  # [in, r] decaying spectrum
    scales = torch.exp(torch.randn(in_, generator=g))  # a few inputs ~10x the median, as in LLMs
    H = (B @ B.T + 1e-3 * torch.eye(in_)) * scales[:, None] * scales[None, :]
    W = torch.randn(out, in_, generator=g) * 0.02
    return W.to(device), H.to(device)


def unfused(W: torch.Tensor, H: torch.Tensor) -> tuple[torch.Tensor, float]:
    """SparseGPT with every column's update applied to the whole trailing matrix (no lazy batching)."""
    Hinv, dead, _, _ = prepare_hessian(H, DAMP)
    W0, W = W, W.clone()
    W[:, dead] = 0
    out, in_ = W.shape
    for i1, k in zip(range(0, in_, BLOCK), block_counts(SPARSITY, out, in_, BLOCK), strict=True):
        i2 = min(i1 + BLOCK, in_)
        M1 = keep_smallest_pruned(W[:, i1:i2] ** 2 / torch.diag(Hinv)[i1:i2] ** 2, k)  # [out, B]
        for i in range(i1, i2):
            q = torch.where(M1[:, i - i1], W[:, i], 0.0)
            err = (W[:, i] - q) / Hinv[i, i]  # [out]
            W[:, i:] -= err[:, None] * Hinv[i, i:][None, :]
    return W, layer_loss(W0, W, H)


def trailing_gemms(W: torch.Tensor, H: torch.Tensor) -> None:
    """Only the lazy updates W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:] of the torch path, with stand-in errors."""
    out, in_ = W.shape
    W = W.clone()
    Err1 = torch.randn(out, BLOCK, device=W.device)
    for i1 in range(0, in_, BLOCK):
        i2 = min(i1 + BLOCK, in_)
        W[:, i2:] -= Err1[:, : i2 - i1] @ H[i1:i2, i2:]


def timed(device: torch.device, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[float, Any]:
    """Seconds of one call of ``fn(*args, **kwargs)`` (synchronised on CUDA), and its result."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, required=True, help="Layer dims multiplier (1 = Qwen-7B).")
    parser.add_argument("--skip-unfused", action="store_true", help="Skip the slow unfused baseline.")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kernels = ["torch", "triton"] if device.type == "cuda" else ["torch"]
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"device {device} ({name}), torch threads {torch.get_num_threads()}, scale {args.scale}")
    print(f"{'layer':>14} {'shape':>13} {'path':>8} {'seconds':>9} {'loss':>12} {'vs unfused':>10}")
    for label, (out, in_) in QWEN_7B.items():
        out, in_ = int(out * args.scale), int(in_ * args.scale)
        W, H = realistic_problem(out, in_, device)
        rows = []
        base = None
        if not args.skip_unfused:
            base, (_, loss) = timed(device, unfused, W, H)
            rows.append(("unfused", base, loss))
        for kernel in kernels:
            opts = Options(SPARSITY, "unstructured", BLOCK, DAMP, kernel, None)
            timed(device, sparsegpt, W, H, opts)  # warm-up (Triton compiles here)
            seconds, result = timed(device, sparsegpt, W, H, opts)
            rows.append((kernel, seconds, result.loss))
        # GPTQ's column loop on the same layer: 4 bits, groups of 128 where they divide the width, else one scale
        # per row (its loss is a rounding error, not a pruning one: not comparable with the rows above).
        grid = QuantSpec(4, 128 if in_ % 128 == 0 else None, True, False)
        seconds, result = timed(device, gptq, W, H, Options(0.0, "unstructured", BLOCK, DAMP, "torch", grid))
        rows.append(("gptq-w4", seconds, result.loss))
        for path, seconds, loss in rows:
            speedup = f"{base / seconds:9.1f}x" if base and path != "gptq-w4" else "-"
            print(f"{label:>14} {f'{out}x{in_}':>13} {path:>8} {seconds:9.3f} {loss:12.6g} {speedup:>10}")
        gemm, _ = timed(device, trailing_gemms, W, H)
        share = gemm / rows[-2][1]
        print(f"{label:>14} {f'{out}x{in_}':>13} {'GEMMs':>8} {gemm:9.3f} {'':>12} {share:9.0%} of {rows[-2][0]}")
    # A group sharing H (q, k, v) in one stacked solve against member by member, torch path.
    in_ = int(3584 * args.scale)
    Ws = [realistic_problem(int(out * args.scale), in_, device)[0] for out in QWEN_7B_QKV]
    H = realistic_problem(1, in_, device)[1]
    opts = Options(SPARSITY, "unstructured", BLOCK, DAMP, "torch", None)
    alone, _ = timed(device, lambda: [sparsegpt(W, H, opts) for W in Ws])
    shared, _ = timed(device, sparsegpt_shared, Ws, H, opts)
    shape = f"{'+'.join(str(W.shape[0]) for W in Ws)}x{in_}"
    print(f"{'q,k,v':>14} {shape:>13} one by one {alone:.3f} s, shared H {shared:.3f} s: {alone / shared:.2f}x")


if __name__ == "__main__":
    main()
