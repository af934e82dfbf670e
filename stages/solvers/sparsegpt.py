"""SparseGPT (Frantar & Alistarh, 2023), unstructured, as in the IST-DASLab reference."""

import torch

from stages.solvers.base import Pruned, block_counts, keep_smallest_pruned, layer_loss
from stages.solvers.hessian import prepare_hessian


def sparsegpt(W: torch.Tensor, H: torch.Tensor, *, sparsity: float, block_size: int, damp: float) -> Pruned:
    """Prune W [out, in] to ``sparsity`` by per-block OBS masks and compensation, minimising ||WX − ŴX||²."""
    out, in_ = W.shape
    if H.shape != (in_, in_):
        raise ValueError(f"H has shape {tuple(H.shape)} but W {tuple(W.shape)} needs [{in_}, {in_}]")
    # float32 as in the reference; float64 only when the caller already paid for it.
    dtype = torch.float64 if torch.float64 in (W.dtype, H.dtype) else torch.float32
    Hinv, dead, damp_used, _ = prepare_hessian(H.to(dtype), damp)  # [in, in] upper Cholesky of H⁻¹
    W_hat = W.to(dtype, copy=True)  # [out, in]
    W_hat[:, dead] = 0
    M = torch.ones(out, in_, dtype=torch.bool, device=W.device)  # [out, in]
    counts = block_counts(sparsity, out, in_, block_size)

    for i1, k in zip(range(0, in_, block_size), counts, strict=True):
        i2 = min(i1 + block_size, in_)
        W1 = W_hat[:, i1:i2].clone()  # [out, B]
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]  # [B, B]
        # OBS saliency w²/[H⁻¹]_ii², chosen once per block so the mask adapts to earlier compensation.
        M1 = keep_smallest_pruned(W1**2 / torch.diag(Hinv1).unsqueeze(0) ** 2, k)  # [out, B]
        for i in range(i2 - i1):
            w = W1[:, i]  # [out]
            d = Hinv1[i, i]
            q = torch.where(M1[:, i], w, 0.0)
            Q1[:, i] = q
            err = (w - q) / d  # [out]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W_hat[:, i1:i2] = Q1
        M[:, i1:i2] = M1
        # Deferred update of the trailing columns: one matmul per block instead of one rank-1 per column.
        W_hat[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    weight = W_hat.to(W.dtype)
    return Pruned(weight, M, layer_loss(W, weight, H), damp_used)
