"""Which linears a run prunes, and at what sparsity: ``prune.scope``, ``prune.layers``, ``prune.overrides``."""

import math
import re

from stages.errors import RacError

SCOPES = ("all", "mlp", "attn")
_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def _preset(name: str, n_layers: int) -> set[int] | None:
    """The paper's layer sets (its table 6): the first third, the first and last thirds, all."""
    third = math.ceil(n_layers / 3)
    presets = {
        "all": set(range(n_layers)),
        "first_third": set(range(third)),
        "first_and_last_third": set(range(third)) | set(range(n_layers - third, n_layers)),
    }
    return presets.get(name)


def check_layers(spec: str) -> None:
    """Syntax of a layer spec: a preset, or comma-separated inclusive ranges such as ``0-9,20-27``."""
    if _preset(spec, 3) is not None:
        return
    for part in spec.split(","):
        match = _RANGE.match(part.strip())
        if not match or (match.group(2) is not None and int(match.group(2)) < int(match.group(1))):
            raise RacError(
                f"layer spec {spec!r} is invalid at {part!r}; use all, first_third, first_and_last_third, "
                "or inclusive ranges such as 0-9,20-27"
            )


def parse_layers(spec: str, n_layers: int) -> set[int]:
    """Decoder-layer indices named by ``spec`` for a model of ``n_layers`` layers."""
    check_layers(spec)
    preset = _preset(spec, n_layers)
    if preset is not None:
        return preset
    layers: set[int] = set()
    for part in spec.split(","):
        match = _RANGE.match(part.strip())
        assert match is not None
        first, last = int(match.group(1)), int(match.group(2) or match.group(1))
        if last >= n_layers:
            raise RacError(f"layer range {part.strip()!r} is out of bounds: the model has layers 0-{n_layers - 1}")
        layers |= set(range(first, last + 1))
    return layers


def in_scope(member: str, scope: str) -> bool:
    """Whether a linear, named relative to its decoder layer (``mlp.up_proj``), is in ``scope``."""
    kind = "attn" if "attn" in member or "attention" in member else "mlp"
    return scope == "all" or scope == kind


def layer_sparsities(
    sparsity: float, scope: str, layers: str, overrides: dict[str, float], n_layers: int
) -> dict[int, float]:
    """Target sparsity per decoder layer: ``sparsity`` on ``layers``, 0 elsewhere, then ``overrides``."""
    chosen = parse_layers(layers, n_layers)
    per_layer = {i: (sparsity if i in chosen else 0.0) for i in range(n_layers)}
    for spec, value in overrides.items():
        for i in parse_layers(spec, n_layers):
            per_layer[i] = value
    return per_layer


def selected_layers(layers: str, overrides: dict[str, float], n_layers: int) -> set[int]:
    """Decoder layers that ``layers`` or any ``overrides`` key names: the layers a quantizer compresses."""
    chosen = parse_layers(layers, n_layers)
    for spec in overrides:
        chosen |= parse_layers(spec, n_layers)
    return chosen
