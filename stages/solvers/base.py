"""What every solver returns, the loss it reports, and the exact counts of weights it prunes."""

from typing import NamedTuple

import torch


class Pruned(NamedTuple):
    """A pruned layer: Ŵ is zero wherever ``mask`` is False."""

    weight: torch.Tensor  # [out, in] Ŵ, in W's dtype
    mask: torch.Tensor  # [out, in] bool, True where the weight is kept (it may still be 0, e.g. a dead input)
    loss: float  # layer_loss(W, Ŵ, H) with the undamped H
    damp_used: float  # fraction of mean(diag(H)) added before inversion; 0.0 if H was never inverted


def layer_loss(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """½·tr((W−Ŵ) H (W−Ŵ)ᵀ) in float64: ||(W−Ŵ)X||²_F / n, the mean per-token error, when H = 2XXᵀ/n."""
    delta = W.to(torch.float64) - W_hat.to(torch.float64)  # [out, in]
    return 0.5 * float(((delta @ H.to(torch.float64)) * delta).sum())


def n_pruned(sparsity: float, numel: int) -> int:
    """How many of ``numel`` weights to prune at ``sparsity``: round(sparsity·numel)."""
    if not 0 <= sparsity <= 1:
        raise ValueError(f"sparsity={sparsity!r} is outside [0, 1]; pass a fraction such as 0.5")
    return round(sparsity * numel)


def block_counts(sparsity: float, rows: int, columns: int, block_size: int) -> list[int]:
    """Per-column-block prune counts whose sum is exactly n_pruned(sparsity, rows·columns)."""
    if block_size <= 0:
        raise ValueError(f"block_size={block_size!r} must be > 0")
    # Differences of cumulative targets telescope, so rounding never drifts across blocks.
    return [
        n_pruned(sparsity, rows * min(c0 + block_size, columns)) - n_pruned(sparsity, rows * c0)
        for c0 in range(0, columns, block_size)
    ]
