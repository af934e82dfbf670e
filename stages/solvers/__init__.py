"""Pure-math compression solvers: tensors and ``Options`` in, a ``Compressed`` tuple out; no I/O, logging or device
moves. They raise plain ValueErrors naming their options; the stages phrase them in params.yaml keys."""

from typing import Protocol

import torch

from stages.solvers.alps import alps
from stages.solvers.base import QUANT_BITS, Compressed, Options, Quantized, QuantSpec
from stages.solvers.gptq import gptq
from stages.solvers.hessian import Prepared, hessian_from_sums, mixed_count, prepare_hessian
from stages.solvers.magnitude import magnitude
from stages.solvers.masks import parse_pattern
from stages.solvers.sparsegpt import KERNELS, sparsegpt
from stages.solvers.wanda import wanda


class Solver(Protocol):
    """Compress W [out, in] given H [in, in] as ``opts`` asks; never mutates its inputs."""

    def __call__(self, W: torch.Tensor, H: torch.Tensor, opts: Options) -> Compressed: ...


SOLVERS: dict[str, Solver] = {
    "alps": alps,
    "gptq": gptq,
    "magnitude": magnitude,
    "sparsegpt": sparsegpt,
    "wanda": wanda,
}
# The OBS solvers round each weight while later columns can still compensate; the others only choose masks.
QUANTIZERS = ("gptq", "sparsegpt")


def check_solver(name: str, opts: Options) -> None:
    """``name`` is a solver, and one that can honour ``opts.quant``."""
    if name not in SOLVERS:
        raise ValueError(f"pruner={name!r} is unknown; choose one of {sorted(SOLVERS)}")
    if opts.quant is not None and name not in QUANTIZERS:
        raise ValueError(f"pruner={name!r} does not quantize; quantize with one of {list(QUANTIZERS)}")


def solve(name: str, W: torch.Tensor, H: torch.Tensor, opts: Options) -> Compressed:
    """The solver registered as ``name`` applied to W [out, in], H [in, in]."""
    check_solver(name, opts)
    return SOLVERS[name](W, H, opts)


__all__ = [
    "KERNELS",
    "QUANTIZERS",
    "QUANT_BITS",
    "SOLVERS",
    "Compressed",
    "Options",
    "Prepared",
    "QuantSpec",
    "Quantized",
    "Solver",
    "alps",
    "check_solver",
    "gptq",
    "hessian_from_sums",
    "magnitude",
    "mixed_count",
    "parse_pattern",
    "prepare_hessian",
    "solve",
    "sparsegpt",
    "wanda",
]
