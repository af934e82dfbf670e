"""What every solver reads (``Options``) and returns (``Compressed``), the loss it reports, and exact prune counts."""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

# Integer widths a quantizing solver writes: 2 and 3 bits for studies, 4 and 8 for the exports vLLM serves.
QUANT_BITS = (2, 3, 4, 8)


@dataclass(frozen=True)
class QuantSpec:
    """Integer weight quantization: Ŵ = scale·(q − zero) with q in [0, 2^bits − 1]."""

    bits: int
    group_size: int | None  # consecutive inputs sharing one scale per output row; None: one per row
    symmetric: bool  # zero fixed at 2^(bits−1), scale from max |w|; else zero and scale from [min, max]
    act_order: bool  # visit the inputs by decreasing H_jj (groups stay contiguous in the original order)


@dataclass(frozen=True)
class Options:
    """Everything a solver may read; each reads what it needs."""

    sparsity: float  # fraction of W pruned
    pattern: str  # "unstructured" or "N:M" (N pruned in every M consecutive inputs)
    block_size: int  # columns per lazy batch of the OBS solvers
    damp: float  # fraction of mean(diag H) added before inversion
    kernel: str  # "torch" or "triton": the OBS column loop
    quant: QuantSpec | None  # None: no quantization


class Quantized(NamedTuple):
    """The integer form of a quantized Ŵ [out, in]: Ŵ = scale[:, j // group]·(codes − zero[:, j // group])."""

    codes: torch.Tensor  # [out, in] uint8 in [0, 2^bits − 1]
    scale: torch.Tensor  # [out, groups] float32
    zero: torch.Tensor  # [out, groups] uint8
    bits: int
    group_size: int | None  # None: groups == 1
    symmetric: bool  # zero == 2^(bits−1) everywhere

    def split(self, rows: list[int]) -> list["Quantized"]:
        """The integer forms of consecutive row blocks of ``rows`` rows each (a stacked group's members)."""
        parts = zip(self.codes.split(rows), self.scale.split(rows), self.zero.split(rows), strict=True)
        return [Quantized(c, s, z, self.bits, self.group_size, self.symmetric) for c, s, z in parts]


class Compressed(NamedTuple):
    """A compressed layer: Ŵ is zero wherever ``mask`` is False, and on the grid of ``quant`` when it is set."""

    weight: torch.Tensor  # [out, in] Ŵ, in W's dtype
    mask: torch.Tensor  # [out, in] bool, True where the weight is kept (it may still be 0, e.g. a dead input)
    loss: float  # layer_loss(W, Ŵ, H) with the undamped H
    damp_used: float  # fraction of mean(diag(H)) added before inversion; 0.0 if H was never inverted
    quant: Quantized | None  # None: Ŵ is not quantized


class OptionError(ValueError):
    """Options a solver cannot use. ``template`` names each option as ``{name}``, given in ``options`` and written
    ``name=value``, so a stage can name the option by its params key (``render``) without parsing the text;
    ``values`` fill the template's other fields as they are."""

    def __init__(self, template: str, options: Mapping[str, Any], **values: Any) -> None:
        self.template, self.options, self.values = template, dict(options), values
        super().__init__(self.render({}))

    def render(self, keys: Mapping[str, str]) -> str:
        """The message with each option called ``keys[name]`` (its own name where ``keys`` has none)."""
        named = {name: f"{keys.get(name, name)}={value!r}" for name, value in self.options.items()}
        return self.template.format(**named, **self.values)


def check_shapes(W: torch.Tensor, H: torch.Tensor) -> None:
    """W [out, in] and H [in, in] belong together."""
    if W.dim() != 2 or H.shape != (W.shape[1], W.shape[1]):
        raise ValueError(f"H has shape {tuple(H.shape)} but W {tuple(W.shape)} needs [{W.shape[-1]}, {W.shape[-1]}]")


def layer_loss(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """½·tr((W−Ŵ) H (W−Ŵ)ᵀ): ||(W−Ŵ)X||²_F / n, the mean per-token error, when H = 2XXᵀ/n.

    The product runs in float32 unless an input is float64 (as the solvers do; it costs as much as their
    trailing updates), the sum in float64."""
    dtype = torch.float64 if torch.float64 in (W.dtype, W_hat.dtype, H.dtype) else torch.float32
    delta = W.to(dtype) - W_hat.to(dtype)  # [out, in]
    return 0.5 * float(((delta @ H.to(dtype)) * delta).sum(dtype=torch.float64))


def n_pruned(sparsity: float, numel: int) -> int:
    """How many of ``numel`` weights to prune at ``sparsity``: round(sparsity·numel)."""
    if not 0 <= sparsity <= 1:
        raise OptionError("{sparsity} is outside [0, 1]; pass a fraction such as 0.5", {"sparsity": sparsity})
    return round(sparsity * numel)


def block_counts(sparsity: float, rows: int, columns: int, block_size: int) -> list[int]:
    """Per-column-block prune counts whose sum is exactly n_pruned(sparsity, rows·columns)."""
    if block_size <= 0:
        raise OptionError("{block_size} must be > 0", {"block_size": block_size})
    # Differences of cumulative targets telescope, so rounding never drifts across blocks.
    return [
        n_pruned(sparsity, rows * min(c0 + block_size, columns)) - n_pruned(sparsity, rows * c0)
        for c0 in range(0, columns, block_size)
    ]
