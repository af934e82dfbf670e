"""Model loading, fingerprints and the grouping of linears by shared input, on tiny real HF models."""

import shutil
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_qwen2

from stages import toy
from stages.errors import RacError
from stages.layers import Skeleton
from stages.models import (
    bos_ids,
    decoder_layers,
    encode_prompt,
    fingerprint,
    identity,
    load_model,
    load_tokenizer,
    looks_local,
    model_dir,
    model_ref,
)

CPU = torch.device("cpu")
EXPECTED_GROUPS = [
    ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    ["self_attn.o_proj"],
    ["mlp.gate_proj", "mlp.up_proj"],
    ["mlp.down_proj"],
]


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_llama_dir"])
def test_linear_groups_per_layer(fixture: str, request: pytest.FixtureRequest) -> None:
    directory = request.getfixturevalue(fixture)
    model = load_model(str(directory), CPU)
    groups = Skeleton(str(directory), CPU).groups()  # probed on the meta device
    assert [(g.layer, g.members) for g in groups] == [(i, m) for i in range(2) for m in EXPECTED_GROUPS]
    assert [g.name for g in groups[:4]] == [m[0] for m in EXPECTED_GROUPS]
    # Every linear of every decoder layer is in exactly one group.
    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        linears = sorted(n for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear))
        assert sorted(n for g in groups if g.layer == i for n in g.members) == linears


def test_decoder_layers_is_the_stack(tiny_model_dir: Path) -> None:
    model = load_model(str(tiny_model_dir), CPU)
    assert decoder_layers(model) is model.model.layers
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32


def test_fingerprint_stable_for_same_dir(tiny_model_dir: Path) -> None:
    first = fingerprint(str(tiny_model_dir))
    assert fingerprint(str(tiny_model_dir)) == first
    assert len(first) == 16 and all(c in "0123456789abcdef" for c in first)


def test_fingerprint_covers_weight_values_not_the_path(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A model retrained or re-converted in place (same config and shapes, other values) is another model; a copy
    of the same files elsewhere is the same one."""
    shutil.copytree(tiny_model_dir, tmp_path / "copy")
    assert fingerprint(str(tmp_path / "copy")) == fingerprint(str(tiny_model_dir))
    model = load_model(str(tiny_model_dir), CPU)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] += 1
    model.save_pretrained(tmp_path / "copy")
    assert fingerprint(str(tmp_path / "copy")) != fingerprint(str(tiny_model_dir))
    assert set(identity(str(tiny_model_dir))["files"]) == {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    }


def test_fingerprint_differs_for_other_config(tiny_model_dir: Path, tmp_path: Path) -> None:
    save_tiny_qwen2(tmp_path, intermediate_size=192)  # the only difference from tiny_model_dir (128)
    assert fingerprint(str(tmp_path)) != fingerprint(str(tiny_model_dir))


def test_fingerprint_differs_across_families(tiny_model_dir: Path, tiny_llama_dir: Path) -> None:
    assert fingerprint(str(tiny_llama_dir)) != fingerprint(str(tiny_model_dir))


@pytest.mark.parametrize("ref", ["data/nope", "/tmp/does/not/exist", "./nope", "not a model", "tests/nope"])
def test_model_dir_rejects_missing_paths(ref: str) -> None:
    # "tests/nope" looks like a hub id, but its first part is a folder here: a local path that does not exist.
    with pytest.raises(RacError, match="does not exist"):
        model_dir(ref)


def test_model_dir_rejects_a_file(tmp_path: Path) -> None:
    file = tmp_path / "config.json"
    file.write_text("{}")
    with pytest.raises(RacError, match=r"is a file, not a directory"):
        model_dir(str(file))


def test_model_dir_accepts_a_model_directory(tiny_model_dir: Path) -> None:
    assert model_dir(str(tiny_model_dir)) == tiny_model_dir


def test_hub_ids_are_told_from_paths() -> None:
    assert not looks_local("org/name")
    assert not looks_local("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B")
    assert looks_local("data/embedded") and looks_local("./x/y") and looks_local("a/b/c") and looks_local("name")


def test_load_model_missing_path_is_rac_error() -> None:
    with pytest.raises(RacError, match="data/nope"):
        load_model("data/nope", CPU)


def test_encode_prompt_prepends_bos(tiny_model_dir: Path) -> None:
    tokenizer = load_tokenizer(str(tiny_model_dir))
    ids = encode_prompt(tokenizer, "12+3=\n", "default")
    assert ids[0] == tokenizer.bos_token_id
    assert ids[1:] == toy.build_tokenizer().encode("12+3=\n", add_special_tokens=False)
    assert len(ids) == 1 + len("12+3=\n")  # character-level tokenizer: one token per character


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_llama_dir"])
@pytest.mark.parametrize("text", ["12+345=\n", "2+5+0=07 1+3 7\n#### 417", "the cat sees a dog. then"])
def test_load_tokenizer_encodes_like_the_saved_one(fixture: str, text: str, request: pytest.FixtureRequest) -> None:
    tokenizer = load_tokenizer(str(request.getfixturevalue(fixture)))
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert ids == toy.build_tokenizer().encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text


_USER = "{{ bos_token }}{% for m in messages %}<|user|>{{ m['content'] }}{% endfor %}"
CHAT_TEMPLATES = {
    # R1-Distill style: the generation prompt opens the reply with <think> itself.
    "opens_think": _USER + "{% if add_generation_prompt %}<|assistant|><think>\n{% endif %}",
    # Qwen3 style: <think> appears in the template, but the generation prompt leaves it to the model.
    "knows_think": _USER + "{% if add_generation_prompt %}<|assistant|>{% endif %}{% if false %}<think>{% endif %}",
    "no_think": _USER + "{% if add_generation_prompt %}<|assistant|>{% endif %}",
}


@pytest.mark.parametrize(("template", "think"), [("opens_think", True), ("knows_think", True), ("no_think", False)])
def test_encode_prompt_applies_the_chat_template(
    template: str, think: bool, tmp_path: Path, tiny_model_dir: Path
) -> None:
    shutil.copytree(tiny_model_dir, tmp_path, dirs_exist_ok=True)  # a whole model directory, then its tokenizer
    saved = toy.build_tokenizer()
    saved.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>", "<think>"]})
    saved.chat_template = CHAT_TEMPLATES[template]
    saved.save_pretrained(tmp_path)
    tokenizer = load_tokenizer(str(tmp_path))  # the template travels with the saved tokenizer
    user, assistant, think_id = tokenizer.convert_tokens_to_ids(["<|user|>", "<|assistant|>", "<think>"])
    chars = toy.build_tokenizer()
    expected = [tokenizer.bos_token_id, user, *chars.encode("12+3=", add_special_tokens=False), assistant]
    if think:
        expected += [think_id, *chars.encode("\n", add_special_tokens=False)]  # <think> once, never twice
    assert encode_prompt(tokenizer, "12+3=", "default") == expected


def test_bos_only_where_the_tokenizer_adds_one(tiny_model_dir: Path) -> None:
    with_bos = load_tokenizer(str(tiny_model_dir))
    assert bos_ids(with_bos) == [with_bos.bos_token_id]
    without = toy.build_tokenizer()  # a BOS token the tokenizer never adds (SmolLM2's <|im_start|> is one)
    without.backend_tokenizer.post_processor = None
    assert without.bos_token_id is not None and bos_ids(without) == []
    assert encode_prompt(without, "1+2=", "default") == without.encode("1+2=", add_special_tokens=False)


# Qwen2.5's shape: a default system turn unless the messages bring one.
SYSTEM_DEFAULT = (
    "{% if messages[0]['role'] != 'system' %}<|s|>be brief.{% endif %}"
    "{% for m in messages %}{% if m['role'] == 'system' %}<|s|>{% else %}<|user|>{% endif %}{{ m['content'] }}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.mark.parametrize(
    ("system_prompt", "rendered"),
    [
        ("default", "<|s|>be brief.<|user|>1+2=<|assistant|>"),
        ("none", "<|s|><|user|>1+2=<|assistant|>"),
        ("think.", "<|s|>think.<|user|>1+2=<|assistant|>"),
    ],
)
def test_system_prompt_param(system_prompt: str, rendered: str) -> None:
    tokenizer = toy.build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|s|>", "<|user|>", "<|assistant|>"]})
    tokenizer.chat_template = SYSTEM_DEFAULT
    ids = encode_prompt(tokenizer, "1+2=", system_prompt)
    assert tokenizer.decode(ids) == rendered


def test_revision_pins_hub_ids_only() -> None:
    assert (
        model_ref("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", "abc123")
        == "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B@abc123"
    )
    assert model_ref("data/embedded", None) == "data/embedded"
    assert model_ref("org/name", None) == "org/name"


def test_revision_reaches_the_hub(monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path) -> None:
    calls = []

    def snapshot(repo_id: str, revision: str | None, allow_patterns: list[str]) -> str:
        calls.append((repo_id, revision))
        return str(tiny_model_dir)

    monkeypatch.setattr("stages.models.snapshot_download", snapshot)
    assert model_dir("org/name@v1.0") == tiny_model_dir
    assert model_dir("org/name") == tiny_model_dir
    assert calls == [("org/name", "v1.0"), ("org/name", None)]
