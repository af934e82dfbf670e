"""GPTQ (Frantar et al., 2023): the OBS loop of SparseGPT with every weight kept and rounded to an integer grid."""

import torch

from stages.solvers.base import Compressed, Options
from stages.solvers.sparsegpt import obs


def gptq_shared(Ws: list[torch.Tensor], H: torch.Tensor, opts: Options) -> list[Compressed]:
    """Quantize each W [out_k, in] sharing H on ``opts.quant``'s grid column by column, each rounding error
    compensated by the columns not yet quantized; it prunes nothing (sparsegpt with ``quant`` does both)."""
    if opts.quant is None:
        raise ValueError("gptq quantizes: it needs quant settings (bits, group_size, symmetric, act_order)")
    if opts.sparsity != 0:
        raise ValueError(f"gptq prunes nothing, but sparsity={opts.sparsity!r}; sparsegpt with quant does both")
    return obs(Ws, H, opts, 0.0)


def gptq(W: torch.Tensor, H: torch.Tensor, opts: Options) -> Compressed:
    """``gptq_shared`` of the one W [out, in]."""
    return gptq_shared([W], H, opts)[0]
