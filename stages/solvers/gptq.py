"""GPTQ (Frantar et al., 2023): the OBS loop of SparseGPT with every weight kept and rounded to an integer grid."""

import torch

from stages.solvers.base import QUANT_BITS, Compressed, OptionError, Options
from stages.solvers.sparsegpt import check_obs, obs


def check_gptq(opts: Options) -> None:
    """GPTQ's rules: it needs a grid and prunes nothing (on top of the OBS loop's own)."""
    if opts.quant is None:
        raise OptionError(
            "gptq quantizes, so it needs a grid: {bits} must be one of {choices}", {"bits": None}, choices=QUANT_BITS
        )
    if opts.sparsity != 0:
        raise OptionError(
            "gptq prunes nothing, but {sparsity}; set it to 0, or prune and quantize in one pass with sparsegpt",
            {"sparsity": opts.sparsity},
        )
    check_obs(opts)


def gptq_shared(Ws: list[torch.Tensor], H: torch.Tensor, opts: Options) -> list[Compressed]:
    """Quantize each W [out_k, in] sharing H on ``opts.quant``'s grid column by column, each rounding error
    compensated by the columns not yet quantized; it prunes nothing (sparsegpt with ``quant`` does both)."""
    check_gptq(opts)
    return obs(Ws, H, opts, 0.0)


def gptq(W: torch.Tensor, H: torch.Tensor, opts: Options) -> Compressed:
    """``gptq_shared`` of the one W [out, in]."""
    return gptq_shared([W], H, opts)[0]
