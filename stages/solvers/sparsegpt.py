"""SparseGPT (Frantar & Alistarh, 2023), unstructured or N:M, optionally quantizing in the same OBS pass (the
reference's ``wbits``), as in the IST-DASLab reference; ``obs`` is also the loop of GPTQ."""

import torch

from stages.solvers.base import Compressed, OptionError, Options, block_counts, check_shapes, layer_loss
from stages.solvers.hessian import prepare_hessian
from stages.solvers.masks import keep_nm, keep_smallest_pruned, layer_pattern
from stages.solvers.quant import Grid, check_spec, quantize

KERNELS = ("torch", "triton")


def check_obs(opts: Options) -> None:
    """The OBS loop's rules for kernel, pattern and grid, which hold for every layer (the stages check them before
    any model is read; a layer's own width is checked as it is solved)."""
    if opts.kernel not in KERNELS:
        raise OptionError("{kernel} is unknown; choose one of {choices}", {"kernel": opts.kernel}, choices=KERNELS)
    spec = opts.quant
    if spec is None:
        return
    if opts.kernel == "triton":
        raise OptionError(
            "{kernel} prunes without quantizing, but {bits}; quantization runs in kernel 'torch' (or 'auto')",
            {"kernel": opts.kernel, "bits": spec.bits},
        )
    if spec.act_order and opts.pattern != "unstructured" and opts.sparsity > 0:
        raise OptionError(
            "{act_order} visits inputs out of order, which breaks the N:M groups of {pattern}; set it false or the "
            "pattern unstructured",
            {"act_order": True, "pattern": opts.pattern},
        )
    g = spec.group_size
    if g is not None and not spec.act_order and opts.block_size % g:
        # A dynamic group opens inside the batch that holds it, so its scale is read from fully compensated weights
        # (act order's groups are static: read from W before any update).
        raise OptionError(
            "{block_size} is not a multiple of {group_size}: a group must open inside one lazy batch; set the block "
            "size to {fit}",
            {"block_size": opts.block_size, "group_size": g},
            fit=g * max(1, round(opts.block_size / g)),
        )


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
    # Transposed, so that column i is the contiguous row i and the rank-1 update touches one slab.
    Wt = W1.T.clone()  # [B, out]
    Errt = torch.empty_like(Wt)  # [B, out]
    Qt = torch.empty_like(Wt) if grid is not None else None
    M1 = M1.clone()
    d1 = torch.diag(Hinv1)  # [B]
    # Without a grid, q = m·w, so err = (w − q)/d = w·(1 − m)/d: one product per column.
    Pt = (~M1).T.to(Wt.dtype) / d1.unsqueeze(1)  # [B, out]
    for i in range(Wt.shape[0]):
        if nm is not None and i % nm[1] == 0:
            g = slice(i, i + nm[1])
            M1[:, g] = keep_nm(Wt[g].T ** 2 / d1[g] ** 2, *nm)
            Pt[g] = (~M1[:, g]).T.to(Wt.dtype) / d1[g].unsqueeze(1)
        if Qt is None:
            torch.mul(Wt[i], Pt[i], out=Errt[i])
        else:
            assert grid is not None and columns is not None
            w = Wt[i]  # [out]
            scale, zero = grid.column(int(columns[i]), Wt[i:].T)
            Qt[i] = quantize(torch.where(M1[:, i], w, 0.0), scale, zero, grid.spec.bits)  # a pruned 0 stays 0
            torch.div(w - Qt[i], Hinv1[i, i], out=Errt[i])
        Wt[i + 1 :].addr_(Hinv1[i, i + 1 :], Errt[i], alpha=-1)  # [B−i−1, out]: the later columns compensate
    # Column i ends as q: w where kept (err = 0), exactly 0 where pruned.
    Q1 = torch.where(M1, Wt.T, 0.0) if Qt is None else Qt.T
    return Q1, Errt.T, M1


def obs(Ws: list[torch.Tensor], H: torch.Tensor, opts: Options, sparsity: float) -> list[Compressed]:
    """Prune each W [out_k, in] of ``Ws`` to ``sparsity`` and quantize it on ``opts.quant``'s grid by OBS updates,
    minimising ||W_k X − Ŵ_k X||²; sparsity 0 with a grid is GPTQ, no grid is SparseGPT.

    The Ws share H (a group's members, e.g. q, k and v), so H is factored once and their stacked rows walk one
    column loop. Rows are independent given H⁻¹ and each member's mask is chosen from its own rows, so the
    result is each member's own solve."""
    for W in Ws:
        check_shapes(W, H)
    spec = opts.quant
    if spec is not None:
        check_spec(spec, H.shape[0])
    check_obs(opts)
    rows = [W.shape[0] for W in Ws]
    in_ = H.shape[0]
    nm = layer_pattern(opts.pattern, sparsity, in_) if sparsity > 0 else None
    if nm is not None and opts.block_size % nm[1] != 0:
        raise OptionError(
            "{block_size} must be a multiple of M={m} for {pattern}; use e.g. {fit}",
            {"block_size": opts.block_size, "pattern": opts.pattern},
            m=nm[1],
            fit=max(opts.block_size // nm[1], 1) * nm[1],
        )
    if opts.kernel == "triton":
        from stages.kernels.sparsegpt_block import obs_block_triton as block_step  # triton only when asked for
    else:
        block_step = obs_block
    # float32 as in the reference; float64 only when the caller already paid for it.
    dtype = torch.float64 if torch.float64 in (*(W.dtype for W in Ws), H.dtype) else torch.float32
    Hd = H.to(dtype)  # [in, in]
    W_hat = torch.cat([W.to(dtype) for W in Ws])  # [Σ out_k, in], a copy
    W_hat[:, torch.diag(Hd) == 0] = 0  # a dead input never reaches the output (prepare_hessian's `dead`)
    grid = Grid(spec, W_hat) if spec is not None else None
    order = torch.arange(in_, device=H.device)  # [in] the original input of each visited column
    if spec is not None and spec.act_order:
        # Large H_jj first, as GPTQ's act order: the most active inputs are quantized while most columns can
        # still compensate. A stable sort keeps ties (dead inputs included) in index order.
        order = torch.argsort(torch.diag(Hd), descending=True, stable=True)
        Hd, W_hat = Hd[order][:, order], W_hat[:, order]
    Hinv, _, damp_used, _ = prepare_hessian(Hd, opts.damp)  # [in, in] upper Cholesky of H⁻¹, visiting order
    M = torch.ones_like(W_hat, dtype=torch.bool)  # [Σ out_k, in] in the visiting order
    counts = [block_counts(sparsity, r, in_, opts.block_size) for r in rows]  # [member][block]

    for b, i1 in enumerate(range(0, in_, opts.block_size)):
        i2 = min(i1 + opts.block_size, in_)
        W1 = W_hat[:, i1:i2]  # [Σ out_k, B]
        Hinv1 = Hinv[i1:i2, i1:i2]  # [B, B]
        # OBS saliency w²/[H⁻¹]_ii². Unstructured: chosen once per block and member, so the mask adapts to
        # earlier compensation. N:M: chosen per group inside the loop, from the weights compensated so far.
        if nm is None:
            scores = (W1**2 / torch.diag(Hinv1).unsqueeze(0) ** 2).split(rows)  # [out_k, B] each
            M1 = torch.cat([keep_smallest_pruned(s, c[b]) for s, c in zip(scores, counts, strict=True)])
        else:
            M1 = torch.ones_like(W1, dtype=torch.bool)
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
    quantized = grid.integers(W_hat).split(rows) if grid is not None else [None] * len(Ws)
    return [
        Compressed(w_hat.to(W.dtype), m, layer_loss(W, w_hat.to(W.dtype), H), damp_used, q)
        for W, w_hat, m, q in zip(Ws, W_hat.split(rows), M.split(rows), quantized, strict=True)
    ]


def sparsegpt_shared(Ws: list[torch.Tensor], H: torch.Tensor, opts: Options) -> list[Compressed]:
    """Prune each W [out_k, in] sharing H to ``opts.sparsity`` by OBS masks and compensation; quantize in the same
    pass when ``opts.quant`` is set. ``opts.kernel`` runs each block's column loop: "torch" or "triton" (fused)."""
    return obs(Ws, H, opts, opts.sparsity)


def sparsegpt(W: torch.Tensor, H: torch.Tensor, opts: Options) -> Compressed:
    """``sparsegpt_shared`` of the one W [out, in]."""
    return sparsegpt_shared([W], H, opts)[0]
