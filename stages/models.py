"""Loading models and tokenizers (HF id or local dir), fingerprints, and prunable linear groups."""

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

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

from stages.errors import RacError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
THINK = "<think>"


def check_model_ref(model: str) -> str:
    """``model`` if it is an existing directory or looks like a hub id; else a one-line error."""
    if model and Path(model).is_dir():
        return model
    if Path(model).exists() or not _HUB_ID.match(model) or model.startswith(("data/", "./", "../")):
        raise RacError(f"model path {model!r} is not a model directory; set `model` in params.yaml to a dir or hub id")
    return model


def load_tokenizer(model: str) -> PreTrainedTokenizerBase:
    """The tokenizer saved with ``model``."""
    try:
        # Not AutoTokenizer: transformers 5 picks the tokenizer class from config.json's model_type
        # (Qwen2Tokenizer for a qwen2 model), whose byte-level pre-tokenizer would override the
        # saved tokenizer.json and drop the character tokenizer's spaces and newlines.
        return PreTrainedTokenizerFast.from_pretrained(model_dir(model))
    except OSError as err:
        raise RacError(f"cannot load a tokenizer from model {model!r}: {err}".splitlines()[0]) from err


def load_model(model: str, device: torch.device) -> PreTrainedModel:
    """``model`` in float32 on ``device``, in eval mode."""
    try:
        loaded = AutoModelForCausalLM.from_pretrained(check_model_ref(model), dtype=torch.float32)
    except OSError as err:
        raise RacError(f"cannot load model {model!r}: {err}".splitlines()[0]) from err
    return loaded.to(device).eval()


def compute_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def model_dir(model: str) -> Path:
    """The local directory of ``model``: itself, or the hub snapshot of its config and weights."""
    if Path(check_model_ref(model)).is_dir():
        return Path(model)
    return Path(snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))


def fingerprint(model: str) -> str:
    """Hash of the architecture config, every weight's name and shape, and the vocabulary."""
    directory = model_dir(model)
    volatile = {"transformers_version", "_name_or_path", "dtype", "torch_dtype"}
    config = {k: v for k, v in AutoConfig.from_pretrained(directory).to_dict().items() if k not in volatile}
    shapes = []
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            shapes += [(key, f.get_slice(key).get_shape()) for key in f.keys()]  # noqa: SIM118
    vocab = sorted(load_tokenizer(str(directory)).get_vocab().items())
    blob = json.dumps([config, sorted(shapes), vocab], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def vocab_hash(tokenizer: PreTrainedTokenizerBase) -> str:
    """Hash of the vocabulary: token ids mean the same thing under two tokenizers with equal hashes."""
    return hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()[:16]


def bos_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """``[BOS]``, or nothing for a tokenizer without one."""
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


def encode_prompt(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of a prompt as the model sees it: ``text`` as the user turn of the chat template, the reply
    opened with ``<think>`` when the template knows it; BOS then ``text`` for a model without a template."""
    if not tokenizer.chat_template:
        return bos_ids(tokenizer) + tokenizer.encode(text, add_special_tokens=False)
    messages = [{"role": "user", "content": text}]
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


@dataclass(frozen=True)
class LinearGroup:
    """Linears of one decoder layer that read the same input tensor, so they share one Hessian."""

    layer: int
    members: list[str]  # names relative to the decoder layer, e.g. "self_attn.q_proj"

    @property
    def name(self) -> str:
        return self.members[0]


@torch.no_grad()
def linear_groups(model: PreTrainedModel) -> list[LinearGroup]:
    """Group each decoder layer's linears by the input tensor they receive in a probe forward pass."""
    layers = decoder_layers(model)
    seen: dict[tuple[int, int], list[str]] = {}
    inputs: list[torch.Tensor] = []  # held so that no id() is reused while probing
    hooks = []
    for i, layer in enumerate(layers):
        for name, module in layer.named_modules():
            if isinstance(module, nn.Linear):

                def record(_m: nn.Module, args: tuple[torch.Tensor, ...], i: int = i, name: str = name) -> None:
                    inputs.append(args[0])
                    seen.setdefault((i, id(args[0])), []).append(name)

                hooks.append(module.register_forward_pre_hook(record))
    try:
        probe = torch.tensor([[model.config.bos_token_id or 0] * 2], device=model.device)
        model(input_ids=probe)
    finally:
        for hook in hooks:
            hook.remove()
    return [LinearGroup(layer=i, members=members) for (i, _), members in seen.items()]
