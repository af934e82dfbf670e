"""Magnitude pruning: the smallest |w| over the whole layer, with no compensation."""

import torch

from stages.solvers.base import Pruned, keep_smallest_pruned, layer_loss, n_pruned


def magnitude(W: torch.Tensor, H: torch.Tensor, *, sparsity: float, block_size: int, damp: float) -> Pruned:
    """Zero the round(sparsity·numel) smallest |w|; H only scores the loss; block_size, damp are unused."""
    M = keep_smallest_pruned(W.abs(), n_pruned(sparsity, W.numel()))  # [out, in]
    weight = torch.where(M, W, torch.zeros_like(W))
    return Pruned(weight, M, layer_loss(W, weight, H), 0.0)
