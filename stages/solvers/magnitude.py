"""Magnitude pruning: the smallest |w| over the whole layer (or per N:M group), with no compensation."""

import torch

from stages.solvers.base import Pruned, layer_loss, n_pruned
from stages.solvers.masks import keep_nm, keep_smallest_pruned, layer_pattern


def magnitude(
    W: torch.Tensor, H: torch.Tensor, *, sparsity: float, pattern: str, block_size: int, damp: float, kernel: str
) -> Pruned:
    """Zero the smallest |w| (round(sparsity·numel) of the layer, or N per group of M); H only scores the loss.

    block_size, damp and kernel are accepted for the common signature and unused.
    """
    nm = layer_pattern(pattern, sparsity, W.shape[1])
    scores = W.abs()  # [out, in]
    M = keep_smallest_pruned(scores, n_pruned(sparsity, W.numel())) if nm is None else keep_nm(scores, *nm)
    weight = torch.where(M, W, torch.zeros_like(W))
    return Pruned(weight, M, layer_loss(W, weight, H), 0.0)
