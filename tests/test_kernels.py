"""The fused Triton SparseGPT block against its torch reference (``obs_block``).

On CPU the kernel runs under the Triton interpreter (TRITON_INTERPRET=1, set by conftest.py); on a
GPU, compiled.
"""

from dataclasses import replace

import pytest
import torch

from stages.solvers import Options
from stages.solvers.sparsegpt import obs_block, sparsegpt

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: interpreted, see conftest.py


def _problem(out: int, in_: int, seed: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(in_, in_ // 4, generator=g) @ torch.randn(in_ // 4, 4 * in_, generator=g)
    X += 0.2 * torch.randn(in_, 4 * in_, generator=g)  # correlated inputs, full rank
    return torch.randn(out, in_, generator=g).to(device), (2 * X @ X.T / X.shape[1]).to(device)


def _compare(W: torch.Tensor, H: torch.Tensor, pattern: str, sparsity: float, block_size: int) -> None:
    opts = Options(sparsity, pattern, block_size, 0.01, "torch", None)
    ref = sparsegpt(W, H, opts)
    fused = sparsegpt(W, H, replace(opts, kernel="triton"))
    # Continuous random data has no tied scores, so the masks must be identical.
    assert torch.equal(ref.mask, fused.mask)
    # Both run the same float32 operations per column, in a different order inside the reductions:
    # differences are ~1e-7 relative. A wrong mask decision or a skipped compensation moves weights
    # by O(0.1) and the loss by percent, far outside these bounds.
    scale = W.float().abs().max()
    assert (ref.weight.float() - fused.weight.float()).abs().max() <= 1e-5 * scale
    assert fused.loss == pytest.approx(ref.loss, rel=1e-5)
    assert fused.weight.dtype == W.dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("pattern", "sparsity"), [("unstructured", 0.6), ("2:4", 0.5), ("4:8", 0.5)])
@pytest.mark.parametrize(("out", "in_", "block_size"), [(37, 200, 64), (16, 136, 128)])
def test_triton_block_matches_torch_small(
    dtype: torch.dtype, pattern: str, sparsity: float, out: int, in_: int, block_size: int
) -> None:
    W, H = _problem(out, in_, seed=out + in_, device=DEVICE)
    _compare(W.to(dtype), H, pattern, sparsity, block_size)  # the last block is irregular in both shapes


def test_triton_block_is_pure() -> None:
    from stages.kernels.sparsegpt_block import obs_block_triton

    W, H = _problem(8, 64, seed=3, device=DEVICE)
    Hinv = torch.linalg.cholesky(
        torch.cholesky_inverse(torch.linalg.cholesky(H + 0.1 * torch.eye(64, device=DEVICE))), upper=True
    )
    M1 = torch.rand(8, 64, device=DEVICE) > 0.5
    W_before, M_before = W.clone(), M1.clone()
    Q1, Err1, M_out = obs_block_triton(W, Hinv, M1, None)
    ref = obs_block(W, Hinv, M1, None)
    assert torch.equal(W, W_before) and torch.equal(M1, M_before)
    assert torch.equal(M_out, ref[2])
    assert torch.allclose(Q1, ref[0], atol=1e-5) and torch.allclose(Err1, ref[1], atol=1e-4)


def test_triton_block_refuses_float64() -> None:
    from stages.kernels.sparsegpt_block import obs_block_triton

    with pytest.raises(ValueError, match="float32"):
        obs_block_triton(
            torch.zeros(2, 4, dtype=torch.float64, device=DEVICE),
            torch.eye(4, device=DEVICE),
            torch.ones(2, 4, dtype=torch.bool, device=DEVICE),
            None,
        )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("pattern", "sparsity"), [("unstructured", 0.5), ("2:4", 0.5)])
@pytest.mark.parametrize(("out", "in_"), [(1000, 1100), (3584, 3584)])
def test_triton_block_matches_torch_on_gpu(
    dtype: torch.dtype, pattern: str, sparsity: float, out: int, in_: int
) -> None:
    W, H = _problem(out, in_, seed=1, device="cuda")
    _compare(W.to(dtype), H, pattern, sparsity, 128)
