"""Pure-math pruning solvers: tensors in, a Pruned tuple out; no I/O, logging or device moves."""

from typing import Protocol

import torch

from stages.errors import RacError
from stages.solvers.base import Pruned
from stages.solvers.hessian import Prepared, hessian_from_sums, prepare_hessian
from stages.solvers.magnitude import magnitude
from stages.solvers.sparsegpt import sparsegpt


class Solver(Protocol):
    """Prune W [out, in] given H [in, in]; never mutates either."""

    def __call__(
        self, W: torch.Tensor, H: torch.Tensor, *, sparsity: float, block_size: int, damp: float
    ) -> Pruned: ...


SOLVERS: dict[str, Solver] = {"sparsegpt": sparsegpt, "magnitude": magnitude}


def get_solver(name: str) -> Solver:
    """The solver registered as ``name``."""
    if name not in SOLVERS:
        raise RacError(f"pruner={name!r} is unknown; choose one of {sorted(SOLVERS)}")
    return SOLVERS[name]


__all__ = [
    "SOLVERS",
    "Prepared",
    "Pruned",
    "Solver",
    "get_solver",
    "hessian_from_sums",
    "magnitude",
    "prepare_hessian",
    "sparsegpt",
]
