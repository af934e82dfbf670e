"""GPTQ (Frantar et al., 2023): the OBS loop of SparseGPT with every weight kept and rounded to an integer grid."""

import torch

from stages.solvers.base import Compressed, Options
from stages.solvers.sparsegpt import obs


def gptq(W: torch.Tensor, H: torch.Tensor, opts: Options) -> Compressed:
    """Quantize W [out, in] on ``opts.quant``'s grid column by column, each rounding error compensated by the
    columns not yet quantized; it prunes nothing (sparsegpt with ``quant`` prunes and quantizes)."""
    if opts.quant is None:
        raise ValueError("gptq quantizes: it needs quant settings (bits, group_size, symmetric, act_order)")
    if opts.sparsity != 0:
        raise ValueError(f"gptq prunes nothing, but sparsity={opts.sparsity!r}; sparsegpt with quant does both")
    return obs(W, H, opts, 0.0)
