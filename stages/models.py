"""Loading models and tokenizers (HF id or local dir), fingerprints, and prunable linear groups."""

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import snapshot_download
from safetensors import safe_open
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)
from transformers.pytorch_utils import Conv1D
from transformers.utils import logging as transformers_logging

from stages.errors import RacError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
THINK = "<think>"
FIX_SAVE = "re-save it with save_pretrained (model and tokenizer), or point `model` at a whole model directory"


def looks_local(model: str) -> bool:
    """A path rather than a hub id: not of the form owner/name, or its first part exists here (``data/x``)."""
    return not _HUB_ID.match(model) or model.startswith((".", "/", "~")) or Path(model.split("/")[0]).exists()


def model_dir(model: str) -> Path:
    """The checked local directory of ``model``: itself, or its hub snapshot; every broken state is one line.

    The one reader of model directories: every stage goes through it before loading anything.
    """
    path = _locate(model)
    check_model_dir(path)
    return path


def model_ref(model: str, revision: str | None) -> str:
    """``model`` pinned at ``revision`` (``owner/name@revision``) for a hub id; a local directory as is."""
    return f"{model}@{revision}" if revision is not None and not looks_local(model) else model


def _locate(model: str) -> Path:
    """The local directory of ``model``: itself if it is a path, else its hub snapshot (config, weights, tokenizer)
    at the revision after ``@``, if any."""
    if not model:
        raise RacError("model is empty; set `model` in params.yaml to a model directory or a hub id")
    path = Path(model).expanduser()
    if not path.exists() and not looks_local(model.split("@")[0]):
        hub_id, _, revision = model.partition("@")
        try:
            path = Path(
                snapshot_download(
                    hub_id,
                    revision=revision or None,
                    allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"],
                )
            )
        except (OSError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise RacError(
                f"model {model!r} is not a local directory and the hub did not serve it ({first}); "
                "check the path or hub id, or download it first"
            ) from err
    _require_dir(path)
    return path


def _require_dir(path: Path) -> None:
    if not path.is_dir():
        what = (
            "is a file, not a directory; point `model` at the folder that holds config.json"
            if path.exists()
            else "does not exist; set `model` in params.yaml to a model directory or a hub id"
        )
        raise RacError(f"model directory {str(path)!r} {what}")


def check_model_dir(path: Path) -> None:
    """``path`` holds a loadable config, whole and finite safetensors weights for every parameter, and a tokenizer;
    else a one-line error."""
    where = f"model directory {str(path)!r}"
    _require_dir(path)
    config = _read_json(path / "config.json", where)
    if not isinstance(config, dict) or "model_type" not in config:
        raise RacError(f"{where}: config.json has no model_type; {FIX_SAVE}")
    try:
        AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise RacError(f"{where}: config.json does not load ({str(err).splitlines()[0]}); {FIX_SAVE}") from err
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        raise RacError(f"{where} has no *.safetensors weights; {FIX_SAVE}")
    for file in weights:
        _check_safetensors(file)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index, where)
        shards = set(weight_map.get("weight_map", {}).values()) if isinstance(weight_map, dict) else set()
        missing = sorted(s for s in shards if not (path / s).is_file())
        if missing:
            raise RacError(f"{where} lacks weight shards {missing[:3]} named by its index; download them again")
    _read_json(path / "tokenizer.json", where)
    check_weights(path, weights)


# (model directory, (file, size, mtime) of each safetensors file) already checked by this process
_WEIGHTS_CHECKED: set[tuple[str, tuple[tuple[str, int, int], ...]]] = set()
# Each float type's exponent bits: all ones is an infinity or a NaN. Testing them on an integer view a block at a
# time runs ~5x faster on a CPU than torch.isfinite (benchmarks/weight_check.py).
_EXPONENT_BITS = {
    torch.bfloat16: (torch.int16, 0x7F80),
    torch.float16: (torch.int16, 0x7C00),
    torch.float32: (torch.int32, 0x7F800000),
    torch.float64: (torch.int64, 0x7FF0000000000000),
}


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether no element of the floating-point ``tensor`` (on the CPU) is NaN or infinite."""
    if tensor.dtype not in _EXPONENT_BITS:  # float8 types, which torch.isfinite does not take
        return bool(torch.isfinite(tensor.float()).all())
    int_type, mask = _EXPONENT_BITS[tensor.dtype]
    bits = tensor.reshape(-1).view(int_type)
    block = 1 << 20
    return not any(((bits[i : i + block].numpy() & mask) == mask).any() for i in range(0, bits.numel(), block))


def check_weights(path: Path, files: list[Path]) -> None:
    """``files`` hold every parameter ``path``'s architecture declares (a packed ``weight_packed`` stands for its
    ``weight``) and every floating tensor in them is finite; else a one-line error naming the tensor. vLLM would
    serve an absent weight as zeros, and a NaN poisons every sum downstream, both without a word. Checked once per
    process for files of unchanged size and mtime."""
    key = (str(path.resolve()), tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files))
    if key in _WEIGHTS_CHECKED:
        return
    where = f"model directory {str(path)!r}"
    names: set[str] = set()
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            names.update(f.keys())
    transformers_logging.disable_progress_bar()
    try:
        with torch.device("meta"):  # the architecture's parameters, no memory; tied weights are named once
            skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    except (ValueError, KeyError, TypeError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise RacError(f"{where}: transformers cannot build a causal LM from its config ({first}); {FIX_SAVE}") from err
    absent = [n for n, _ in skeleton.named_parameters() if n not in names and f"{n}_packed" not in names]
    if absent:  # stored under other names? The walk's reading, through transformers' conversion mapping, decides
        from stages.layers import Checkpoint

        Checkpoint(skeleton, path, str(path))
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            stored = f.keys()
            for name in stored:
                tensor = f.get_tensor(name)
                if tensor.is_floating_point() and not all_finite(tensor):
                    raise RacError(
                        f"{where}: weight {name!r} in {file.name} holds NaN or infinite values; the checkpoint is "
                        "corrupt: download or export it again"
                    )
    _WEIGHTS_CHECKED.add(key)


def _read_json(file: Path, where: str) -> Any:
    if not file.is_file():
        raise RacError(f"{where} has no {file.name}; {FIX_SAVE}")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise RacError(f"{where}: {file.name} is not valid JSON ({err}); {FIX_SAVE}") from err


def _check_safetensors(file: Path) -> None:
    """The header parses and every tensor's bytes lie inside the file (a truncated download does not)."""
    size = file.stat().st_size
    broken = f"weights {str(file)!r} are truncated or not safetensors"
    with file.open("rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n <= 0 or 8 + n > size:
            raise RacError(f"{broken} ({size} bytes); {FIX_SAVE}")
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError) as err:
            raise RacError(f"{broken} (header: {err}); {FIX_SAVE}") from err
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__" and isinstance(t, dict)]
    if 8 + n + max(ends, default=0) > size:
        raise RacError(f"{broken}: tensors need {8 + n + max(ends)} bytes, the file has {size}; {FIX_SAVE}")


def load_tokenizer(model: str) -> PreTrainedTokenizerBase:
    """The tokenizer saved with ``model`` (whose whole directory is checked first)."""
    directory = model_dir(model)
    try:
        # Not AutoTokenizer: transformers 5 picks the tokenizer class from config.json's model_type
        # (Qwen2Tokenizer for a qwen2 model), whose byte-level pre-tokenizer would override the
        # saved tokenizer.json and drop the character tokenizer's spaces and newlines.
        return PreTrainedTokenizerFast.from_pretrained(directory)
    except Exception as err:  # the tokenizers library raises plain Exception for a malformed tokenizer.json
        raise RacError(f"cannot load the tokenizer of model {model!r}: {err}".splitlines()[0]) from err


def pad_id(model: str) -> int:
    """The id a layer walk pads batches of ``model`` with: the config's ``pad_token_id``, else 0. Padding is masked
    and never summed, so any id in the vocabulary does; the tokenizer is not loaded for it (a 262k vocabulary,
    Gemma 3's, keeps ~0.4 GB resident after it is dropped)."""
    pad = AutoConfig.from_pretrained(model_dir(model)).get_text_config().pad_token_id
    return int(pad) if pad is not None else 0


# Files that make up a saved tokenizer and chat template (never weights or the model config).
_TOKENIZER_FILES = (
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "chat_template*",
)


def tokenizer_files(model: str) -> list[Path]:
    """The tokenizer and chat-template files saved with ``model``, to be copied verbatim: re-saving them through
    transformers rewrites tokenizer_config.json in a form older versions cannot read."""
    directory = model_dir(model)
    return sorted({f for pattern in _TOKENIZER_FILES for f in directory.glob(pattern) if f.is_file()})


def load_model(model: str, device: torch.device) -> PreTrainedModel:
    """``model`` in float32 on ``device``, in eval mode; every weight must come from the checkpoint."""
    directory = model_dir(model)
    # A load of seconds needs no bar; without it a refusal below stays the one line on stderr.
    transformers_logging.disable_progress_bar()
    try:
        loaded, info = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, output_loading_info=True)
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise RacError(f"cannot load model {model!r}: {err}".splitlines()[0] + f"; {FIX_SAVE}") from err
    # transformers initialises absent or mis-shaped weights at random with only a log line: refuse that.
    absent = list(info.get("missing_keys") or []) + [str(k) for k in info.get("mismatched_keys") or []]
    if absent:
        raise RacError(f"model {model!r} lacks weights {absent[:3]} ({len(absent)} in all); {FIX_SAVE}")
    return loaded.to(device).eval()


# Config keys that bound a model's context, as vLLM reads them (the smallest wins), and the RoPE types whose
# ``factor`` vLLM does not apply again (their max_position_embeddings is already the scaled length).
_CONTEXT_KEYS = (
    "max_position_embeddings",
    "n_positions",
    "max_seq_len",
    "seq_length",
    "model_max_length",
    "max_target_positions",
    "max_sequence_length",
    "max_seq_length",
    "seq_len",
)
_PRESCALED_ROPE = ("default", "su", "longrope", "llama3", "yarn", "deepseek_yarn", "deepseek_llama_scaling")


def context_length(directory: Path) -> tuple[int, str] | None:
    """The most tokens (prompt plus completion) the model in ``directory`` takes, and the config key that says so,
    as vLLM derives it; None when its config names no length."""
    config = AutoConfig.from_pretrained(directory).get_text_config()
    found = [(getattr(config, k), k) for k in _CONTEXT_KEYS if isinstance(getattr(config, k, None), int)]
    if not found:
        return None
    length, key = min(found)
    rope = getattr(config, "rope_parameters", None) or {}
    scaled = isinstance(rope, dict) and rope.get("rope_type", "default") not in _PRESCALED_ROPE
    if scaled and isinstance(rope.get("factor"), int | float):
        length, key = int(length * rope["factor"]), f"{key} × rope factor {rope['factor']}"
    return length, key


def compute_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def file_digest(file: Path) -> str:
    """sha256 of ``file``'s bytes, read in 16 MB blocks."""
    digest = hashlib.sha256()
    with file.open("rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def identity(model: str) -> dict[str, Any]:
    """What the dense model is: the sha256 of each file it is made of (config, generation config, weights and
    their index, tokenizer and chat template). Retraining or re-converting a model at the same path changes it;
    moving or copying it does not."""
    directory = model_dir(model)
    files = [directory / "config.json", *sorted(directory.glob("*.safetensors")), *tokenizer_files(str(directory))]
    files += [
        f for f in (directory / "generation_config.json", directory / "model.safetensors.index.json") if f.is_file()
    ]
    return {"files": {f.name: file_digest(f) for f in sorted(files)}}


def fingerprint(model: str) -> str:
    """A short hash of ``identity(model)``: stores and traces record it, readers compare it."""
    blob = json.dumps(identity(model), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def vocab_hash(tokenizer: PreTrainedTokenizerBase) -> str:
    """Hash of the vocabulary: token ids mean the same thing under two tokenizers with equal hashes."""
    return hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()[:16]


def bos_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """``[BOS]`` where the tokenizer itself puts one before a text (its ``add_bos_token``: R1-Distill, Llama 3,
    the embedded model), else nothing: Qwen2.5 has no BOS, and SmolLM2's BOS is ``<|im_start|>``, a chat-turn
    token that its tokenizer never adds."""
    bos = tokenizer.bos_token_id
    plain, added = (tokenizer.encode("0", add_special_tokens=flag) for flag in (False, True))
    return [bos] if bos is not None and added[:1] == [bos] and plain[:1] != [bos] else []


def check_chat_template(tokenizer: PreTrainedTokenizerBase, model: str, required: bool) -> None:
    """One-line error when ``required`` and ``model``'s tokenizer has no chat template: an instruct model prompted
    with raw text answers badly, and nothing else would say why."""
    if required and not tokenizer.chat_template:
        raise RacError(
            f"model {model!r} has no chat template (tokenizer_config.json `chat_template` or chat_template.jinja); "
            "copy it from the original model, or set chat.require_template: false to prompt with raw text"
        )


def chat_messages(text: str, system_prompt: str) -> list[dict[str, str]]:
    """The chat turns of a prompt: ``system_prompt`` is ``default`` (the template's own system turn, if any),
    ``none`` (an empty system turn, which replaces a template's default such as Qwen2.5's), or a text."""
    user = {"role": "user", "content": text}
    if system_prompt == "default":
        return [user]
    return [{"role": "system", "content": "" if system_prompt == "none" else system_prompt}, user]


def encode_prompt(tokenizer: PreTrainedTokenizerBase, text: str, system_prompt: str) -> list[int]:
    """Token ids of a prompt as the model sees it: ``text`` as the user turn of the chat template (after the
    system turn ``chat_messages`` picks), the reply opened with ``<think>`` when the template knows it; the
    tokenizer's BOS (if it adds one) then ``text`` for a model without a template."""
    if not tokenizer.chat_template:
        return bos_ids(tokenizer) + tokenizer.encode(text, add_special_tokens=False)
    messages = chat_messages(text, system_prompt)
    rendered = str(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    # R1-Distill's template opens the reply with <think> itself; Qwen3's leaves it to the model, which may skip it.
    if THINK in tokenizer.chat_template and not rendered.rstrip().endswith(THINK):
        rendered += THINK + "\n"
    return tokenizer.encode(rendered, add_special_tokens=False)


def decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    """The stack of decoder layers: the ModuleList as long as ``num_hidden_layers``."""
    n_layers = model.config.num_hidden_layers
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            return module
    raise RacError(f"no ModuleList of {n_layers} decoder layers in {type(model).__name__}; add its layout to models.py")


# The modules rac compresses: a weight matrix applied to the last dimension of their input. GPT-2's Conv1D is a
# linear whose weight is stored transposed ([in, out]).
LINEAR_LIKE = (nn.Linear, Conv1D)


def weight_of(module: nn.Module) -> torch.Tensor:
    """W [out, in] of a linear-like module: a view of its weight, so writing into it writes the module's."""
    return module.weight.data.T if isinstance(module, Conv1D) else module.weight.data


# An expert's slice of a 3-D expert weight [E, out, in] inside a mixture-of-experts block is named
# ``<experts module>.<parameter>.<expert>``, e.g. ``mlp.experts.gate_up_proj.3``.
_EXPERT = re.compile(r"^(?P<owner>.*experts)\.(?P<param>\w+)\.(?P<e>\d+)$")


def expert_member(member: str) -> tuple[str, str, int] | None:
    """(experts module, 3-D parameter, expert index) of an expert member's name; None for a linear's."""
    m = _EXPERT.match(member)
    return (m["owner"], m["param"], int(m["e"])) if m else None


def member_weight(layer: nn.Module, member: str) -> torch.Tensor:
    """W [out, in] of ``member`` of a decoder layer (a linear-like module, or one expert of a 3-D expert weight):
    a view, so writing into it writes the model's weight."""
    expert = expert_member(member)
    if expert is None:
        return weight_of(layer.get_submodule(member))
    owner, param, e = expert
    return getattr(layer.get_submodule(owner), param).data[e]


@dataclass(frozen=True)
class LinearGroup:
    """Linears of one decoder layer that read the same input tensor, so they share one Hessian."""

    layer: int
    members: list[str]  # names relative to the decoder layer, e.g. "self_attn.q_proj"

    @property
    def name(self) -> str:
        return self.members[0]
