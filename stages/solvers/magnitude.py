"""Magnitude pruning: the smallest |w| over the whole layer (or per N:M group), with no compensation."""

import torch

from stages.solvers.base import Compressed, Options, check_shapes, layer_loss, n_pruned
from stages.solvers.masks import keep_nm, keep_smallest_pruned, layer_pattern


def magnitude(W: torch.Tensor, H: torch.Tensor, opts: Options) -> Compressed:
    """Zero the smallest |w| (round(sparsity·numel) of the layer, or N per group of M); H only scores the loss."""
    check_shapes(W, H)
    sparsity = opts.sparsity
    nm = layer_pattern(opts.pattern, sparsity, W.shape[1])
    scores = W.abs()  # [out, in]
    M = keep_smallest_pruned(scores, n_pruned(sparsity, W.numel())) if nm is None else keep_nm(scores, *nm)
    weight = torch.where(M, W, torch.zeros_like(W))
    return Compressed(weight, M, layer_loss(W, weight, H), 0.0, None)
