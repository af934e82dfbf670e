"""Pure-math compression solvers: tensors and ``Options`` in, a ``Compressed`` tuple out; no I/O, logging or device
moves. They raise ``OptionError``s that carry the options they name; the stages name those by params.yaml keys."""

from typing import Protocol

import torch

from stages.solvers.alps import alps
from stages.solvers.base import QUANT_BITS, Compressed, OptionError, Options, Quantized, QuantSpec
from stages.solvers.gptq import check_gptq, gptq, gptq_shared
from stages.solvers.hessian import Prepared, hessian_from_sums, mixed_count, prepare_hessian
from stages.solvers.magnitude import magnitude
from stages.solvers.masks import parse_pattern
from stages.solvers.sparsegpt import KERNELS, check_obs, sparsegpt, sparsegpt_shared
from stages.solvers.wanda import wanda


class Solver(Protocol):
    """Compress W [out, in] given H [in, in] as ``opts`` asks; never mutates its inputs."""

    def __call__(self, W: torch.Tensor, H: torch.Tensor, opts: Options) -> Compressed: ...


class SharedSolver(Protocol):
    """Compress each W [out_k, in] of a group that shares H [in, in], as the solver would one by one."""

    def __call__(self, Ws: list[torch.Tensor], H: torch.Tensor, opts: Options) -> list[Compressed]: ...


SOLVERS: dict[str, Solver] = {
    "alps": alps,
    "gptq": gptq,
    "magnitude": magnitude,
    "sparsegpt": sparsegpt,
    "wanda": wanda,
}
# The OBS solvers factor H once for a whole group (q, k, v; gate, up) and walk its stacked rows in one loop.
SHARED: dict[str, SharedSolver] = {"gptq": gptq_shared, "sparsegpt": sparsegpt_shared}
# The OBS solvers round each weight while later columns can still compensate; the others only choose masks.
QUANTIZERS = ("gptq", "sparsegpt")
# Each solver's own rules on its options, where it has any beyond these.
CHECKS = {"gptq": check_gptq, "sparsegpt": check_obs}


def check_solver(name: str, opts: Options) -> None:
    """``name`` is a solver that can honour ``opts``: the one home of the compatibility rules, which the stages
    check before any model is read."""
    if name not in SOLVERS:
        raise OptionError("{pruner} is unknown; choose one of {choices}", {"pruner": name}, choices=sorted(SOLVERS))
    if opts.quant is not None and name not in QUANTIZERS:
        raise OptionError(
            "{pruner} does not quantize, but {bits}; quantize with one of {choices}, or set the bits to null",
            {"pruner": name, "bits": opts.quant.bits},
            choices=list(QUANTIZERS),
        )
    if name in CHECKS:
        CHECKS[name](opts)


def solve(name: str, W: torch.Tensor, H: torch.Tensor, opts: Options) -> Compressed:
    """The solver registered as ``name`` applied to W [out, in], H [in, in]."""
    check_solver(name, opts)
    return SOLVERS[name](W, H, opts)


def solve_group(name: str, Ws: list[torch.Tensor], H: torch.Tensor, opts: Options) -> list[Compressed]:
    """The solver ``name`` on each W [out_k, in] of a group sharing H [in, in]: in one pass where it has a shared
    form (``SHARED``), member by member otherwise."""
    check_solver(name, opts)
    if name in SHARED:
        return SHARED[name](Ws, H, opts)
    return [SOLVERS[name](W, H, opts) for W in Ws]


__all__ = [
    "KERNELS",
    "QUANTIZERS",
    "QUANT_BITS",
    "SHARED",
    "SOLVERS",
    "Compressed",
    "OptionError",
    "Options",
    "Prepared",
    "QuantSpec",
    "Quantized",
    "SharedSolver",
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
    "solve_group",
    "sparsegpt",
    "wanda",
]
