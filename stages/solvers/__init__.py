"""Pure-math pruning solvers: tensors in, a Pruned tuple out; no I/O, logging or device moves."""

from typing import Protocol

import torch

from stages.errors import RacError
from stages.solvers.alps import alps
from stages.solvers.base import Pruned
from stages.solvers.hessian import Prepared, hessian_from_sums, mixed_count, prepare_hessian
from stages.solvers.magnitude import magnitude
from stages.solvers.masks import parse_pattern
from stages.solvers.sparsegpt import KERNELS, sparsegpt
from stages.solvers.wanda import wanda


class Solver(Protocol):
    """Prune W [out, in] given H [in, in] to ``sparsity`` in ``pattern`` ("unstructured" or "N:M"); never mutates.

    ``kernel`` ("torch" or "triton") picks the implementation of a sequential inner loop where a solver has one.
    """

    def __call__(
        self,
        W: torch.Tensor,
        H: torch.Tensor,
        *,
        sparsity: float,
        pattern: str,
        block_size: int,
        damp: float,
        kernel: str,
    ) -> Pruned: ...


SOLVERS: dict[str, Solver] = {"alps": alps, "magnitude": magnitude, "sparsegpt": sparsegpt, "wanda": wanda}


def get_solver(name: str) -> Solver:
    """The solver registered as ``name``."""
    if name not in SOLVERS:
        raise RacError(f"pruner={name!r} is unknown; choose one of {sorted(SOLVERS)}")
    return SOLVERS[name]


__all__ = [
    "KERNELS",
    "SOLVERS",
    "Prepared",
    "Pruned",
    "Solver",
    "alps",
    "get_solver",
    "hessian_from_sums",
    "magnitude",
    "mixed_count",
    "parse_pattern",
    "prepare_hessian",
    "sparsegpt",
    "wanda",
]
