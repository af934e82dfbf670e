"""Wanda (Sun et al., 2024): prune the smallest |w|·||x_j|| of each output row, with no weight update."""

import torch

from stages.solvers.base import Compressed, Options, check_shapes, layer_loss
from stages.solvers.masks import keep_nm, keep_smallest_per_row, layer_pattern, row_counts


def wanda(W: torch.Tensor, H: torch.Tensor, opts: Options) -> Compressed:
    """Zero the smallest |w_ij|·sqrt(H_jj) per row (or N per group of M); only diag(H) chooses the mask."""
    check_shapes(W, H)
    out, in_ = W.shape
    sparsity = opts.sparsity
    nm = layer_pattern(opts.pattern, sparsity, in_)
    # H = mean of 2xxᵀ, so sqrt(H_jj) = sqrt(2)·||x_j||/sqrt(n): a common factor that never changes a ranking.
    norms = torch.diag(H).to(torch.float64).clamp(min=0).sqrt()  # [in]
    scores = W.to(torch.float64).abs() * norms  # [out, in]
    # Per-row counts sum to exactly round(sparsity·numel), the count every other unstructured solver prunes.
    M = keep_smallest_per_row(scores, row_counts(sparsity, out, in_)) if nm is None else keep_nm(scores, *nm)
    weight = torch.where(M, W, torch.zeros_like(W))
    return Compressed(weight, M, layer_loss(W, weight, H), 0.0, None)
