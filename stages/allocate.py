"""Per-layer targets of a prune, read from what is cached, never from a forward pass.

Reads: params ``sparsity``, ``pruner`` and ``prune`` (``layers``, ``overrides``, ``scope``, ``allocation``,
``spread``, ``outlier_threshold``, ``mix``), the dense weights (one linear at a time), the Hessian store and, for
``loss``, the loss table (stages/losses.py). Writes nothing; prune records the result in report.json.

The allocated units are the layers ``prune.layers`` names and no override does (overrides win); each unit's size
is the weight count of its in-scope linears, and the size-weighted mean of their targets is ``sparsity``, as it is
under ``uniform``. The math is in stages/solvers/allocation.py.
"""

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from stages.errors import RacError
from stages.kernels import resolve_kernel
from stages.layers import Skeleton
from stages.losses import read_curves, table_key
from stages.models import LinearGroup, expert_member, member_weight
from stages.params import Params, in_params_terms
from stages.selection import in_scope, layer_sparsities, parse_layers
from stages.solvers import hessian_from_sums
from stages.solvers.allocation import decode_shift, from_losses, from_scores, outlier_ratio, pchip
from stages.store import HessianStore

log = logging.getLogger(__name__)

PROMPT_ONLY = {"prompt": 1.0, "decode": 0.0}
DECODE_ONLY = {"prompt": 0.0, "decode": 1.0}


@dataclass(frozen=True)
class Allocation:
    """Every decoder layer's target, and how the allocated ones were chosen."""

    method: str
    spread: float
    targets: dict[int, float]  # every decoder layer (0: not pruned)
    units: list[int]  # the layers allocated
    sizes: list[int]  # their in-scope weight counts
    scores: list[float] = field(default_factory=list)  # the method's statistic per unit; [] when none was needed
    note: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """report.json's ``allocation``."""
        return {
            "method": self.method,
            "spread": self.spread,
            "units": self.units,
            "sizes": self.sizes,
            "scores": self.scores,
            "targets": [self.targets[i] for i in self.units],
            "note": self.note,
        }


def allocate(
    p: Params,
    skeleton: Skeleton,
    groups: list[LinearGroup],
    store: HessianStore | None,
    losses: Path | None,
    device: torch.device,
) -> Allocation:
    """The targets of ``prune.allocation`` for the model of ``skeleton`` with input ``groups``."""
    n_layers = len(skeleton.layers)
    targets = layer_sparsities(p.sparsity, p.prune.scope, p.prune.layers, p.prune.overrides, n_layers)
    overridden = {i for spec in p.prune.overrides for i in parse_layers(spec, n_layers)}
    members = {
        i: [(g, m) for g in groups if g.layer == i for m in g.members if in_scope(m, p.prune.scope)]
        for i in sorted(parse_layers(p.prune.layers, n_layers) - overridden)
    }
    units = [i for i, chosen in members.items() if chosen]
    sizes = [sum(member_weight(skeleton.layers[i], m).numel() for _, m in members[i]) for i in units]
    method, spread = p.prune.allocation, p.prune.spread
    if method == "uniform" or not units or p.sparsity == 0 or spread == 0:
        return Allocation(method, spread, targets, units, sizes)
    experts = [m for i in units for _, m in members[i] if expert_member(m) is not None]
    if experts:
        raise RacError(
            f"prune.allocation={method!r} does not score the experts of a mixture of experts yet ({experts[0]}, "
            f"…); set prune.allocation uniform, or prune.scope attn to allocate over attention only"
        )
    if store is None:
        raise RacError(f"prune.allocation={method!r} reads a Hessian store: pass --hessians data/hessians/SOURCE.zarr")
    note = None
    try:
        if method == "loss":
            if losses is None:
                raise RacError("prune.allocation='loss' reads the loss table: pass --losses data/losses/SOURCE.parquet")
            scores, allocated = _loss_targets(p, store, losses, members, units, sizes)
        else:
            if method == "owl":
                scores = [_owl(p, skeleton, store, members[i], device) for i in units]
            elif store.n_tokens["decode"] == 0:
                note = "the store holds no decode tokens: every layer's shift is 0, so the targets are uniform"
                log.warning("prune.allocation='decode_shift' on %s: %s", store.path, note)
                scores = [0.0] * len(units)
            else:
                scores = [_shift(p, skeleton, store, members[i], device) for i in units]
            allocated = from_scores(scores, sizes, p.sparsity, spread)
    except ValueError as err:
        raise RacError(f"prune.allocation={method!r}: {in_params_terms(err)}") from err
    targets |= dict(zip(units, allocated, strict=True))
    return Allocation(method, spread, targets, units, sizes, scores, note)


def _weights(skeleton: Skeleton, layer: int, member: str) -> torch.Tensor:
    """W [out, in] of one linear-like module, loaded alone."""
    with skeleton.loaded(skeleton.prefix(layer) + member):
        return member_weight(skeleton.layers[layer], member).clone()


def _sums(store: HessianStore, group: LinearGroup, device: torch.device) -> dict[str, torch.Tensor]:
    return {s: torch.from_numpy(x).to(device) for s, x in store.sums(group).items()}


def _owl(
    p: Params, skeleton: Skeleton, store: HessianStore, members: list[tuple[LinearGroup, str]], device: torch.device
) -> float:
    """OWL's outlier ratio of one layer's in-scope linears, on diag H of the run's mix."""
    diag_of: dict[str, torch.Tensor] = {}  # [in] per input group
    Ws, diags = [], []
    for group, member in members:
        if group.name not in diag_of:
            H = hessian_from_sums(_sums(store, group, device), store.n_tokens, p.prune.mix)  # [in, in]
            diag_of[group.name] = torch.diag(H)
        Ws.append(_weights(skeleton, group.layer, member))
        diags.append(diag_of[group.name])
    return outlier_ratio(Ws, diags, p.prune.outlier_threshold)


def _shift(
    p: Params, skeleton: Skeleton, store: HessianStore, members: list[tuple[LinearGroup, str]], device: torch.device
) -> float:
    """The decode shift of one layer's in-scope linears at ``sparsity``."""
    H_of: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # (H_prompt, H_decode) [in, in] per input group
    Ws, H_ps, H_ds = [], [], []
    for group, member in members:
        if group.name not in H_of:
            sums = _sums(store, group, device)
            H_of[group.name] = (
                hessian_from_sums(sums, store.n_tokens, PROMPT_ONLY),
                hessian_from_sums(sums, store.n_tokens, DECODE_ONLY),
            )
        Ws.append(_weights(skeleton, group.layer, member))
        H_ps.append(H_of[group.name][0])
        H_ds.append(H_of[group.name][1])
    return decode_shift(Ws, H_ps, H_ds, p.sparsity)


def _loss_targets(
    p: Params,
    store: HessianStore,
    losses: Path,
    members: dict[int, list[tuple[LinearGroup, str]]],
    units: list[int],
    sizes: list[int],
) -> tuple[list[float], list[float]]:
    """(each unit's normalised loss at ``sparsity``, the targets) from the loss table.

    A linear's loss is normalised by its energy ½·tr(W H Wᵀ), the loss of pruning it whole, so each curve is the
    relative output error ‖(W − Ŵ)X‖²/‖WX‖² of one linear. Raw losses carry each layer's activation scale (the
    residual stream grows with depth), so their sum would spend the whole spread protecting the last layers;
    the next layer's norm divides that scale out, and what reaches it is the relative error."""
    key = table_key(p, store, resolve_kernel(p.prune.kernel, False))
    curves = read_curves(losses, p.pruner, key)
    grid = p.losses.sparsities
    unit_curves = []
    for i in units:
        curve = [0.0] * len(grid)
        for _, m in members[i]:
            if (i, m) not in curves:
                raise RacError(f"loss table {str(losses)!r} lacks layer {i} {m}; rebuild it for this model")
            values, energy = curves[(i, m)]
            if energy > 0:  # a linear whose outputs are always 0 loses nothing, whatever it keeps
                curve = [c + v / energy for c, v in zip(curve, values, strict=True)]
        unit_curves.append(curve)
    targets = from_losses(grid, unit_curves, sizes, p.sparsity, p.prune.spread)
    return [pchip(grid, c, [p.sparsity])[0] for c in unit_curves], targets
