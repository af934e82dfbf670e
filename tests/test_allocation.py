"""Per-layer sparsity allocation: the math on tiny tensors, then the loss table, ``allocate`` and prune on a tiny
real model with a real Hessian store."""

import itertools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import SHIPPED_PARAMS, assert_bad_input, load_weights, merge, save_tiny_qwen2

from stages import hessians, losses, prune
from stages.allocate import allocate
from stages.cli import main
from stages.errors import RacError
from stages.layers import Skeleton
from stages.models import fingerprint
from stages.params import Params, load_params
from stages.schemas import CALIBRATION, LOSSES, read_parquet, write_parquet
from stages.solvers import Options, hessian_from_sums, solve
from stages.solvers.allocation import (
    ALLOCATIONS,
    check_bounds,
    decode_shift,
    from_losses,
    from_scores,
    outlier_ratio,
    pchip,
    weighted_mean,
)
from stages.solvers.base import layer_loss
from stages.store import HessianStore

# Float sums of a few products: the weighted mean is the global sparsity to this, not merely close to it.
EXACT = 1e-12
GRID = [0.4, 0.5, 0.6, 0.7, 0.8]


def test_from_scores_exact_mean_within_spread_highest_score_keeps_most() -> None:
    sizes, scores = [100, 300, 200, 50], [0.1, 0.5, 0.2, 0.9]
    targets = from_scores(scores, sizes, 0.7, 0.1)
    assert abs(weighted_mean(targets, sizes) - 0.7) < EXACT
    assert max(abs(t - 0.7) for t in targets) == pytest.approx(0.1)  # the farthest unit uses the whole spread
    assert all(abs(t - 0.7) <= 0.1 + EXACT for t in targets)
    assert sorted(range(4), key=lambda i: targets[i]) == sorted(range(4), key=lambda i: -scores[i])
    assert from_scores([0.3] * 4, sizes, 0.7, 0.1) == [0.7] * 4
    assert from_scores(scores, sizes, 0.7, 0.0) == [0.7] * 4
    assert from_scores(scores, sizes, 0.0, 0.1) == [0.0] * 4  # nothing to prune: no target can go below 0


def test_from_losses_minimises_the_total_loss() -> None:
    sizes = [1000, 2000, 3000]
    curves = [[a * x**3 for x in GRID] for a in (1.0, 4.0, 0.5)]
    targets = from_losses(GRID, curves, sizes, 0.6, 0.1)
    assert abs(weighted_mean(targets, sizes) - 0.6) < EXACT
    assert all(0.5 - EXACT <= t <= 0.7 + EXACT for t in targets)

    def total(ts: list[float]) -> float:
        return sum(pchip(GRID, c, [t])[0] for t, c in zip(ts, curves, strict=True))

    best = np.inf
    for t0 in np.linspace(0.5, 0.7, 201):  # every feasible (t0, t1) on a 0.001 grid; t2 meets the mean
        for t1 in np.linspace(0.5, 0.7, 201):
            t2 = (0.6 * 6000 - t0 * 1000 - t1 * 2000) / 3000
            if 0.5 <= t2 <= 0.7:
                best = min(best, total([t0, t1, t2]))
    assert total(targets) <= best + 1e-9
    assert total(targets) < total([0.6, 0.6, 0.6])
    # Loss per pruned weight decides: the flattest curve for its size prunes most, the steepest keeps most.
    assert targets[1] <= targets[0] < targets[2] and targets[1] == pytest.approx(0.5)


def test_pchip_passes_through_the_points_monotone_with_a_continuous_slope() -> None:
    values = [0.01, 0.02, 0.06, 0.2, 0.5]
    assert pchip(GRID, values, GRID) == pytest.approx(values, abs=1e-15)
    xs = list(np.linspace(0.4, 0.8, 401))
    ys = pchip(GRID, values, xs)
    assert all(b >= a for a, b in itertools.pairwise(ys))
    eps = 1e-7
    for knot in GRID[1:-1]:  # left and right slopes agree at every inner knot
        left = (pchip(GRID, values, [knot])[0] - pchip(GRID, values, [knot - eps])[0]) / eps
        right = (pchip(GRID, values, [knot + eps])[0] - pchip(GRID, values, [knot])[0]) / eps
        assert left == pytest.approx(right, rel=1e-4)
    line = [2 * x + 1 for x in GRID]  # a straight line stays one
    assert pchip(GRID, line, [0.43, 0.77]) == pytest.approx([1.86, 2.54], abs=1e-12)


def test_from_losses_non_convex_curve_still_exact() -> None:
    sizes, curves = [10, 30], [[0.0, 0.5, 0.1, 0.9, 1.0], [0.1, 0.2, 0.3, 0.4, 0.5]]
    targets = from_losses(GRID, curves, sizes, 0.6, 0.15)
    assert abs(weighted_mean(targets, sizes) - 0.6) < EXACT
    assert all(0.45 - EXACT <= t <= 0.75 + EXACT for t in targets)


def test_allocation_bad_inputs() -> None:
    with pytest.raises(ValueError, match=r"sparsity=0.95 with spread=0.1 lets a layer reach 1.05, outside \[0, 1\)"):
        check_bounds(0.95, 0.1)
    with pytest.raises(ValueError, match=r"spread=0.1 lets a layer reach -0.05"):
        from_scores([1.0, 2.0], [1, 1], 0.05, 0.1)
    with pytest.raises(ValueError, match=r"do not cover \[0.75, 0.95\]"):
        from_losses(GRID, [[0.1] * 5], [1], 0.85, 0.1)
    with pytest.raises(ValueError, match="one score per unit"):
        from_scores([1.0], [1, 2], 0.5, 0.1)


def test_outlier_ratio_counts_entries_above_threshold_times_mean() -> None:
    W = torch.ones(2, 4)
    W[1, 2] = 10.0  # A's mean is (7 + 10) / 8; only this entry is above 3 × that
    assert outlier_ratio([W], [torch.ones(4)], 3.0) == 1 / 8
    assert outlier_ratio([W], [torch.full((4,), 7.0)], 3.0) == 1 / 8  # the scale of H cancels
    d = torch.tensor([1.0, 1.0, 1e-4, 1.0])  # the large weight sees an almost silent input: no outlier
    assert outlier_ratio([W], [d], 3.0) == 0.0
    assert outlier_ratio([W, torch.ones(3, 4)], [torch.ones(4)] * 2, 3.0) == 1 / 20  # pooled over the unit


def test_decode_shift_is_zero_for_equal_statistics_and_grows_with_the_shift() -> None:
    g = torch.Generator().manual_seed(0)
    W = torch.randn(8, 16, generator=g)
    X = torch.randn(16, 64, generator=g)
    H = 2 * X @ X.T / 64  # [in, in]
    assert decode_shift([W], [H], [H], 0.5) == 0.0
    assert decode_shift([W], [H], [3 * H], 0.5) == 0.0  # a scale is no shift
    scale = torch.linspace(0.2, 3.0, 16)
    small, large = scale**0.5, scale**2
    shifted = [decode_shift([W], [H], [H * s[:, None] * s[None, :]], 0.5) for s in (small, large)]
    assert 0 < shifted[0] < shifted[1]


# --- a tiny real model with a store and a loss table ---------------------------------------------------------


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A 4-layer tiny Qwen2, its rac store (prompt and decode tokens of different statistics) and loss table."""
    root = tmp_path_factory.mktemp("allocation")
    model = save_tiny_qwen2(root / "model", num_layers=4)
    raw = merge(
        yaml.safe_load(SHIPPED_PARAMS.read_text()),
        {
            "model": str(model),
            "activations": {"batch_tokens": 256},
            "hessians": {"chunk": 32},
            "losses": {"pruners": ["sparsegpt", "wanda"], "sparsities": GRID},
        },
    )
    g = torch.Generator().manual_seed(0)
    rows = [
        {
            "seq_id": i,
            "token_ids": torch.randint(4, 20, (12,), generator=g).tolist()
            + torch.randint(20, 46, (28,), generator=g).tolist(),
            "segment": [0] * 12 + [1] * 28,
            "source": "rac",
        }
        for i in range(8)
    ]
    calib, store, table = root / "rac.parquet", root / "rac.zarr", root / "rac-losses.parquet"
    write_parquet(rows, CALIBRATION, calib, {"source": "rac"})
    p = _params(root, raw, {})
    hessians.run(p, calib, store, 1)
    losses.run(p, store, table)
    return {"root": root, "raw": raw, "model": model, "calib": calib, "store": store, "table": table}


def _params(root: Path, raw: dict[str, Any], changes: dict[str, Any]) -> Params:
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(merge(raw, changes), sort_keys=False))
    return load_params(path)


@pytest.fixture
def params(setup: dict[str, Any], tmp_path: Path) -> Callable[..., Params]:
    return lambda changes: _params(tmp_path, setup["raw"], changes)


def _allocate(setup: dict[str, Any], p: Params) -> Any:
    skeleton = Skeleton(p.dense, torch.device("cpu"))
    store = HessianStore(setup["store"], fingerprint(p.dense))
    return allocate(p, skeleton, skeleton.groups(), store, setup["table"], torch.device("cpu"))


def _in_scope_sizes(model: Path, scope: str) -> dict[int, int]:
    """The in-scope weight count of each layer, counted from the checkpoint's tensors."""
    sizes: dict[int, int] = {}
    for name, w in load_weights(model).items():
        if name.startswith("model.layers.") and name.endswith("proj.weight"):
            kind = "attn" if ".self_attn." in name else "mlp"
            if scope in ("all", kind):
                layer = int(name.split(".")[2])
                sizes[layer] = sizes.get(layer, 0) + w.numel()
    return sizes


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
@pytest.mark.parametrize("scope", ["all", "mlp", "attn"])
@pytest.mark.parametrize("method", ALLOCATIONS)
def test_weighted_mean_is_the_global_sparsity(
    setup: dict[str, Any], params: Callable[..., Params], method: str, scope: str, pattern: str
) -> None:
    sparsity = 0.5 if pattern == "2:4" else 0.6
    changes = {"sparsity": sparsity, "prune": {"allocation": method, "scope": scope, "pattern": pattern}}
    if pattern != "unstructured" and method != "uniform":
        with pytest.raises(RacError, match=f"prune.allocation='{method}' gives layers different sparsities"):
            params(changes)
        changes["prune"]["spread"] = 0.0  # no spread: every layer at N/M, which the pattern allows
    a = _allocate(setup, params(changes))
    expected = _in_scope_sizes(setup["model"], scope)
    assert a.units == [0, 1, 2, 3] and a.sizes == [expected[i] for i in a.units]
    targets = [a.targets[i] for i in a.units]
    assert abs(weighted_mean(targets, a.sizes) - sparsity) < EXACT
    assert all(abs(t - sparsity) <= 0.1 + EXACT for t in targets)
    if method != "uniform" and pattern == "unstructured":
        assert len(set(targets)) == 4 and len(a.scores) == 4  # really non-uniform
    else:
        assert targets == [sparsity] * 4


@pytest.mark.parametrize("method", ["owl", "loss", "decode_shift"])
def test_overrides_win_and_layers_select(setup: dict[str, Any], params: Callable[..., Params], method: str) -> None:
    prune_params = {"allocation": method, "layers": "1-3", "overrides": {"0": 0.3, "2": 0.5}}
    a = _allocate(setup, params({"sparsity": 0.7, "prune": prune_params}))
    assert a.targets[0] == 0.3 and a.targets[2] == 0.5
    assert a.units == [1, 3]
    assert abs(weighted_mean([a.targets[i] for i in a.units], a.sizes) - 0.7) < EXACT
    assert a.targets[1] != a.targets[3]

    a = _allocate(setup, params({"sparsity": 0.7, "prune": {"allocation": method, "layers": "0-1"}}))
    assert a.units == [0, 1] and a.targets[2] == a.targets[3] == 0.0
    assert abs(weighted_mean([a.targets[0], a.targets[1]], a.sizes) - 0.7) < EXACT


def test_loss_table_equals_the_losses_computed_directly(
    setup: dict[str, Any], params: Callable[..., Params], tmp_path: Path
) -> None:
    table, meta = read_parquet(setup["table"], LOSSES, "loss table")
    assert meta["pruners"] == ["sparsegpt", "wanda"] and meta["sparsities"] == GRID and meta["source"] == "rac"
    rows = {(r["pruner"], r["layer"], r["module"], r["sparsity"]): r for r in table.to_pylist()}
    assert len(rows) == 2 * 4 * 7 * len(GRID)
    # The prune stage's own losses, uniform at a sparsity of the table: the very same numbers.
    p = params({"sparsity": 0.6})
    out = tmp_path / "pruned"
    prune.run(p, setup["store"], None, out)
    report = json.loads((out / "report.json").read_text())
    assert report["allocation"]["method"] == "uniform"
    for r in report["layers"]:
        assert rows[("sparsegpt", r["layer"], r["module"], 0.6)]["loss"] == r["loss"]
    # And from the store and the weights by hand: wanda's loss and the energy ½·tr(W H Wᵀ).
    store = HessianStore(setup["store"], None)
    weights = load_weights(setup["model"])
    for group in store.groups():
        H = hessian_from_sums(
            {s: torch.from_numpy(x) for s, x in store.sums(group).items()}, store.n_tokens, p.prune.mix
        )
        for m in group.members:
            W = weights[f"model.layers.{group.layer}.{m}.weight"]
            for s in (0.4, 0.8):
                direct = solve("wanda", W, H, Options(s, "unstructured", 128, p.prune.damp, "torch", None)).loss
                assert rows[("wanda", group.layer, m, s)]["loss"] == pytest.approx(direct, rel=1e-12)
            energy = 0.5 * float(((W.double() @ H.double()) * W.double()).sum())
            assert rows[("wanda", group.layer, m, 0.5)]["energy"] == pytest.approx(energy, rel=1e-6)
            assert layer_loss(W, torch.zeros_like(W), H) == pytest.approx(energy, rel=1e-6)


@pytest.mark.parametrize(
    "changes",
    [
        {"prune": {"allocation": "owl"}},
        {"prune": {"allocation": "loss"}},
        {"prune": {"allocation": "decode_shift", "scope": "mlp"}},
        {"pruner": "wanda", "prune": {"allocation": "loss"}},
        {"prune": {"allocation": "owl", "calibration": "sequential"}},
        {"prune": {"allocation": "decode_shift"}, "quant": {"bits": 4, "group_size": 32}},
    ],
    ids=["owl", "loss", "decode_shift-mlp", "wanda-loss", "owl-sequential", "decode_shift-sparse+4bit"],
)
def test_prune_meets_each_layer_target(
    setup: dict[str, Any], params: Callable[..., Params], tmp_path: Path, changes: dict[str, Any]
) -> None:
    p = params({"sparsity": 0.6, **changes})
    expected = _allocate(setup, p)
    out = tmp_path / "pruned"
    timings = prune.run(p, setup["store"], setup["calib"], out, setup["table"])
    assert timings["allocation_seconds"] > 0
    report = json.loads((out / "report.json").read_text())
    a = report["allocation"]
    assert a["method"] == p.prune.allocation and a["spread"] == 0.1 and a["units"] == [0, 1, 2, 3]
    assert a["targets"] == [expected.targets[i] for i in range(4)] and a["scores"] == expected.scores
    if p.quant.bits is None:
        assert a["achieved_sparsity_allocated"] == pytest.approx(0.6, abs=1e-4)
    per_layer = {r["layer"]: r for r in a["per_layer"]}
    for r in report["layers"]:
        if r["target"] == 0:
            continue
        assert r["target"] == expected.targets[r["layer"]]
        n = r["shape"][0] * r["shape"][1]
        if p.quant.bits is None:  # exactly round(target·n) weights pruned in every linear
            assert round(r["sparsity"] * n) == round(r["target"] * n), r
        else:  # rounding to the 4-bit grid zeroes some kept weights too
            assert r["sparsity"] >= r["target"] - 1 / n and r["bits"] == 4
    for i in range(4):
        assert per_layer[i]["target"] == expected.targets[i]
        tolerance = 1e-3 if p.quant.bits is None else 0.05  # quantization zeroes some kept weights
        assert per_layer[i]["achieved"] == pytest.approx(expected.targets[i], abs=tolerance)
    csv = (out / prune.ALLOCATION_CSV).read_text().splitlines()
    assert csv[0] == "layer,target,achieved,loss" and len(csv) == 5
    assert float(csv[1].split(",")[1]) == expected.targets[0]


def _prompt_store(p: Params, tmp_path: Path) -> Path:
    """A store of prompt tokens only, as the prompt source has."""
    rows = [{"seq_id": 0, "token_ids": list(range(4, 44)), "segment": [0] * 40, "source": "prompt"}]
    calib, store = tmp_path / "prompt.parquet", tmp_path / "prompt.zarr"
    write_parquet(rows, CALIBRATION, calib, {"source": "prompt"})
    hessians.run(p, calib, store, 1)
    return store


def test_decode_shift_on_a_store_without_decode_tokens_is_uniform(
    params: Callable[..., Params], tmp_path: Path
) -> None:
    p = params({"sparsity": 0.6, "prune": {"allocation": "decode_shift"}})
    prune.run(p, _prompt_store(p, tmp_path), None, tmp_path / "pruned")
    a = json.loads((tmp_path / "pruned" / "report.json").read_text())["allocation"]
    assert a["targets"] == [0.6] * 4 and a["scores"] == [0.0] * 4 and "no decode tokens" in a["note"]


def test_sequential_allocation_refuses_a_store_of_another_source(
    setup: dict[str, Any], params: Callable[..., Params], tmp_path: Path
) -> None:
    p = params({"sparsity": 0.6, "prune": {"allocation": "owl", "calibration": "sequential"}})
    with pytest.raises(RacError, match="of source 'prompt' but calibrates on 'rac'; pass the store of the same"):
        prune.run(p, _prompt_store(p, tmp_path), setup["calib"], tmp_path / "pruned")
    with pytest.raises(RacError, match=r"prune\.allocation='owl' reads a Hessian store: pass --hessians"):
        prune.run(p, None, setup["calib"], tmp_path / "pruned")
    assert not (tmp_path / "pruned").exists()


@pytest.mark.parametrize(
    ("changes", "needles"),
    [
        ({"sparsity": 0.5, "prune": {"allocation": "owl", "pattern": "2:4"}}, ["prune.allocation='owl'", "'2:4'"]),
        ({"sparsity": 0.95, "prune": {"allocation": "owl"}}, ["prune.spread=0.1", "1.05", "outside [0, 1)"]),
        ({"sparsity": 0.8, "prune": {"allocation": "loss"}}, ["losses.sparsities", "[0.7, 0.9]"]),
        ({"pruner": "magnitude", "prune": {"allocation": "loss"}}, ["pruner='magnitude'", "losses.pruners"]),
        ({"prune": {"allocation": "loss", "damp": 0.05}}, ["damp=0.01", "0.05", "rac losses"]),
    ],
    ids=["nm-non-uniform", "beyond-spread", "grid-too-short", "pruner-not-tabled", "table-of-other-damp"],
)
def test_bad_allocation_is_one_line(
    setup: dict[str, Any], tmp_path: Path, changes: dict[str, Any], needles: list[str]
) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(merge(setup["raw"], {"sparsity": 0.6, **changes}), sort_keys=False))
    out = tmp_path / "pruned"
    args = ["prune", "--params", str(path), "--hessians", str(setup["store"]), "--losses", str(setup["table"])]
    result = CliRunner().invoke(main, [*args, "--out", str(out)])
    assert_bad_input(result, *needles)
    assert not out.exists()
