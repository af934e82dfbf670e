"""Per-layer sparsity allocation: per-unit statistics in, per-unit targets out, whose mean weighted by each unit's
parameter count is the global sparsity. Pure math, no I/O; OptionErrors name the options.

A unit is what one target applies to (the in-scope linears of one decoder layer); ``sizes`` are their weight
counts. Every method keeps each target within ``spread`` of the global ``sparsity``.
"""

import itertools
import math

import torch

from stages.solvers.base import OptionError, Options, layer_loss
from stages.solvers.wanda import wanda

ALLOCATIONS = ("uniform", "owl", "loss", "decode_shift")
# Targets stay below 1: a layer pruned whole passes nothing on, and params refuse sparsity 1.
MAX_TARGET = 1.0
# Samples of each loss curve across [sparsity − spread, sparsity + spread]: steps of 0.001 at spread 0.1.
STEPS = 200


def weighted_mean(targets: list[float], sizes: list[int]) -> float:
    """Σ n_l·t_l / Σ n_l: the sparsity of the units taken together."""
    return math.fsum(t * n for t, n in zip(targets, sizes, strict=True)) / sum(sizes)


def check_bounds(sparsity: float, spread: float) -> tuple[float, float]:
    """[sparsity − spread, sparsity + spread], which must lie in [0, 1); else an OptionError naming the fix."""
    if spread < 0:
        raise OptionError("{spread} must be >= 0", {"spread": spread})
    lo, hi = sparsity - spread, sparsity + spread
    if lo < 0 or hi >= MAX_TARGET:
        room = min(sparsity, MAX_TARGET - sparsity)
        raise OptionError(
            "{sparsity} with {spread} lets a layer reach {reach:.4g}, outside [0, 1); set the spread below "
            "{room:.4g} or choose another sparsity",
            {"sparsity": sparsity, "spread": spread},
            reach=lo if lo < 0 else hi,
            room=room,
        )
    return lo, hi


def _exact(targets: list[float], sizes: list[int], sparsity: float) -> list[float]:
    """``targets`` with the float residual of their weighted mean moved onto the largest unit, so that the mean is
    ``sparsity`` to the last bit the sums allow."""
    total = sum(sizes)
    k = max(range(len(sizes)), key=lambda i: (sizes[i], -i))
    residual = sparsity * total - math.fsum(t * n for t, n in zip(targets, sizes, strict=True))
    out = list(targets)
    out[k] += residual / sizes[k]
    return out


def from_scores(scores: list[float], sizes: list[int], sparsity: float, spread: float) -> list[float]:
    """Targets t_l = sparsity − c·(s_l − s̄), s̄ the size-weighted mean score and c ≥ 0 the largest step that keeps
    every |t_l − sparsity| ≤ spread: the unit with the highest score keeps most, the weighted mean is
    ``sparsity``. Equal scores (or ``spread`` 0, or ``sparsity`` 0, where no target can go lower) give uniform."""
    if len(scores) != len(sizes) or not scores:
        raise ValueError(f"{len(scores)} scores for {len(sizes)} units; give one score per unit, at least one")
    if not all(math.isfinite(s) for s in scores):
        raise ValueError(f"scores {scores!r} are not all finite")
    if sparsity == 0:
        return [0.0] * len(sizes)
    check_bounds(sparsity, spread)
    mean = math.fsum(s * n for s, n in zip(scores, sizes, strict=True)) / sum(sizes)
    centred = [s - mean for s in scores]
    reach = max(abs(c) for c in centred)
    if reach == 0 or spread == 0:
        return [sparsity] * len(sizes)
    targets = [sparsity - spread * c / reach for c in centred]
    return _exact(targets, sizes, sparsity)


def outlier_ratio(Ws: list[torch.Tensor], diag_Hs: list[torch.Tensor], threshold: float) -> float:
    """OWL's layer outlier ratio (Yin et al., 2024): the fraction of A_ij = |W_ij|·sqrt(H_jj) over the unit's
    linears W [out, in] (diag H [in] each) that exceed ``threshold`` times their mean. sqrt(H_jj) is ‖x_j‖ up to
    one factor per unit, which the ratio to the mean cancels, so diag H stands in for OWL's forward."""
    if threshold <= 0:
        raise OptionError("{outlier_threshold} must be > 0 (OWL uses 5)", {"outlier_threshold": threshold})
    A = torch.cat(
        [
            (W.to(torch.float64).abs() * d.to(torch.float64).clamp(min=0).sqrt()).flatten()  # [out·in]
            for W, d in zip(Ws, diag_Hs, strict=True)
        ]
    )
    return float((threshold * A.mean() < A).double().mean())


def decode_shift(
    Ws: list[torch.Tensor], H_prompts: list[torch.Tensor], H_decodes: list[torch.Tensor], sparsity: float
) -> float:
    """How much a mask chosen on prompt statistics costs on decode statistics: Σ L_d(M_p) / Σ L_d(M_d) − 1 over
    the unit's linears, where M_s is Wanda's mask at ``sparsity`` on H_s [in, in] and L_d(M) = ½·tr(ΔW H_d ΔWᵀ)
    with ΔW = W ⊙ ¬M. 0 when the two segments rank the inputs alike; it grows with what prompt-only calibration
    gets wrong on the decode tokens, in the units of the layer's own loss, so layers compare."""
    opts = Options(sparsity, "unstructured", 128, 0.0, "torch", None)
    cross = own = 0.0
    for W, H_p, H_d in zip(Ws, H_prompts, H_decodes, strict=True):
        on_prompt = wanda(W, H_p, opts).weight  # [out, in]
        cross += layer_loss(W, on_prompt, H_d)
        own += wanda(W, H_d, opts).loss
    if own <= 0:
        return 0.0
    return cross / own - 1


def _lower_hull(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The lower convex hull of (x, y) points sorted by x."""
    hull: list[tuple[float, float]] = []
    for x, y in points:
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            if (y2 - y1) * (x - x1) >= (y - y1) * (x2 - x1):  # hull[-1] lies on or above the chord
                hull.pop()
            else:
                break
        hull.append((x, y))
    return hull


def pchip(grid: list[float], values: list[float], xs: list[float]) -> list[float]:
    """The monotone cubic through (grid, values) (Fritsch and Carlson, 1980) at each x of ``xs`` in
    [grid[0], grid[-1]]: it passes through every point, keeps each interval's monotonicity and has a continuous
    slope, so that an optimum need not sit on a measured sparsity as it would between straight lines."""
    h = [b - a for a, b in itertools.pairwise(grid)]
    delta = [(values[k + 1] - values[k]) / h[k] for k in range(len(h))]
    d = [0.0] * len(grid)  # the slope at each knot
    if len(h) == 1:
        d = [delta[0], delta[0]]
    else:
        for k in range(1, len(grid) - 1):
            if delta[k - 1] * delta[k] > 0:
                w1, w2 = 2 * h[k] + h[k - 1], h[k] + 2 * h[k - 1]
                d[k] = (w1 + w2) / (w1 / delta[k - 1] + w2 / delta[k])
        d[0] = _end_slope(h[0], h[1], delta[0], delta[1])
        d[-1] = _end_slope(h[-1], h[-2], delta[-1], delta[-2])
    out = []
    for x in xs:
        if not grid[0] <= x <= grid[-1]:
            raise ValueError(f"{x!r} lies outside the grid {grid!r}")
        k = min(max(i for i in range(len(h)) if grid[i] <= x), len(h) - 1)
        t = (x - grid[k]) / h[k]
        h00, h10, h01, h11 = 2 * t**3 - 3 * t**2 + 1, t**3 - 2 * t**2 + t, -2 * t**3 + 3 * t**2, t**3 - t**2
        out.append(h00 * values[k] + h10 * h[k] * d[k] + h01 * values[k + 1] + h11 * h[k] * d[k + 1])
    return out


def _end_slope(h0: float, h1: float, delta0: float, delta1: float) -> float:
    """The slope at an end knot: three-point, bounded so the end interval stays monotone."""
    d = ((2 * h0 + h1) * delta0 - h0 * delta1) / (h0 + h1)
    if d * delta0 <= 0:
        return 0.0
    if delta0 * delta1 <= 0 and abs(d) > 3 * abs(delta0):
        return 3 * delta0
    return d


def from_losses(
    grid: list[float], curves: list[list[float]], sizes: list[int], sparsity: float, spread: float
) -> list[float]:
    """Targets minimising Σ_l ℓ_l(t_l) subject to Σ n_l·t_l = sparsity·Σ n_l and |t_l − sparsity| ≤ spread, where
    ℓ_l is unit l's (normalised) loss measured at the sparsities ``grid`` (curves[l][k] at grid[k]), taken as the
    monotone cubic through them (``pchip``) and sampled every (2·spread)/``STEPS``.

    Every unit starts at the lower bound; pruning budget then goes, segment by segment of each sampled curve's
    lower convex hull, to the cheapest loss per pruned weight (slope / n_l) until the mean is met: the optimum
    of the sampled curves when they are convex, of their hulls otherwise."""
    if sorted(set(grid)) != list(grid) or len(grid) < 2:
        raise ValueError(f"loss grid {grid!r} must be at least two increasing sparsities")
    if len(curves) != len(sizes) or not curves or any(len(c) != len(grid) for c in curves):
        raise ValueError(f"{len(curves)} loss curves for {len(sizes)} units; give one per unit, a value per sparsity")
    if not all(math.isfinite(v) for c in curves for v in c):
        raise ValueError("loss curves hold non-finite values; rebuild the loss table")
    if sparsity == 0:
        return [0.0] * len(sizes)
    lo, hi = check_bounds(sparsity, spread)
    if spread == 0:
        return [sparsity] * len(sizes)
    if lo < grid[0] or hi > grid[-1]:
        raise ValueError(
            f"the loss table's sparsities {grid!r} do not cover [{lo:.4g}, {hi:.4g}] (sparsity ± spread); add "
            "sparsities to the table or lower spread"
        )
    segments: list[tuple[float, int, float]] = []  # (loss per pruned weight, unit, sparsity it takes the unit to)
    for unit, (curve, n) in enumerate(zip(curves, sizes, strict=True)):
        xs = [lo + (hi - lo) * k / STEPS for k in range(STEPS + 1)]
        hull = _lower_hull(list(zip(xs, pchip(grid, curve, xs), strict=True)))
        segments += [((y2 - y1) / ((x2 - x1) * n), unit, x2) for (x1, y1), (x2, y2) in itertools.pairwise(hull)]
    targets = [lo] * len(sizes)
    budget = (sparsity - lo) * sum(sizes)  # weights still to prune
    for _, unit, x in sorted(segments):
        if budget <= 0:
            break
        step = min(x - targets[unit], budget / sizes[unit])
        targets[unit] += step
        budget -= step * sizes[unit]
    return _exact(targets, sizes, sparsity)
