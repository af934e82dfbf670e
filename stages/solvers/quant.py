"""The integer grid of GPTQ (Frantar et al., 2023): min/max scales per output row or per group of inputs."""

import torch

from stages.solvers.base import QUANT_BITS, OptionError, Quantized, QuantSpec


def check_spec(spec: QuantSpec, in_features: int) -> None:
    """The grid fits a layer of ``in_features`` inputs."""
    if spec.bits not in QUANT_BITS:
        raise OptionError(
            "{bits} is not supported; choose one of {choices}", {"bits": spec.bits}, choices=list(QUANT_BITS)
        )
    g = spec.group_size
    if g is None:
        return
    if g <= 0 or in_features % g:
        raise OptionError("{group_size} does not divide the layer's {n} inputs", {"group_size": g}, n=in_features)


def find_params(W: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale [out], zero [out]) of the grid covering each row of W [out, k], as the GPTQ reference finds them."""
    maxq = 2**bits - 1
    xmin = W.min(dim=1).values.clamp(max=0)  # [out]: the grid always holds 0, so pruned weights stay exact
    xmax = W.max(dim=1).values.clamp(min=0)
    if symmetric:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    flat = (xmin == 0) & (xmax == 0)  # an all-zero row: any grid holds it; this one avoids 0/0
    xmin, xmax = torch.where(flat, -1.0, xmin), torch.where(flat, 1.0, xmax)
    scale = (xmax - xmin) / maxq
    zero = torch.full_like(scale, (maxq + 1) // 2) if symmetric else torch.round(-xmin / scale)
    return scale, zero


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """ŵ = scale·(clamp(round(w/scale) + zero, 0, 2^bits − 1) − zero), elementwise over broadcast shapes."""
    q = torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)
    return scale * (q - zero)


class Grid:
    """Scales and zeros of one layer, [out, groups], filled as the OBS loop reaches each group.

    Per row (no groups) and with ``act_order`` (static groups, so that groups stay contiguous in the original
    order whatever the visiting order), they come from W before any update; otherwise each group's from the
    compensated weights when the loop opens it, as the GPTQ reference does.
    """

    def __init__(self, spec: QuantSpec, W: torch.Tensor) -> None:
        out, in_ = W.shape
        self.spec = spec
        self.g = spec.group_size or in_
        groups = in_ // self.g
        self.scale = torch.zeros(out, groups, dtype=W.dtype, device=W.device)  # [out, groups]
        self.zero = torch.zeros_like(self.scale)
        self.static = spec.group_size is None or spec.act_order
        if self.static:
            for k in range(groups):
                self.scale[:, k], self.zero[:, k] = find_params(W[:, k * self.g : (k + 1) * self.g], *self._how)

    @property
    def _how(self) -> tuple[int, bool]:
        return self.spec.bits, self.spec.symmetric

    def column(self, j: int, W_ahead: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale [out], zero [out]) of input ``j`` (original order); W_ahead [out, ≥ g] holds the compensated
        weights of input j and the rest of its group when j opens a dynamic group."""
        k = j // self.g
        if not self.static and j % self.g == 0:
            self.scale[:, k], self.zero[:, k] = find_params(W_ahead[:, : self.g], *self._how)
        return self.scale[:, k], self.zero[:, k]

    def integers(self, W_hat: torch.Tensor) -> Quantized:
        """The codes of W_hat [out, in] (original order), which lies on this grid."""
        expand = torch.arange(W_hat.shape[1], device=W_hat.device) // self.g  # [in] group of each input
        scale, zero = self.scale[:, expand], self.zero[:, expand]  # [out, in]
        codes = torch.clamp(torch.round(W_hat / scale) + zero, 0, 2**self.spec.bits - 1)
        return Quantized(
            codes.to(torch.uint8),
            self.scale.to(torch.float32),
            self.zero.to(torch.uint8),
            self.spec.bits,
            self.spec.group_size,
            self.spec.symmetric,
        )
