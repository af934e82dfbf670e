"""Export formats of a compressed model: the tensors of each decoder layer and config.json's quantization_config.

``hf`` writes every weight at its dense shape in the checkpoint's dtype (zeros where pruned, grid values where
quantized): it loads everywhere and is served dense. ``compressed-tensors`` packs each quantized linear as
vLLM's W4A16 / W8A16 kernels read it (the ``pack-quantized`` format, packed by the compressed-tensors package
itself): integer codes eight (or four) to an int32 along the inputs, one scale per output row and group, a zero
point when the grid is asymmetric. Pruned zeros are codes like any other, so a pruned and quantized layer packs
the same way.
"""

import importlib.metadata
from typing import Any

import torch

from stages.errors import RacError
from stages.solvers import Quantized, QuantSpec

EXPORTS = ("hf", "compressed-tensors")
# Bits vLLM's weight-only kernels (wNa16) serve; 2 and 3 bits have no kernel, so they export as hf only.
PACKED_BITS = (4, 8)


def check_export(fmt: str, spec: QuantSpec | None) -> None:
    """``fmt`` can hold what the solver writes; else a one-line error naming the fix."""
    if fmt not in EXPORTS:
        raise RacError(f"prune.export={fmt!r} is unknown; choose one of {list(EXPORTS)}")
    if fmt == "hf":
        return
    if spec is None:
        # compressed-tensors 0.17 removed its sparsity formats, and vLLM 0.32 refuses a sparsity_config.
        raise RacError(
            "prune.export='compressed-tensors' packs quantized weights, but quant.bits is null and "
            "compressed-tensors has no sparse format any more; set quant.bits 4 or 8, or prune.export hf"
        )
    if spec.bits not in PACKED_BITS:
        raise RacError(
            f"prune.export='compressed-tensors' packs {list(PACKED_BITS)}-bit weights (vLLM's kernels), not "
            f"quant.bits={spec.bits}; set prune.export hf (grid values at the dense shape)"
        )


def linear_tensors(fmt: str, prefix: str, weight: torch.Tensor, q: Quantized | None) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of one linear's weight (``prefix`` = its module name, W [out, in] in the
    checkpoint's dtype); its bias and the layer's other tensors are written as they are."""
    if fmt == "hf" or q is None:
        return {f"{prefix}.weight": weight.contiguous()}
    from compressed_tensors.compressors import pack_to_int32  # slow to import: only for this format

    offset = 2 ** (q.bits - 1)  # the package packs signed codes, q − 2^(bits−1)
    tensors = {
        f"{prefix}.weight_packed": pack_to_int32((q.codes.to(torch.int16) - offset).to(torch.int8), q.bits),
        f"{prefix}.weight_scale": q.scale.to(weight.dtype).contiguous(),  # [out, groups]
        f"{prefix}.weight_shape": torch.tensor(list(weight.shape), dtype=torch.int64),
    }
    if not q.symmetric:
        # Zero points pack along the output rows: [ceil(out·bits/32), groups].
        zero = (q.zero.to(torch.int16) - offset).to(torch.int8)
        tensors[f"{prefix}.weight_zero_point"] = pack_to_int32(zero, q.bits, packed_dim=0).contiguous()
    return tensors


def quantization_config(fmt: str, spec: QuantSpec | None, ignore: list[str]) -> dict[str, Any] | None:
    """config.json's ``quantization_config`` for ``fmt``; ``ignore`` names every Linear left unquantized."""
    if fmt == "hf" or spec is None:
        return None
    weights = {
        "num_bits": spec.bits,
        "type": "int",
        "symmetric": spec.symmetric,
        "strategy": "channel" if spec.group_size is None else "group",
        "group_size": spec.group_size,
        "dynamic": False,
        # Act order here keeps groups contiguous in the original order (static groups): no g_idx to store.
        "actorder": None,
        "block_structure": None,
        "observer": "minmax",
        "observer_kwargs": {},
    }
    group = {
        "targets": ["Linear"],
        "weights": weights,
        "input_activations": None,
        "output_activations": None,
        "format": "pack-quantized",
    }
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": group},
        "ignore": sorted(ignore),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
        "version": importlib.metadata.version("compressed-tensors"),
    }
