"""SparseGPT (Frantar & Alistarh, 2023), unstructured or N:M, as in the IST-DASLab reference."""

import torch

from stages.errors import RacError
from stages.solvers.base import Pruned, block_counts, layer_loss
from stages.solvers.hessian import prepare_hessian
from stages.solvers.masks import keep_nm, keep_smallest_pruned, layer_pattern

KERNELS = ("torch", "triton")


def obs_block(
    W1: torch.Tensor, Hinv1: torch.Tensor, M1: torch.Tensor, nm: tuple[int, int] | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sequential column loop of one block: (Q1, Err1, M1) from W1 [out, B], Hinv1 [B, B], M1 [out, B].

    Q1 holds the pruned, compensated weights; Err1 the scaled errors (w − q)/[H⁻¹]ᵢᵢ for the lazy
    trailing update; M1 the mask (for N:M, chosen here group by group). The inputs are not mutated.
    """
    W1 = W1.clone()
    Q1 = torch.zeros_like(W1)
    Err1 = torch.zeros_like(W1)
    M1 = M1.clone()
    d1 = torch.diag(Hinv1).unsqueeze(0)  # [1, B]
    for i in range(W1.shape[1]):
        if nm is not None and i % nm[1] == 0:
            g = slice(i, i + nm[1])
            M1[:, g] = keep_nm(W1[:, g] ** 2 / d1[:, g] ** 2, *nm)
        w = W1[:, i]  # [out]
        q = torch.where(M1[:, i], w, 0.0)
        Q1[:, i] = q
        err = (w - q) / Hinv1[i, i]  # [out]
        W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
        Err1[:, i] = err
    return Q1, Err1, M1


def sparsegpt(
    W: torch.Tensor,
    H: torch.Tensor,
    *,
    sparsity: float,
    pattern: str,
    block_size: int,
    damp: float,
    kernel: str,
) -> Pruned:
    """Prune W [out, in] to ``sparsity`` by OBS masks and compensation, minimising ||WX − ŴX||².

    ``kernel`` runs each block's column loop: "torch" (``obs_block``) or "triton" (the fused kernel).
    """
    if kernel not in KERNELS:
        raise RacError(f"prune.kernel={kernel!r} is unknown; choose one of {sorted(KERNELS)}")
    if kernel == "triton":
        from stages.kernels.sparsegpt_block import obs_block_triton as block_step  # triton only when asked for
    else:
        block_step = obs_block
    out, in_ = W.shape
    if H.shape != (in_, in_):
        raise ValueError(f"H has shape {tuple(H.shape)} but W {tuple(W.shape)} needs [{in_}, {in_}]")
    nm = layer_pattern(pattern, sparsity, in_)
    if nm is not None and block_size % nm[1] != 0:
        raise RacError(
            f"prune.block_size={block_size} must be a multiple of M={nm[1]} for prune.pattern={pattern!r}; "
            f"use e.g. {max(block_size // nm[1], 1) * nm[1]}"
        )
    # float32 as in the reference; float64 only when the caller already paid for it.
    dtype = torch.float64 if torch.float64 in (W.dtype, H.dtype) else torch.float32
    Hinv, dead, damp_used, _ = prepare_hessian(H.to(dtype), damp)  # [in, in] upper Cholesky of H⁻¹
    W_hat = W.to(dtype, copy=True)  # [out, in]
    W_hat[:, dead] = 0
    M = torch.ones(out, in_, dtype=torch.bool, device=W.device)  # [out, in]
    counts = block_counts(sparsity, out, in_, block_size)

    for i1, k in zip(range(0, in_, block_size), counts, strict=True):
        i2 = min(i1 + block_size, in_)
        W1 = W_hat[:, i1:i2]  # [out, B]
        Hinv1 = Hinv[i1:i2, i1:i2]  # [B, B]
        # OBS saliency w²/[H⁻¹]_ii². Unstructured: chosen once per block, so the mask adapts to earlier
        # compensation. N:M: chosen per group inside the loop, from the weights compensated so far.
        d1 = torch.diag(Hinv1).unsqueeze(0)  # [1, B]
        M1 = keep_smallest_pruned(W1**2 / d1**2, k) if nm is None else torch.ones_like(W1, dtype=torch.bool)
        Q1, Err1, M1 = block_step(W1, Hinv1, M1, nm)
        W_hat[:, i1:i2] = Q1
        M[:, i1:i2] = M1
        # Deferred update of the trailing columns: one matmul per block instead of one rank-1 per column.
        W_hat[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    weight = W_hat.to(W.dtype)
    return Pruned(weight, M, layer_loss(W, weight, H), damp_used)
