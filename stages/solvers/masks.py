"""Sparsity patterns and the masks that realise them: global, per-row and N:M, ties always to the lower index."""

import math
import re

import torch

from stages.solvers.base import OptionError, n_pruned

# Sparsity is a float typed by hand (`-S sparsity=0.5`), so N/M only has to match to this absolute tolerance.
SPARSITY_ATOL = 1e-6


def parse_pattern(pattern: str, sparsity: float) -> tuple[int, int] | None:
    """(N, M) for an "N:M" pattern (N pruned in every M consecutive inputs), None for "unstructured"."""
    if not isinstance(pattern, str):
        # Unquoted in YAML 1.1, 2:4 is the base-60 integer 124.
        raise OptionError("{pattern} is not a string; quote it, e.g. pattern: '2:4'", {"pattern": pattern})
    if pattern == "unstructured":
        return None
    match = re.fullmatch(r"(\d+):(\d+)", pattern)
    if match is None:
        raise OptionError(
            "{pattern} is neither 'unstructured' nor 'N:M' with integers; use e.g. '2:4'", {"pattern": pattern}
        )
    n, m = int(match[1]), int(match[2])
    if n < 1:
        raise OptionError(
            "{pattern} prunes N={n} per group; N must be at least 1, e.g. '2:4'", {"pattern": pattern}, n=n
        )
    if m < 2:
        raise OptionError("{pattern} has groups of M={m}; M must be at least 2, e.g. '2:4'", {"pattern": pattern}, m=m)
    if n >= m:
        raise OptionError(
            "{pattern} prunes N={n} of every M={m}; N must be below M, e.g. '2:4'", {"pattern": pattern}, n=n, m=m
        )
    if not math.isclose(sparsity, n / m, rel_tol=0, abs_tol=SPARSITY_ATOL):
        raise OptionError(
            "{sparsity} contradicts {pattern} (which prunes {nm!r}); set sparsity to {nm!r}",
            {"sparsity": sparsity, "pattern": pattern},
            nm=n / m,
        )
    return n, m


def layer_pattern(pattern: str, sparsity: float, in_features: int) -> tuple[int, int] | None:
    """parse_pattern, and check that the layer's inputs split into whole groups of M."""
    nm = parse_pattern(pattern, sparsity)
    if nm is not None and in_features % nm[1] != 0:
        raise OptionError(
            "{pattern} needs in_features divisible by {m}, but this layer has {n}; use 'unstructured' or a pattern "
            "whose M divides {n}",
            {"pattern": pattern},
            m=nm[1],
            n=in_features,
        )
    return nm


def keep_smallest_pruned(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask like ``scores``, False at its ``k`` smallest entries; ties go to the lower flat index."""
    flat = scores.flatten()
    mask = torch.ones_like(flat, dtype=torch.bool)
    if k == 0:
        return mask.reshape(scores.shape)
    # A selection, not a sort: ALPS projects the whole layer every iteration, and argsort cost 5× more.
    threshold = torch.kthvalue(flat, k).values
    below = flat < threshold
    mask[below] = False
    # The same result as a stable argsort: ties at the threshold go in index order.
    mask[torch.nonzero(flat == threshold).flatten()[: k - int(below.sum())]] = False
    return mask.reshape(scores.shape)


def row_counts(sparsity: float, rows: int, columns: int) -> torch.Tensor:
    """[rows] per-row prune counts summing to round(sparsity·rows·columns); the first rows take the remainder."""
    base, extra = divmod(n_pruned(sparsity, rows * columns), rows)
    return base + (torch.arange(rows) < extra).long()


def keep_smallest_per_row(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Bool mask like ``scores`` [rows, columns], False at the ``counts[r]`` smallest of each row r."""
    order = torch.argsort(scores, dim=1, stable=True)  # [rows, columns] column indices, smallest first
    ranks = torch.arange(scores.shape[1], device=scores.device).expand_as(order)
    pruned_in_order = ranks < counts.to(scores.device).unsqueeze(1)  # [rows, columns]
    return ~torch.zeros_like(pruned_in_order).scatter(1, order, pruned_in_order)


def keep_nm(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Bool mask like ``scores`` [rows, columns], False at the n smallest of every m consecutive columns of a row."""
    rows, columns = scores.shape
    groups = scores.reshape(rows * columns // m, m)  # [rows·columns/m, m]: each row of this view is one group
    return keep_smallest_per_row(groups, torch.full((groups.shape[0],), n)).reshape(rows, columns)
