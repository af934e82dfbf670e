"""Hessian preparation: the weighted mixture of cached sums, damping, and the inverse Cholesky factor."""

from typing import NamedTuple

import torch

from stages.solvers.base import OptionError

# Each escalation multiplies the damping by 10, so 6 of them reach 10⁶ × the requested fraction.
MAX_ESCALATIONS = 6


class Prepared(NamedTuple):
    """A damped Hessian ready for OBS updates."""

    Hinv_chol: torch.Tensor  # [in, in] upper Cholesky factor of (H + λI)⁻¹
    dead: torch.Tensor  # [in] bool, True where diag(H) == 0 (an input that is always zero)
    damp_used: float  # the fraction of mean(diag(H)) actually added
    escalations: int  # how many times the damping was multiplied by 10


def mixed_count(counts: dict[str, int], mix: dict[str, float]) -> float:
    """Σ_s mix[s]·counts[s], the weighted number of tokens behind H; it must be positive."""
    missing = sorted(s for s in mix if s not in counts)
    if missing:
        raise OptionError(
            "{mix} names segments {missing} absent from the counts {have}",
            {"mix": mix},
            missing=missing,
            have=sorted(counts),
        )
    n = sum(mix[s] * counts[s] for s in mix)
    if not n > 0:
        raise OptionError(
            "{mix} with counts {counts} weighs 0 tokens; give weight to a segment with tokens",
            {"mix": mix},
            counts=counts,
        )
    return n


def hessian_from_sums(xtx: dict[str, torch.Tensor], counts: dict[str, int], mix: dict[str, float]) -> torch.Tensor:
    """H = 2·Σ_s mix[s]·xtx[s] / Σ_s mix[s]·counts[s]: the mean of 2·x·xᵀ over a weighted mix of segments. A
    segment of no tokens adds nothing, so ``xtx`` may lack it."""
    n = mixed_count(counts, mix)
    used = [s for s in mix if counts[s] > 0 and mix[s] > 0]
    missing = sorted(s for s in used if s not in xtx)
    if missing:
        raise OptionError(
            "{mix} names segments {missing} with tokens but absent from the sums {have}",
            {"mix": mix},
            missing=missing,
            have=sorted(xtx),
        )
    dtype = torch.float64 if any(xtx[s].dtype == torch.float64 for s in used) else torch.float32
    H = torch.zeros_like(xtx[used[0]], dtype=dtype)  # [in, in]
    for s in used:
        H += mix[s] * xtx[s].to(dtype)
    return H.mul_(2.0 / n)


def damped(H: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(H + damp·mean(diag H)·I [in, in], dead [in]): the one damping of every solver, on a copy of H.

    A dead input (H_jj == 0, always zero) never reaches the output, so it first gets unit curvature, which
    keeps H invertible and its weight at 0."""
    H = H.clone()
    dead = torch.diag(H) == 0  # [in]
    H[dead, dead] = 1
    H.diagonal().add_(damp * torch.mean(torch.diag(H)))
    return H, dead


def prepare_hessian(H: torch.Tensor, damp: float) -> Prepared:
    """Damp H (escalating ×10 until Cholesky succeeds) and return the upper Cholesky factor of its inverse.

    One factorisation gives it: with J the reversal permutation and J·H·J = L·Lᵀ (L lower), H⁻¹ = UᵀU for the
    upper-triangular U = J·L⁻¹·J, so no inverse is formed and factored again."""
    dtype = torch.float64 if H.dtype == torch.float64 else torch.float32
    H = H.to(dtype)  # [in, in]
    eye = torch.eye(H.shape[0], dtype=dtype, device=H.device)
    damp_used = damp
    for escalations in range(MAX_ESCALATIONS + 1):
        Hd, dead = damped(H, damp_used)
        L, info = torch.linalg.cholesky_ex(Hd.flip(0, 1))  # [in, in] lower factor of J·H·J
        if info == 0:
            U = torch.linalg.solve_triangular(L, eye, upper=False).flip(0, 1)  # [in, in] J·L⁻¹·J
            if torch.isfinite(U).all():
                return Prepared(U, dead, damp_used, escalations)
        if escalations < MAX_ESCALATIONS:
            damp_used *= 10
    raise OptionError(
        "Cholesky of H failed even at damp={used!r} (after {n} ×10 escalations from {damp}); H is far from "
        "positive definite or not finite",
        {"damp": damp},
        used=damp_used,
        n=MAX_ESCALATIONS,
    )
