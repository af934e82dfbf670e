"""Hessian accumulation on a tiny real Qwen2: padding excluded, sums equal X·Xᵀ, prompt/decode kept apart; the
layer walk equals the model's own forward, and its stores equal a full forward's sums bitwise."""

import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import walk_sums as collect
from transformers import PreTrainedModel

from stages.hessians import run
from stages.layers import Skeleton, batches
from stages.models import decoder_layers, fingerprint, load_model
from stages.params import load_params
from stages.schemas import CALIBRATION, write_parquet
from stages.store import HessianStore

PAD = 0
# Sums of float32 activations from different kernels (batched+masked SDPA vs unbatched) differ by
# ~2-4e-7 of the array's largest entry here (a few float32 ulps); 1e-5 leaves a 25x margin and is
# still ~1000x smaller than the effect of a single pad token entering a sum (checked below).
REL_TOL = 1e-5

LENGTHS = [5, 17, 9, 30, 12, 3, 21]


def _sequences(seed: int = 0) -> tuple[list[list[int]], list[list[int]]]:
    """BOS then random non-special tokens; each sequence a prompt part then a decode part (some all-prompt)."""
    rng = random.Random(seed)
    ids = [[1] + [rng.randrange(4, 46) for _ in range(n - 1)] for n in LENGTHS]
    segs = [
        [0] * (n if i % 3 == 2 else n // 2) + [1] * (0 if i % 3 == 2 else n - n // 2) for i, n in enumerate(LENGTHS)
    ]
    return ids, segs


def _assert_close(got: torch.Tensor | np.ndarray, want: torch.Tensor | np.ndarray) -> None:
    got, want = torch.as_tensor(got).double(), torch.as_tensor(want).double()
    scale = float(want.abs().max())
    assert scale > 0
    err = float((got - want).abs().max())
    assert err <= REL_TOL * scale, f"max error {err:.3g} vs scale {scale:.3g}"


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> PreTrainedModel:
    return load_model(str(tiny_model_dir), torch.device("cpu"))


def test_batches_pad_right_longest_first() -> None:
    ids = [[1, 2], [3, 4, 5, 6], [7]]
    segs = [[0, 1], [0, 0, 1, 1], [0]]
    b, c = batches(ids, segs, 8, pad=9)  # 8 padded positions: 2 rows of width 4
    assert b.ids.tolist() == [[3, 4, 5, 6], [1, 2, 9, 9]]
    assert b.segment.tolist() == [[0, 0, 1, 1], [0, 1, -1, -1]]
    assert c.ids.tolist() == [[7]] and c.segment.tolist() == [[0]]


def test_padding_is_excluded(model: PreTrainedModel) -> None:
    ids, segs = _sequences()
    padded = collect(model, ids, segs, batch_tokens=256, pad=PAD)
    unpadded = collect(model, ids, segs, batch_tokens=1, pad=PAD)
    assert padded.keys() == unpadded.keys()
    n_prompt = sum(s.count(0) for s in segs)
    n_decode = sum(s.count(1) for s in segs)
    for key, (members, acc) in padded.items():
        assert members == unpadded[key][0]
        assert acc.n == {"prompt": n_prompt, "decode": n_decode}
        assert acc.n == unpadded[key][1].n
        for s in ("prompt", "decode"):
            _assert_close(acc.xtx[s], unpadded[key][1].xtx[s])


def test_tolerance_detects_one_extra_token(model: PreTrainedModel) -> None:
    """The tolerance above is tight enough: one more token in a sum breaks it in every group.

    The pad token itself cannot show this at layer 0: its embedding row is zero (``padding_idx``), so
    there a leaked pad would change only the counts, which the test above checks exactly.
    """
    ids, segs = _sequences()
    clean = collect(model, ids[:1], segs[:1], batch_tokens=1, pad=PAD)
    extra = collect(model, [[*ids[0], 7]], [[*segs[0], 1]], batch_tokens=1, pad=PAD)
    for key, (_, acc) in clean.items():
        diff = float((extra[key][1].xtx["decode"] - acc.xtx["decode"]).abs().max())
        assert diff > 100 * REL_TOL * float(acc.xtx["decode"].abs().max()), key


def _reference_sums(model: PreTrainedModel, ids: list[list[int]], segs: list[list[int]]) -> dict:
    """Σ x·xᵀ in float64 per (layer, first member) and segment, from pre-hooks on every member, unpadded."""
    layers = decoder_layers(model)
    groups = Skeleton(model.name_or_path, torch.device("cpu")).groups()
    inputs: dict[tuple[int, str], list[torch.Tensor]] = {}
    hooks = []
    for g in groups:
        for member in g.members:

            def grab(_m: torch.nn.Module, args: tuple[torch.Tensor, ...], key: tuple = (g.layer, member)) -> None:
                inputs.setdefault(key, []).append(args[0].detach()[0].double())  # [T, d]

            hooks.append(layers[g.layer].get_submodule(member).register_forward_pre_hook(grab))
    try:
        with torch.no_grad():
            for seq in ids:
                model(input_ids=torch.tensor([seq]))
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for g in groups:
        X = inputs[(g.layer, g.name)]
        for member in g.members[1:]:  # members share one input, so one Hessian serves them all
            assert all(torch.equal(a, b) for a, b in zip(X, inputs[(g.layer, member)], strict=True))
        out[(g.layer, g.name)] = {
            name: sum(x[torch.tensor(s) == seg].T @ x[torch.tensor(s) == seg] for x, s in zip(X, segs, strict=True))
            for name, seg in (("prompt", 0), ("decode", 1))
        }
    return out


def test_sums_equal_direct_xtx(model: PreTrainedModel) -> None:
    ids, segs = _sequences(1)
    reference = _reference_sums(model, ids, segs)
    got = collect(model, ids, segs, batch_tokens=192, pad=PAD)
    assert got.keys() == reference.keys()
    for key, (_, acc) in got.items():
        for s in ("prompt", "decode"):
            assert acc.xtx[s].shape == reference[key][s].shape
            _assert_close(acc.xtx[s], reference[key][s])


def test_first_layer_sum_from_embeddings_by_hand(model: PreTrainedModel) -> None:
    """Layer 0's q/k/v input is RMSNorm(embedding): computed with no hooks at all."""
    ids, segs = _sequences(2)
    layer0 = decoder_layers(model)[0]
    want = {"prompt": torch.zeros(64, 64, dtype=torch.float64), "decode": torch.zeros(64, 64, dtype=torch.float64)}
    with torch.no_grad():
        for seq, seg in zip(ids, segs, strict=True):
            X = layer0.input_layernorm(model.get_input_embeddings()(torch.tensor(seq))).double()  # [T, d]
            for name, seg_id in (("prompt", 0), ("decode", 1)):
                Xs = X[torch.tensor(seg) == seg_id]
                want[name] += Xs.T @ Xs
    got = collect(model, ids, segs, batch_tokens=256, pad=PAD)[(0, "self_attn.q_proj")][1]
    for s in ("prompt", "decode"):
        _assert_close(got.xtx[s], want[s])


def test_prompt_decode_counts(model: PreTrainedModel) -> None:
    ids = [[1, 5, 6, 7, 8, 9], [1, 10, 11], [1, 12, 13, 14]]
    segs = [[0, 0, 1, 1, 1, 1], [0, 0, 0], [1, 1, 1, 1]]
    got = collect(model, ids, segs, batch_tokens=128, pad=PAD)
    assert len(got) == 8  # 2 layers x 4 input groups
    for _, acc in got.values():
        assert acc.n == {"prompt": 5, "decode": 8}
    decode_only = collect(model, [[1, 5, 6]], [[1, 1, 1]], batch_tokens=1, pad=PAD)
    for _, acc in decode_only.values():
        assert acc.n == {"prompt": 0, "decode": 3}
        assert not acc.xtx["prompt"].any()
        assert acc.xtx["decode"].abs().max() > 0


def test_run_writes_a_store_for_the_model(
    tiny_model_dir: Path, params_file: Callable[..., Path], tmp_path: Path, model: PreTrainedModel
) -> None:
    ids, segs = _sequences(3)
    calib = tmp_path / "calibrate" / "rac.parquet"
    rows = [
        {"seq_id": i, "token_ids": t, "segment": s, "source": "rac"}
        for i, (t, s) in enumerate(zip(ids, segs, strict=True))
    ]
    write_parquet(rows, CALIBRATION, calib, {"source": "rac"})
    p = load_params(params_file(tiny_model_dir, {"activations": {"batch_tokens": 256}, "hessians": {"chunk": 16}}))
    out = tmp_path / "hessians" / "rac.zarr"
    run(p, calib, out, 1)
    assert sorted(x.name for x in out.parent.iterdir()) == ["rac.zarr"]  # no temp build left beside it
    store = HessianStore(out, fingerprint(str(tiny_model_dir)))
    assert store.attrs["source"] == "rac"
    assert store.attrs["model_id"] == str(tiny_model_dir)
    assert store.attrs["complete"] is True
    want = collect(model, ids, segs, batch_tokens=1, pad=PAD)
    groups = store.groups()
    assert [(g.layer, g.name) for g in groups] == sorted(want)
    n = {"prompt": sum(s.count(0) for s in segs), "decode": sum(s.count(1) for s in segs)}
    for g in groups:
        members, acc = want[(g.layer, g.name)]
        assert g.members == members
        assert g.n_tokens == n
        sums = store.sums(g)
        for s in ("prompt", "decode"):
            _assert_close(sums[s], acc.xtx[s])
            assert np.array_equal(sums[s], sums[s].T)  # mirrored from the stored upper triangle
        assert store.root[f"{g.key}/xtx_prompt"].chunks == (16, 16)
