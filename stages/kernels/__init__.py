"""Triton kernels, each a drop-in for a torch reference in ``stages/solvers``, and the choice between them."""

import os

import torch

from stages.errors import RacError


def resolve_kernel(kernel: str, quantize: bool) -> str:
    """``auto`` is the fused Triton kernel on CUDA when nothing is quantized, and torch otherwise; ``triton``
    needs CUDA or the interpreter."""
    if kernel == "auto":
        return "triton" if torch.cuda.is_available() and not quantize else "torch"
    if kernel == "triton" and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        raise RacError("prune.kernel='triton' needs a CUDA GPU (or TRITON_INTERPRET=1 to test); use auto or torch")
    return kernel
