"""Solvers on tiny tensors: exact counts and N:M patterns, the reported loss, each solver against its reference."""

import re
import sys

import pytest
import torch

from stages.solvers import (
    SOLVERS,
    Options,
    alps,
    check_solver,
    hessian_from_sums,
    magnitude,
    parse_pattern,
    prepare_hessian,
    solve_group,
    sparsegpt,
    wanda,
)
from stages.solvers.base import block_counts, layer_loss
from stages.solvers.hessian import MAX_ESCALATIONS
from stages.solvers.masks import keep_nm, keep_smallest_per_row, keep_smallest_pruned, row_counts

# The package re-exports the function `alps`, which shadows its module as an attribute.
alps_module = sys.modules["stages.solvers.alps"]

# in = 40 with block_size 16 gives blocks of 16, 16 and 8 columns; 40 splits into groups of 4 and of 8.
OUT, IN, N, BLOCK, DAMP = 16, 40, 400, 16, 0.01
UNSTRUCTURED = "unstructured"
# The solvers that prune (gptq only quantizes: tests/test_quant.py).
PRUNERS = sorted(set(SOLVERS) - {"gptq"})


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _correlated_X(seed: int, in_: int = IN, n: int = N) -> torch.Tensor:
    """[in, n] activations with strongly correlated features: rank-8 signal plus small noise."""
    g = _gen(seed)
    A = torch.randn(in_, 8, generator=g, dtype=torch.float64)
    return A @ torch.randn(8, n, generator=g, dtype=torch.float64) + 0.3 * torch.randn(
        in_, n, generator=g, dtype=torch.float64
    )


def _H(X: torch.Tensor) -> torch.Tensor:
    return 2 * X @ X.T / X.shape[1]


def _W(seed: int, out: int = OUT, in_: int = IN, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(out, in_, generator=_gen(seed), dtype=dtype)


@pytest.mark.parametrize("name", PRUNERS)
@pytest.mark.parametrize("shape", [(16, 40), (7, 13), (5, 16)])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.77, 1.0])
def test_exact_sparsity(name: str, shape: tuple[int, int], sparsity: float) -> None:
    out, in_ = shape
    W = _W(1, out, in_)
    H = _H(_correlated_X(2, in_, 3 * in_))
    pruned = SOLVERS[name](W, H, Options(sparsity, UNSTRUCTURED, 6, DAMP, "torch", None))
    assert pruned.mask.dtype == torch.bool and pruned.mask.shape == W.shape
    assert int((~pruned.mask).sum()) == round(sparsity * W.numel())
    assert bool((pruned.weight[~pruned.mask] == 0).all())
    assert torch.isfinite(pruned.weight).all()


def test_block_counts_sum_exactly() -> None:
    for sparsity in (0.1, 0.5, 0.55, 0.9):
        counts = block_counts(sparsity, 7, 41, 16)
        assert len(counts) == 3 and sum(counts) == round(sparsity * 7 * 41)
        assert all(0 <= c <= 7 * w for c, w in zip(counts, (16, 16, 9), strict=True))


@pytest.mark.parametrize("name", PRUNERS)
@pytest.mark.parametrize("pattern", [UNSTRUCTURED, "2:4"])
def test_loss_is_mean_token_reconstruction_error(name: str, pattern: str) -> None:
    X = _correlated_X(3)
    W = _W(4)
    pruned = SOLVERS[name](W, _H(X), Options(0.5, pattern, BLOCK, DAMP, "torch", None))
    direct = float(((W - pruned.weight) @ X).pow(2).sum()) / N
    # Both sides are float64 sums of ~10⁴ terms that differ only in summation order: error ~1e-13.
    assert pruned.loss == pytest.approx(direct, rel=1e-10)
    assert pruned.loss > 0


def test_loss_float32() -> None:
    X = _correlated_X(3)
    W = _W(4, dtype=torch.float32)
    pruned = sparsegpt(W, _H(X).float(), Options(0.5, UNSTRUCTURED, BLOCK, DAMP, "torch", None))
    direct = float(((W.double() - pruned.weight.double()) @ X).pow(2).sum()) / N
    # float32 throughout but for the final sum: H rounded to float32 and the float32 product (rel ~1e-6).
    assert pruned.loss == pytest.approx(direct, rel=1e-5)


def test_identity_hessian_is_per_block_magnitude() -> None:
    W = _W(5)
    pruned = sparsegpt(W, torch.eye(IN, dtype=torch.float64), Options(0.6, UNSTRUCTURED, BLOCK, DAMP, "torch", None))
    # Reference: per-block magnitude with the same per-block counts and no compensation, since a diagonal
    # Hinv makes every OBS update to other columns zero.
    M = torch.ones_like(W, dtype=torch.bool)
    for c0, k in zip(range(0, IN, BLOCK), block_counts(0.6, OUT, IN, BLOCK), strict=True):
        block = W[:, c0 : c0 + BLOCK]
        smallest = torch.argsort(block.abs().flatten())[:k]
        keep = torch.ones(block.numel(), dtype=torch.bool)
        keep[smallest] = False
        M[:, c0 : c0 + BLOCK] = keep.reshape(block.shape)
    assert torch.equal(pruned.mask, M)
    assert torch.equal(pruned.weight, torch.where(M, W, 0.0))


def test_lazy_batch_update_matches_eager_obs() -> None:
    W, H = _W(6), _H(_correlated_X(7))
    pruned = sparsegpt(W, H, Options(0.5, UNSTRUCTURED, BLOCK, DAMP, "torch", None))
    # Reference: the same per-block masks, but every column's OBS update applied at once to all later
    # columns, with no deferred Err1 @ Hinv matmul.
    Hinv = prepare_hessian(H, DAMP).Hinv_chol
    W_ref = W.clone()
    for c0, k in zip(range(0, IN, BLOCK), block_counts(0.5, OUT, IN, BLOCK), strict=True):
        c1 = min(c0 + BLOCK, IN)
        scores = W_ref[:, c0:c1] ** 2 / torch.diag(Hinv)[c0:c1] ** 2
        keep = torch.ones(scores.numel(), dtype=torch.bool)
        keep[torch.argsort(scores.flatten(), stable=True)[:k]] = False
        keep = keep.reshape(scores.shape)
        for j in range(c0, c1):
            err = W_ref[:, j] * ~keep[:, j - c0] / Hinv[j, j]
            W_ref[:, j:] -= torch.outer(err, Hinv[j, j:])
            W_ref[:, j] *= keep[:, j - c0]
    assert torch.equal(pruned.mask, W_ref != 0)
    # Same float64 arithmetic regrouped (rank-1 updates vs one matmul): differences ~1e-15.
    torch.testing.assert_close(pruned.weight, W_ref, rtol=1e-10, atol=1e-12)


def test_sparsegpt_beats_magnitude_on_correlated_inputs() -> None:
    W, H = _W(8), _H(_correlated_X(9))
    ours = sparsegpt(W, H, Options(0.5, UNSTRUCTURED, BLOCK, DAMP, "torch", None)).loss
    base = magnitude(W, H, Options(0.5, UNSTRUCTURED, BLOCK, DAMP, "torch", None)).loss
    # Over seeds 0-29 the ratio ranged 0.11-0.38 (mean 0.21): 0.5 leaves margin yet needs real compensation.
    assert ours < 0.5 * base


def test_sparsity_zero_is_identity() -> None:
    W = _W(10, dtype=torch.bfloat16)
    pruned = sparsegpt(W, _H(_correlated_X(11)).float(), Options(0.0, UNSTRUCTURED, BLOCK, DAMP, "torch", None))
    assert pruned.weight.dtype == torch.bfloat16
    assert torch.equal(pruned.weight, W) and bool(pruned.mask.all())
    assert pruned.loss == 0.0


def test_damping_escalates_on_indefinite_H() -> None:
    H = torch.eye(IN, dtype=torch.float64)
    # Eigenvalues 1 ± 1.5 on this 2×2 block: Cholesky needs damping above 0.5 × mean(diag) = 0.5.
    H[0, 1] = H[1, 0] = 1.5
    prepared = prepare_hessian(H, DAMP)
    assert prepared.escalations == 2 and prepared.damp_used == pytest.approx(1.0)
    pruned = sparsegpt(_W(12), H, Options(0.5, UNSTRUCTURED, BLOCK, DAMP, "torch", None))
    assert pruned.damp_used == pytest.approx(1.0) and pruned.damp_used > DAMP
    assert torch.isfinite(pruned.weight).all()


def test_damping_gives_up_with_last_damp_named() -> None:
    last = DAMP * 10**MAX_ESCALATIONS
    with pytest.raises(ValueError, match=f"damp={last!r}"):
        prepare_hessian(-torch.eye(4), DAMP)


def test_dead_column_is_zeroed() -> None:
    X = _correlated_X(13)
    X[3] = 0
    H = _H(X)
    prepared = prepare_hessian(H, DAMP)
    assert prepared.dead.nonzero().flatten().tolist() == [3] and prepared.escalations == 0
    pruned = sparsegpt(_W(14), H, Options(0.5, UNSTRUCTURED, BLOCK, DAMP, "torch", None))
    assert bool((pruned.weight[:, 3] == 0).all()) and torch.isfinite(pruned.weight).all()


@pytest.mark.parametrize("name", PRUNERS)
def test_inputs_not_mutated(name: str) -> None:
    X = _correlated_X(15)
    X[5] = 0  # a dead column exercises the in-place H[dead, dead] = 1 and W[:, dead] = 0
    W, H = _W(16), _H(X)
    W0, H0 = W.clone(), H.clone()
    SOLVERS[name](W, H, Options(0.5, UNSTRUCTURED, BLOCK, DAMP, "torch", None))
    prepare_hessian(H, DAMP)
    assert torch.equal(W, W0) and torch.equal(H, H0)


def test_hessian_from_sums_mixture() -> None:
    g = _gen(17)
    xtx = {"prompt": torch.randn(4, 4, generator=g), "decode": torch.randn(4, 4, generator=g)}
    counts = {"prompt": 10, "decode": 30}
    xtx0 = {s: t.clone() for s, t in xtx.items()}
    H = hessian_from_sums(xtx, counts, {"prompt": 1.0, "decode": 0.0})
    assert H.dtype == torch.float32
    torch.testing.assert_close(H, 2 * xtx["prompt"] / 10)
    H = hessian_from_sums(xtx, counts, {"prompt": 1.0, "decode": 0.5})
    torch.testing.assert_close(H, 2 * (xtx["prompt"] + 0.5 * xtx["decode"]) / (10 + 15))
    assert all(torch.equal(xtx[s], xtx0[s]) for s in xtx)
    xtx64 = {s: t.double() for s, t in xtx.items()}
    assert hessian_from_sums(xtx64, counts, {"prompt": 1.0, "decode": 1.0}).dtype == torch.float64


def test_hessian_from_sums_zero_count() -> None:
    xtx = {"prompt": torch.zeros(2, 2), "decode": torch.ones(2, 2)}
    with pytest.raises(ValueError, match="weighs 0 tokens") as info:
        hessian_from_sums(xtx, {"prompt": 0, "decode": 5}, {"prompt": 1.0, "decode": 0.0})
    assert "'prompt': 0" in str(info.value) and "'decode': 0.0" in str(info.value)


def test_layer_loss_matches_trace() -> None:
    W, W_hat, H = _W(18, 3, 5), _W(19, 3, 5), _H(_correlated_X(20, 5, 50))
    delta = W - W_hat
    assert layer_loss(W, W_hat, H) == pytest.approx(0.5 * float(torch.trace(delta @ H @ delta.T)), rel=1e-12)


def test_unknown_solver() -> None:
    opts = Options(0.5, UNSTRUCTURED, BLOCK, DAMP, "torch", None)
    with pytest.raises(ValueError, match=r"pruner='foo' is unknown; choose one of \['alps', 'gptq', 'magnitude', "):
        check_solver("foo", opts)


# ---- patterns and masks


@pytest.mark.parametrize(
    ("pattern", "sparsity", "expected"),
    [(UNSTRUCTURED, 0.7, None), ("2:4", 0.5, (2, 4)), ("4:8", 0.5, (4, 8)), ("1:3", 1 / 3, (1, 3))],
)
def test_parse_pattern(pattern: str, sparsity: float, expected: tuple[int, int] | None) -> None:
    assert parse_pattern(pattern, sparsity) == expected


@pytest.mark.parametrize(
    ("pattern", "fragment"),
    [
        ("2-4", "neither 'unstructured' nor 'N:M'"),
        ("a:b", "neither 'unstructured' nor 'N:M'"),
        ("0:4", "N must be at least 1"),
        ("1:1", "M must be at least 2"),
        ("3:2", "N must be below M"),
        ("4:4", "N must be below M"),
        (124, "quote it"),
    ],
)
def test_bad_pattern(pattern: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment) as info:
        parse_pattern(pattern, 0.5)
    message = str(info.value)
    assert "\n" not in message and f"pattern={pattern!r}" in message


@pytest.mark.parametrize("name", PRUNERS)
def test_sparsity_contradicting_pattern(name: str) -> None:
    message = "sparsity=0.7 contradicts pattern='2:4' (which prunes 0.5); set sparsity to 0.5"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        SOLVERS[name](_W(21), torch.eye(IN), Options(0.7, "2:4", BLOCK, DAMP, "torch", None))


@pytest.mark.parametrize("name", PRUNERS)
def test_in_features_not_divisible_by_m(name: str) -> None:
    W = _W(22, 4, 10)
    with pytest.raises(ValueError, match=r"needs in_features divisible by 4, but this layer has 10") as info:
        SOLVERS[name](W, torch.eye(10), Options(0.5, "2:4", 8, DAMP, "torch", None))
    assert "\n" not in str(info.value)


def test_sparsegpt_block_size_not_multiple_of_m() -> None:
    with pytest.raises(ValueError, match=r"block_size=6 must be a multiple of M=4 .* use e.g. 4"):
        sparsegpt(_W(23), torch.eye(IN), Options(0.5, "2:4", 6, DAMP, "torch", None))


def test_keep_smallest_pruned_ties_go_to_lower_index() -> None:
    scores = torch.tensor([[2.0, 1.0, 1.0], [1.0, 0.0, 1.0]])
    # Sorted: 0.0 at flat 4, then the 1.0s at flat 1, 2, 3, 5: pruning 3 takes flat 4, 1 and 2.
    expected = torch.tensor([[True, False, False], [True, False, True]])
    assert torch.equal(keep_smallest_pruned(scores, 3), expected)
    assert bool(keep_smallest_pruned(scores, 0).all()) and not bool(keep_smallest_pruned(scores, 6).any())
    # kthvalue plus index-ordered ties must agree with a stable argsort on every k, ties or not.
    g = _gen(24)
    for flat in (torch.randint(0, 4, (30,), generator=g).double(), torch.randn(30, generator=g, dtype=torch.float64)):
        for k in range(31):
            reference = torch.ones(30, dtype=torch.bool)
            reference[torch.argsort(flat, stable=True)[:k]] = False
            assert torch.equal(keep_smallest_pruned(flat, k), reference)


def test_keep_nm_ties_and_counts() -> None:
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0, 3.0, 0.0, 2.0, 0.0]])
    assert torch.equal(keep_nm(scores, 2, 4), torch.tensor([[False, False, True, True, True, False, True, False]]))
    mask = keep_nm(torch.randn(6, 24, generator=_gen(25)), 3, 8)
    assert torch.equal(mask.reshape(6, 3, 8).sum(-1), torch.full((6, 3), 5))


def test_row_counts_sum_exactly() -> None:
    counts = row_counts(0.33, 16, 40)
    # round(0.33 · 640) = 211 = 16 · 13 + 3: the first 3 rows take one more.
    assert counts.tolist() == [14] * 3 + [13] * 13 and int(counts.sum()) == round(0.33 * 640)
    mask = keep_smallest_per_row(torch.randn(16, 40, generator=_gen(26)), counts)
    assert torch.equal((~mask).sum(1), counts)


@pytest.mark.parametrize("name", PRUNERS)
@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
@pytest.mark.parametrize("shape", [(16, 40), (5, 24)])
def test_nm_pattern(name: str, pattern: str, shape: tuple[int, int]) -> None:
    out, in_ = shape
    n, m = (int(x) for x in pattern.split(":"))
    X = _correlated_X(27, in_, 3 * in_)
    X[1] = 0  # a dead input: its weights are 0 but may still count as kept
    pruned = SOLVERS[name](_W(28, out, in_), _H(X), Options(n / m, pattern, BLOCK, DAMP, "torch", None))
    # Exactly M − N kept per group: counting zeros instead would miss a kept weight that is itself 0.
    assert torch.equal(pruned.mask.reshape(out, in_ // m, m).sum(-1), torch.full((out, in_ // m), m - n))
    assert bool((pruned.weight[~pruned.mask] == 0).all()) and torch.isfinite(pruned.weight).all()


# ---- SparseGPT N:M


def test_sparsegpt_nm_matches_eager_obs() -> None:
    W, H = _W(29), _H(_correlated_X(30))
    pruned = sparsegpt(W, H, Options(0.5, "2:4", 8, DAMP, "torch", None))
    # Reference: the paper's N:M rule with every OBS update applied at once: when column j starts a group, its
    # mask is the 2 smallest w²/[H⁻¹]_jj² per row of the CURRENT, already compensated weights.
    Hinv = prepare_hessian(H, DAMP).Hinv_chol
    d = torch.diag(Hinv)
    W_ref = W.clone()
    keep = torch.ones_like(W, dtype=torch.bool)
    for j in range(IN):
        if j % 4 == 0:
            scores = W_ref[:, j : j + 4] ** 2 / d[j : j + 4] ** 2  # [out, 4]
            smallest = torch.argsort(scores, dim=1, stable=True)[:, :2]
            keep[:, j : j + 4].scatter_(1, smallest, False)
        err = W_ref[:, j] * ~keep[:, j] / Hinv[j, j]
        W_ref[:, j:] -= torch.outer(err, Hinv[j, j:])
        W_ref[:, j] *= keep[:, j]
    assert torch.equal(pruned.mask, keep)
    # Same float64 arithmetic regrouped (rank-1 updates vs one matmul per block): differences ~1e-15.
    torch.testing.assert_close(pruned.weight, W_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_sparsegpt_nm_beats_magnitude_nm(pattern: str) -> None:
    W, H = _W(8), _H(_correlated_X(9))
    ours = sparsegpt(W, H, Options(0.5, pattern, BLOCK, DAMP, "torch", None)).loss
    base = magnitude(W, H, Options(0.5, pattern, BLOCK, DAMP, "torch", None)).loss
    # Over seeds 0-29 (2:4 and 4:8) the ratio ranged up to 0.39 (mean 0.19): 0.5 needs real compensation.
    assert ours < 0.5 * base


# ---- Wanda


@pytest.mark.parametrize("sparsity", [0.5, 0.33])
def test_wanda_identity_hessian_is_per_row_magnitude(sparsity: float) -> None:
    W = _W(31)
    pruned = wanda(W, torch.eye(IN, dtype=torch.float64), Options(sparsity, UNSTRUCTURED, BLOCK, DAMP, "torch", None))
    # Reference: each row's k_r smallest |w|, where the k_r sum to round(sparsity·numel) and the first rows take
    # the remainder (0.33: 211 = 16·13 + 3).
    total = round(sparsity * W.numel())
    M = torch.ones_like(W, dtype=torch.bool)
    for r in range(OUT):
        k = total // OUT + (r < total % OUT)
        M[r, torch.argsort(W[r].abs())[:k]] = False
    assert torch.equal(pruned.mask, M)
    assert torch.equal(pruned.weight, torch.where(M, W, 0.0)) and pruned.damp_used == 0.0


def test_wanda_nm_identity_hessian_is_magnitude_nm() -> None:
    W, H = _W(32), torch.eye(IN, dtype=torch.float64)
    ours = wanda(W, H, Options(0.5, "2:4", BLOCK, DAMP, "torch", None))
    assert torch.equal(ours.mask, magnitude(W, H, Options(0.5, "2:4", BLOCK, DAMP, "torch", None)).mask)


def test_wanda_scales_by_input_norm() -> None:
    # Input 0 is 10× larger than input 1, so its smaller weight still matters more: Wanda keeps it.
    W = torch.tensor([[0.5, 1.0]], dtype=torch.float64)
    H = torch.diag(torch.tensor([100.0, 1.0], dtype=torch.float64))
    assert wanda(W, H, Options(0.5, UNSTRUCTURED, BLOCK, DAMP, "torch", None)).mask.tolist() == [[True, False]]
    assert magnitude(W, H, Options(0.5, UNSTRUCTURED, BLOCK, DAMP, "torch", None)).mask.tolist() == [[False, True]]


# ---- ALPS


def test_masked_pcg_reaches_restricted_least_squares() -> None:
    W, H = _W(33, 4, 12), _H(_correlated_X(34, 12, 60))
    mask = keep_smallest_pruned(torch.rand(4, 12, generator=_gen(35)), 24)
    B = alps_module.masked_pcg(W, H, mask, torch.zeros_like(W), 12)
    # Reference: each row's exact minimiser on its support, H_SS b_S = (W H)_S. CG solves a 6-dim SPD system
    # in ≤ 6 steps in exact arithmetic; 12 steps in float64 leave ~1e-10 relative error on this conditioning.
    ref = torch.zeros_like(W)
    for r in range(4):
        S = mask[r]
        ref[r, S] = torch.linalg.solve(H[S][:, S], (W[r] @ H)[S])
    torch.testing.assert_close(B, ref, rtol=1e-7, atol=1e-9)
    assert bool((B[~mask] == 0).all())


@pytest.mark.parametrize(
    ("name", "expected"), [("alps", DAMP), ("magnitude", 0.0), ("sparsegpt", DAMP), ("wanda", 0.0)]
)
def test_damp_used(name: str, expected: float) -> None:
    # Only the solvers that invert H damp it; a well-conditioned H needs no escalation.
    pruned = SOLVERS[name](_W(36), _H(_correlated_X(37)), Options(0.5, "2:4", BLOCK, DAMP, "torch", None))
    assert pruned.damp_used == expected


@pytest.mark.parametrize(("pattern", "sparsity"), [(UNSTRUCTURED, 0.5), (UNSTRUCTURED, 0.7), ("2:4", 0.5)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_alps_beats_sparsegpt_on_correlated_inputs(pattern: str, sparsity: float, seed: int) -> None:
    X = _correlated_X(40 + seed, 64, 512)
    W, H = _W(50 + seed, 32, 64), _H(X)
    ours = alps(W, H, Options(sparsity, pattern, BLOCK, DAMP, "torch", None)).loss
    base = sparsegpt(W, H, Options(sparsity, pattern, BLOCK, DAMP, "torch", None)).loss
    # Over 40 seeds of this data the ratio stayed ≤ 0.17 (means 0.08, 0.04, 0.11): 0.5 leaves room yet needs a
    # support and values that SparseGPT's greedy pass cannot reach.
    assert ours < 0.5 * base


@pytest.mark.parametrize(("pattern", "sparsity"), [(UNSTRUCTURED, 0.5), (UNSTRUCTURED, 0.7), ("2:4", 0.5)])
def test_admm_support_beats_its_start(pattern: str, sparsity: float) -> None:
    X = _correlated_X(40, 64, 512)
    W, H = _W(50, 32, 64), _H(X)
    Wn, Hn, L, Q, s = alps_module.jacobi_scaled(W, H, DAMP)
    k = round(sparsity * W.numel())
    nm = parse_pattern(pattern, sparsity)
    start = keep_smallest_pruned(Wn.abs(), k) if nm is None else keep_nm(Wn.abs(), *nm)
    admm = alps_module.admm_support(Wn, Hn, L, Q, start, k, nm)
    assert int((~admm.mask).sum()) == k and admm.iterations < alps_module.MAX_ITERS

    def polished(mask: torch.Tensor) -> float:
        return layer_loss(W, alps_module.masked_pcg(Wn, Hn, mask, Wn * mask, alps_module.PCG_ITERS) / s, H)

    # alps() keeps the better of the two supports, so this is what shows that ADMM itself finds a better one.
    # Over 40 seeds of this data the ratio was at most 0.84, 0.79 and 0.88 (means 0.80, 0.68, 0.83).
    assert polished(admm.mask) < 0.95 * polished(start)


def _scaled_X(seed: int, in_: int = 64, n: int = 512) -> torch.Tensor:
    """[in, n] rank-16 correlated activations whose features span two decades of scale, as LLM inputs do."""
    g = _gen(seed)
    A = torch.randn(in_, 16, generator=g, dtype=torch.float64)
    X = A @ torch.randn(16, n, generator=g, dtype=torch.float64) + 0.5 * torch.randn(
        in_, n, generator=g, dtype=torch.float64
    )
    scale = torch.logspace(-1, 1, in_, dtype=torch.float64)[torch.randperm(in_, generator=g)]
    return X * scale.unsqueeze(1)


@pytest.mark.parametrize(("pattern", "sparsity"), [(UNSTRUCTURED, 0.5), (UNSTRUCTURED, 0.7), ("2:4", 0.5)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_loss_ordering(pattern: str, sparsity: float, seed: int) -> None:
    W, H = _W(1000 + seed, 32, 64), _H(_scaled_X(seed))
    loss = {
        name: solver(W, H, Options(sparsity, pattern, BLOCK, DAMP, "torch", None)).loss
        for name, solver in SOLVERS.items()
        if name in PRUNERS
    }
    # Worst ratios over 40 seeds (all three settings): ALPS/SparseGPT 0.30, SparseGPT/Wanda 0.81,
    # Wanda/magnitude 0.31 (the scales make |w| alone a poor score). Each margin clears its worst case.
    assert loss["alps"] < 0.5 * loss["sparsegpt"]
    assert loss["sparsegpt"] < 0.9 * loss["wanda"]
    assert loss["wanda"] < 0.5 * loss["magnitude"]


def test_inverse_factor_is_the_upper_cholesky_of_the_damped_inverse() -> None:
    H = _H(_correlated_X(40))
    U = prepare_hessian(H, DAMP).Hinv_chol
    Hd = H + DAMP * torch.mean(torch.diag(H)) * torch.eye(IN, dtype=H.dtype)
    assert torch.equal(U, torch.triu(U)) and bool((torch.diag(U) > 0).all())
    # Cholesky factors are unique, so this is the factor of the inverse formed explicitly.
    torch.testing.assert_close(U, torch.linalg.cholesky(torch.linalg.inv(Hd), upper=True), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("pattern, sparsity", [(UNSTRUCTURED, 0.5), (UNSTRUCTURED, 0.77), ("2:4", 0.5)])
@pytest.mark.parametrize("name", PRUNERS)
def test_group_solve_equals_member_by_member(name: str, pattern: str, sparsity: float) -> None:
    # q, k and v of one layer: different row counts, one H. Each member keeps its own exact count.
    H = _H(_correlated_X(41))
    Ws = [_W(42, 16), _W(43, 8), _W(44, 5)]
    opts = Options(sparsity, pattern, BLOCK, DAMP, "torch", None)
    together = solve_group(name, Ws, H, opts)
    for W, got in zip(Ws, together, strict=True):
        alone = SOLVERS[name](W, H, opts)
        assert torch.equal(got.mask, alone.mask)
        assert int((~got.mask).sum()) == round(sparsity * W.numel())
        torch.testing.assert_close(got.weight, alone.weight, rtol=1e-10, atol=1e-12)
        assert got.loss == pytest.approx(alone.loss, rel=1e-9) and got.damp_used == alone.damp_used
