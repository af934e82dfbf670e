"""ALPS (Meng et al., 2024): ADMM with a support-driven ρ schedule finds the mask, then masked PCG fits the values.

Everything runs in Jacobi-scaled coordinates: with s = sqrt(diag(H_damped)), B = Ŵ·diag(s) and Hn = H/(s sᵀ)
has a unit diagonal. One ρ then suits every input column whatever its scale, the magnitude projection of B
ranks weights by |w_ij|·||x_j|| (Wanda's score) rather than by |w_ij|, and plain CG on Hn is CG on H with the
diagonal preconditioner diag(H).
"""

from typing import NamedTuple

import torch

from stages.solvers.base import Compressed, Options, check_shapes, layer_loss, n_pruned
from stages.solvers.hessian import damped
from stages.solvers.masks import keep_nm, keep_smallest_pruned, layer_pattern

# ρ relative to the unit diagonal of Hn. Small, so that the first iterates follow the loss rather than the
# magnitude start: 0.001 to 0.01 agreed within 1% on the layers tried, the reference code's 0.1 cost up to 15%.
RHO0 = 0.01
# (fraction of the pruned count whose membership changed since the last iteration, factor for ρ), first match
# wins, as in the paper: the more the support still moves, the harder ρ pushes B and D together, so ADMM
# cannot oscillate forever. The paper applies it every 3 iterations; every iteration (3× faster growth) cut
# the loss by up to 17% on layers whose input scales span decades, cost at most 3% elsewhere, in 3× fewer steps.
RHO_STEPS = ((0.1, 1.3), (0.005, 1.2), (0.0, 1.1))
# Once the support holds still, only B ≈ D is left to reach: ρ grows at the top rate until it is.
RHO_STABLE = 1.3
# B ≈ D when ||B − D||_F ≤ GAP_TOL·||W·diag(s)||_F; the PCG polish then fits the values on the support anyway.
GAP_TOL = 1e-2
# A cap that correlated layers never approach (they stop after 10-30 iterations); it bounds pathological H.
MAX_ITERS = 300
# Masked PCG iterations on the final support: each costs about one ADMM iteration; the paper uses 10, and 20
# came within 0.03% of 200 on a 512×512 layer.
PCG_ITERS = 20


class Scaled(NamedTuple):
    """The damped problem in Jacobi-scaled coordinates, in float32 unless W or H is float64."""

    Wn: torch.Tensor  # [out, in] W·diag(s), zero at dead inputs
    Hn: torch.Tensor  # [in, in] the damped H / (s sᵀ), unit diagonal, PSD
    L: torch.Tensor  # [in] eigenvalues of Hn
    Q: torch.Tensor  # [in, in] its eigenvectors: Hn = Q diag(L) Qᵀ
    s: torch.Tensor  # [in] sqrt(diag(H_damped)), 1 where that is not positive


class Admm(NamedTuple):
    """The support ADMM settled on."""

    mask: torch.Tensor  # [out, in] bool, True where kept
    D: torch.Tensor  # [out, in] the last sparse iterate, zero off ``mask``
    iterations: int
    rho: float  # ρ at the last iteration


def alps(W: torch.Tensor, H: torch.Tensor, opts: Options) -> Compressed:
    """Prune W [out, in] to ``opts.sparsity`` by ADMM on ||WX − ŴX||², then a masked PCG polish."""
    check_shapes(W, H)
    nm = layer_pattern(opts.pattern, opts.sparsity, W.shape[1])
    Wn, Hn, L, Q, s = jacobi_scaled(W, H, opts.damp)
    k = n_pruned(opts.sparsity, W.numel())
    start = _project(Wn, k, nm)  # [out, in] magnitude of Wn: Wanda's score, chosen over the layer or per group
    admm = admm_support(Wn, Hn, L, Q, start, k, nm)
    # ADMM on an ℓ0 set is not monotone and can end on a worse support than it started from: up to 2% worse on
    # H = I, where the start is optimal, and 10-30% when input scales span decades at 50% unstructured, where
    # the start (≈ Wanda's mask) nearly decides. Both supports are polished and the better kept.
    fits = []
    for mask, B0 in ((admm.mask, admm.D), (start, Wn * start)):
        weight = (masked_pcg(Wn, Hn, mask, B0, PCG_ITERS) / s).to(W.dtype)  # [out, in]
        fits.append(Compressed(weight, mask, layer_loss(W, weight, H), opts.damp, None))
    return min(fits, key=lambda p: p.loss)


def jacobi_scaled(W: torch.Tensor, H: torch.Tensor, damp: float) -> Scaled:
    """The problem in coordinates B = Ŵ·diag(s), s = sqrt(diag(H_damped)), where Hn has a unit diagonal."""
    dtype = torch.float64 if torch.float64 in (W.dtype, H.dtype) else torch.float32
    Hd, dead = damped(H.to(torch.float64), damp)  # [in, in], [in]
    s = torch.diag(Hd).clamp(min=0).sqrt()  # [in]
    s[s == 0] = 1  # a non-positive diagonal (an indefinite H) is left unscaled rather than turned into NaNs
    Hn = Hd / s.unsqueeze(0) / s.unsqueeze(1)  # [in, in], unit diagonal
    L, Q = torch.linalg.eigh(Hn)  # [in], [in, in]
    # H is PSD up to rounding; clipping the rounding keeps Hn + ρI invertible for every ρ > 0.
    L = L.clamp(min=0)
    Hn = (Q * L) @ Q.T
    Wn = W.to(torch.float64) * s  # [out, in]
    Wn[:, dead] = 0
    return Scaled(*(t.to(dtype) for t in (Wn, Hn, L, Q, s)))


def _project(Z: torch.Tensor, k: int, nm: tuple[int, int] | None) -> torch.Tensor:
    """Support of the nearest sparse matrix to Z: its largest |z| over the layer, or per N:M group."""
    return keep_smallest_pruned(Z.abs(), k) if nm is None else keep_nm(Z.abs(), *nm)


def admm_support(
    Wn: torch.Tensor,
    Hn: torch.Tensor,
    L: torch.Tensor,
    Q: torch.Tensor,
    start: torch.Tensor,
    k: int,
    nm: tuple[int, int] | None,
) -> Admm:
    """ADMM on min ½tr((Wn−B) Hn (Wn−B)ᵀ) s.t. B = D, D sparse (k pruned, or N:M), with Hn = Q diag(L) Qᵀ.

    Scaled dual U: B ← (Wn Hn + ρ(D − U))(Hn + ρI)⁻¹, D ← the projection of B + U, U ← U + B − D.
    """
    G = Wn @ Hn  # [out, in]
    # The start matters little: with a small ρ0 the first iterates follow the loss, and starting from the
    # SparseGPT solution instead changed the final loss by under 1% on every layer tried.
    mask = start
    D = Wn * mask
    U = torch.zeros_like(Wn)
    rho = RHO0
    # The eigendecomposition makes each new ρ one [in, in] product instead of a new factorisation.
    P = (Q / (L + rho)) @ Q.T  # [in, in] (Hn + ρI)⁻¹
    target = GAP_TOL * float(torch.linalg.norm(Wn))
    previous = mask
    iterations = 0
    while iterations < MAX_ITERS:
        iterations += 1
        B = (G + rho * (D - U)) @ P
        Z = B + U
        mask = _project(Z, k, nm)
        D = Z * mask
        U += B - D
        changed = int((mask != previous).sum()) / max(k, 1)
        previous = mask
        if changed == 0 and float(torch.linalg.norm(B - D)) <= target:
            break
        factor = RHO_STABLE if changed == 0 else next(f for t, f in RHO_STEPS if changed > t)
        rho *= factor
        U /= factor  # the scaled dual is Λ/ρ, so it shrinks as ρ grows
        P = (Q / (L + rho)) @ Q.T
    return Admm(mask, D, iterations, rho)


def masked_pcg(Wn: torch.Tensor, Hn: torch.Tensor, mask: torch.Tensor, B0: torch.Tensor, iters: int) -> torch.Tensor:
    """Minimise ½tr((Wn−B) Hn (Wn−B)ᵀ) over B zero off ``mask``, by CG per row from B0 (zero off mask)."""
    m = mask.to(Wn.dtype)  # [out, in]
    B = B0 * m
    R = (Wn - B) @ Hn * m  # [out, in] negative gradient on the support
    P = R.clone()
    rr = (R * R).sum(1)  # [out]
    for _ in range(iters):
        HP = P @ Hn * m
        pHp = (P * HP).sum(1)
        # A row already solved has P = 0; it takes a zero step instead of 0/0.
        alpha = torch.where(pHp > 0, rr / pHp, 0.0)
        B += alpha.unsqueeze(1) * P
        R -= alpha.unsqueeze(1) * HP
        rr_next = (R * R).sum(1)
        beta = torch.where(rr > 0, rr_next / rr, 0.0)
        rr = rr_next
        P = R + beta.unsqueeze(1) * P
    return B
