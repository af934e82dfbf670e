"""Fused SparseGPT block: the sequential column loop of one block, on chip.

The reference is ``stages.solvers.sparsegpt.obs_block``. Rows are independent given H⁻¹, so each
program owns ``BLOCK_R`` rows and walks the block's columns with that [BLOCK_R, B] tile held in
registers: per column it picks the kept weights (for N:M, per group of M as the loop reaches it),
quantises, and applies the rank-1 OBS update to the rest of the tile. Only the block's final
weights, errors and mask go back to memory; the lazy trailing update stays a GEMM in torch.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _obs_block_kernel(
    W_ptr,  # [rows, b] float32 in: the block's weights after earlier blocks' updates
    Hinv_ptr,  # [b, b] float32: the block's slice of the upper Cholesky factor of H⁻¹
    Keep_ptr,  # [rows, b] int8 in: the unstructured mask (1 = kept); out: the mask used
    Q_ptr,  # [rows, b] float32 out: pruned and compensated weights
    Err_ptr,  # [rows, b] float32 out: (w − q) / [H⁻¹]ᵢᵢ per column, for the lazy trailing update
    rows,
    b,
    stride_w,
    stride_h,
    BLOCK_R: tl.constexpr,
    B: tl.constexpr,  # b rounded up to a power of two
    N: tl.constexpr,  # N:M pattern, or M == 0 for unstructured
    M: tl.constexpr,
):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # [R]
    c = tl.arange(0, B)  # [B]
    tile = (r < rows)[:, None] & (c < b)[None, :]
    offsets = r[:, None] * stride_w + c[None, :]
    W = tl.load(W_ptr + offsets, mask=tile, other=0.0)  # [R, B]
    keep = tl.load(Keep_ptr + offsets, mask=tile, other=1) != 0  # [R, B]
    d_all = tl.load(Hinv_ptr + c * stride_h + c, mask=c < b, other=1.0)  # [B] diag of the block's H⁻¹ factor
    Err = tl.zeros((BLOCK_R, B), dtype=tl.float32)
    for i in range(b):
        if M > 0:  # noqa: SIM102  (compile-time branch: unstructured kernels carry no group code)
            if i % M == 0:
                # Rank each of the group's M scores within its row; the N lowest are pruned, ties
                # to the lower column, as in keep_nm.
                score = W * W / (d_all * d_all)[None, :]  # [R, B]
                group = (c >= i) & (c < i + M)  # [B]
                rank = tl.zeros((BLOCK_R, B), dtype=tl.int32)
                for j in tl.static_range(M):
                    s_j = tl.sum(tl.where((c == i + j)[None, :], score, 0.0), axis=1)  # [R]
                    before = (s_j[:, None] < score) | ((s_j[:, None] == score) & (i + j < c[None, :]))
                    rank += tl.where(group[None, :] & before, 1, 0)
                keep = tl.where(group[None, :], rank >= N, keep)
        column = (c == i)[None, :]  # [1, B]
        w = tl.sum(tl.where(column, W, 0.0), axis=1)  # [R]
        kept = tl.sum(tl.where(column, keep.to(tl.int32), 0), axis=1) != 0  # [R]
        d = tl.load(Hinv_ptr + i * stride_h + i)
        err = (w - tl.where(kept, w, 0.0)) / d  # [R]
        h = tl.load(Hinv_ptr + i * stride_h + c, mask=c < b, other=0.0)  # [B] row i; zero left of i (upper)
        # Column i itself becomes q (w − err·d); columns right of i are compensated.
        W -= err[:, None] * h[None, :]
        Err = tl.where(column, err[:, None], Err)
    tl.store(Q_ptr + offsets, W, mask=tile)
    tl.store(Err_ptr + offsets, Err, mask=tile)
    tl.store(Keep_ptr + offsets, keep.to(tl.int8), mask=tile)


def obs_block_triton(
    W1: torch.Tensor, Hinv1: torch.Tensor, M1: torch.Tensor, nm: tuple[int, int] | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Q1, Err1, M1) for one block, as ``obs_block``: W1 [rows, b] float32, Hinv1 [b, b], M1 [rows, b] bool."""
    if W1.dtype != torch.float32 or Hinv1.dtype != torch.float32:
        raise ValueError(f"the Triton block works in float32, got W1 {W1.dtype} and Hinv1 {Hinv1.dtype}")
    rows, b = W1.shape
    W1 = W1.contiguous()
    Hinv1 = Hinv1.contiguous()
    keep = M1.to(torch.int8).contiguous()  # updated in place by the kernel
    Q1, Err1 = torch.empty_like(W1), torch.empty_like(W1)
    B = triton.next_power_of_2(b)
    # A [BLOCK_R, B] fp32 tile plus its error and mask tiles must stay in registers.
    BLOCK_R = max(1, min(32, 4096 // B))
    n, m = nm if nm is not None else (0, 0)
    _obs_block_kernel[(triton.cdiv(rows, BLOCK_R),)](
        W1, Hinv1, keep, Q1, Err1, rows, b, W1.stride(0), Hinv1.stride(0), BLOCK_R=BLOCK_R, B=B, N=n, M=m
    )
    return Q1, Err1, keep.bool()
