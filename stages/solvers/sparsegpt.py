"""SparseGPT (Frantar & Alistarh, 2023), unstructured or N:M, optionally quantizing in the same OBS pass (the
reference's ``wbits``), as in the IST-DASLab reference; ``obs`` is also the loop of GPTQ."""

import torch

from stages.solvers.base import Compressed, Options, block_counts, check_shapes, layer_loss
from stages.solvers.hessian import prepare_hessian
from stages.solvers.masks import keep_nm, keep_smallest_pruned, layer_pattern
from stages.solvers.quant import Grid, check_spec, quantize

KERNELS = ("torch", "triton")


def obs_block(
    W1: torch.Tensor,
    Hinv1: torch.Tensor,
    M1: torch.Tensor,
    nm: tuple[int, int] | None,
    grid: Grid | None = None,
    columns: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sequential column loop of one block: (Q1, Err1, M1) from W1 [out, B], Hinv1 [B, B], M1 [out, B].

    Q1 holds the pruned (and, with ``grid``, quantized) compensated weights; Err1 the scaled errors
    (w − q)/[H⁻¹]ᵢᵢ for the lazy trailing update; M1 the mask (for N:M, chosen here group by group).
    ``columns`` [B] are the block's inputs in the original order, where ``grid`` looks up their scales.
    The inputs are not mutated, except that ``grid`` fills the scales of the groups it opens.
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
        if grid is not None:
            assert columns is not None
            scale, zero = grid.column(int(columns[i]), W1[:, i:])
            q = quantize(q, scale, zero, grid.spec.bits)  # a pruned 0 stays 0: the grid holds it
        Q1[:, i] = q
        err = (w - q) / Hinv1[i, i]  # [out]
        W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
        Err1[:, i] = err
    return Q1, Err1, M1


def obs(W: torch.Tensor, H: torch.Tensor, opts: Options, sparsity: float) -> Compressed:
    """Prune W [out, in] to ``sparsity`` and quantize it on ``opts.quant``'s grid by OBS updates, minimising
    ||WX − ŴX||²; sparsity 0 with a grid is GPTQ, no grid is SparseGPT."""
    check_shapes(W, H)
    if opts.kernel not in KERNELS:
        raise ValueError(f"kernel={opts.kernel!r} is unknown; choose one of {sorted(KERNELS)}")
    out, in_ = W.shape
    nm = layer_pattern(opts.pattern, sparsity, in_) if sparsity > 0 else None
    if nm is not None and opts.block_size % nm[1] != 0:
        raise ValueError(
            f"block_size={opts.block_size} must be a multiple of M={nm[1]} for pattern={opts.pattern!r}; "
            f"use e.g. {max(opts.block_size // nm[1], 1) * nm[1]}"
        )
    spec = opts.quant
    if spec is not None:
        check_spec(spec, in_, opts.block_size)
        if opts.kernel == "triton":
            raise ValueError("the Triton kernel prunes without quantizing; quantization runs in kernel='torch'")
        if spec.act_order and nm is not None:
            raise ValueError(f"act_order visits inputs out of order, which breaks the {opts.pattern} groups")
    if opts.kernel == "triton":
        from stages.kernels.sparsegpt_block import obs_block_triton as block_step  # triton only when asked for
    else:
        block_step = obs_block
    # float32 as in the reference; float64 only when the caller already paid for it.
    dtype = torch.float64 if torch.float64 in (W.dtype, H.dtype) else torch.float32
    Hd = H.to(dtype)  # [in, in]
    W_hat = W.to(dtype, copy=True)  # [out, in]
    W_hat[:, torch.diag(Hd) == 0] = 0  # a dead input never reaches the output (prepare_hessian's `dead`)
    grid = Grid(spec, W_hat) if spec is not None else None
    order = torch.arange(in_, device=W.device)  # [in] the original input of each visited column
    if spec is not None and spec.act_order:
        # Large H_jj first, as GPTQ's act order: the most active inputs are quantized while most columns can
        # still compensate. A stable sort keeps ties (dead inputs included) in index order.
        order = torch.argsort(torch.diag(Hd), descending=True, stable=True)
        Hd, W_hat = Hd[order][:, order], W_hat[:, order]
    Hinv, _, damp_used, _ = prepare_hessian(Hd, opts.damp)  # [in, in] upper Cholesky of H⁻¹, visiting order
    M = torch.ones(out, in_, dtype=torch.bool, device=W.device)  # [out, in] in the visiting order
    counts = block_counts(sparsity, out, in_, opts.block_size)

    for i1, k in zip(range(0, in_, opts.block_size), counts, strict=True):
        i2 = min(i1 + opts.block_size, in_)
        W1 = W_hat[:, i1:i2]  # [out, B]
        Hinv1 = Hinv[i1:i2, i1:i2]  # [B, B]
        # OBS saliency w²/[H⁻¹]_ii². Unstructured: chosen once per block, so the mask adapts to earlier
        # compensation. N:M: chosen per group inside the loop, from the weights compensated so far.
        d1 = torch.diag(Hinv1).unsqueeze(0)  # [1, B]
        M1 = keep_smallest_pruned(W1**2 / d1**2, k) if nm is None else torch.ones_like(W1, dtype=torch.bool)
        if grid is None:
            Q1, Err1, M1 = block_step(W1, Hinv1, M1, nm)
        else:
            Q1, Err1, M1 = obs_block(W1, Hinv1, M1, nm, grid, order[i1:i2])
        W_hat[:, i1:i2] = Q1
        M[:, i1:i2] = M1
        # Deferred update of the trailing columns: one matmul per block instead of one rank-1 per column.
        W_hat[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    inverse = torch.argsort(order)
    W_hat, M = W_hat[:, inverse], M[:, inverse]
    weight = W_hat.to(W.dtype)
    quantized = grid.integers(W_hat) if grid is not None else None
    return Compressed(weight, M, layer_loss(W, weight, H), damp_used, quantized)


def sparsegpt(W: torch.Tensor, H: torch.Tensor, opts: Options) -> Compressed:
    """Prune W [out, in] to ``opts.sparsity`` by OBS masks and compensation; quantize it in the same pass when
    ``opts.quant`` is set. ``opts.kernel`` runs each block's column loop: "torch" or "triton" (the fused kernel)."""
    return obs(W, H, opts, opts.sparsity)
