"""One engine for walking a model one decoder layer at a time (hessians, and prune in sequential mode).

Reads: the dense model's config and safetensors files, one module's tensors at a time; never the whole model.
Writes: nothing it keeps; the activations that spill past ``activations.memory_gb`` go to a scratch folder
that is removed when the walk ends, whether it succeeded or failed.

The model is built on the meta device (structure, no weights). The calibration batches are embedded once; then
for each decoder layer i only layer i's weights are loaded (by name, from the safetensors files), the layer runs
once on the cached inputs of every batch, hooks on its linears see their inputs, and its outputs replace the
inputs in the cache. The arguments a layer gets besides its hidden states (rotary embeddings, attention mask,
position ids) are captured from the model's own forward, run on the cached hidden states with its decoder layers
swapped for probes: they are exactly what the model passes, for any family that builds them in its forward.

Activations are float32, as the layers run (``load`` casts weights to float32 like ``models.load_model``):
caching them in bf16 would change the next layer's inputs, and dense-mode stores would no longer equal a
full forward pass's.
"""

import contextlib
import copy
import functools
import json
import logging
import resource
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import (
    WeightConverter,
    WeightRenaming,
    dot_natural_key,
    rename_source_key,
    revert_weight_conversion,
)
from transformers.utils import logging as transformers_logging

from stages.errors import RacError
from stages.models import FIX_SAVE, LINEAR_LIKE, LinearGroup, decoder_layers, expert_member, member_weight, model_dir
from stages.schemas import SEGMENT_IDS, tmp_sibling

log = logging.getLogger(__name__)

FP32 = 4  # bytes per cached activation and per accumulated sum


@dataclass(frozen=True)
class Batch:
    """Right-padded token ids [B, T] and per-token segment ids [B, T] (-1 on padding)."""

    ids: torch.Tensor
    segment: torch.Tensor

    @property
    def attention_mask(self) -> torch.Tensor:
        return (self.segment >= 0).long()  # [B, T]


def batches(ids: list[list[int]], segments: list[list[int]], batch_tokens: int, pad: int) -> list[Batch]:
    """Right-padded batches, longest first, each holding at most ``batch_tokens`` padded positions (a longer
    sequence goes alone)."""
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    out: list[Batch] = []
    start = 0
    while start < len(order):
        width = len(ids[order[start]])
        rows = order[start : start + max(1, batch_tokens // max(width, 1))]
        batch_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        batch_seg = torch.full((len(rows), width), -1, dtype=torch.long)
        for r, i in enumerate(rows):
            batch_ids[r, : len(ids[i])] = torch.tensor(ids[i])
            batch_seg[r, : len(segments[i])] = torch.tensor(segments[i])
        out.append(Batch(batch_ids, batch_seg))
        start += len(rows)
    return out


class Accumulator:
    """Σ x·xᵀ per segment over the valid (unpadded) tokens that reach one input group; a forward pre-hook."""

    def __init__(self, d: int, device: torch.device) -> None:
        self.xtx = {s: torch.zeros(d, d, dtype=torch.float32, device=device) for s in SEGMENT_IDS}
        self.n = dict.fromkeys(SEGMENT_IDS, 0)
        self.segment: torch.Tensor | None = None  # [B, T] per-token segment id, -1 on padding

    def __call__(self, _module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        assert self.segment is not None
        X = args[0]  # [B, T, d], or [B·T, d] inside a mixture-of-experts block (Qwen2-MoE's shared expert)
        self.add(X, self.segment.reshape(X.shape[:-1]))

    def add(self, X: torch.Tensor, segment: torch.Tensor) -> None:
        """Add the rows of X [..., d] by their segment ids [...] (-1: padding, never summed)."""
        X = X.float()
        for name, seg_id in SEGMENT_IDS.items():
            Xs = X[segment == seg_id]  # [n, d]
            self.xtx[name].addmm_(Xs.T, Xs)
            self.n[name] += Xs.shape[0]


def moe_parts(layer: nn.Module) -> tuple[dict[str, nn.Module], set[str]]:
    """A decoder layer's expert modules (holding 3-D weights [E, out, in], one slice per expert), by name, and its
    routers: the modules of a mixture-of-experts block that hold weights themselves (the router, Qwen2-MoE's
    shared-expert gate), which are never compressed. A shared expert (an MLP inside the block) is ordinary."""
    experts = {
        n: m
        for n, m in layer.named_modules()
        if n.endswith("experts") and any(w.dim() == 3 for w in m.parameters(recurse=False))
    }
    routers: set[str] = set()
    for name in experts:
        block, _, _ = name.rpartition(".")
        parent = layer.get_submodule(block)
        for child, module in parent.named_children():
            if module is not experts[name] and next(module.parameters(recurse=False), None) is not None:
                routers.add(f"{block}.{child}".lstrip("."))
    return experts, routers


class ExpertTap:
    """Σ x·xᵀ per expert of one experts module over exactly the tokens routed to it: the module's eager forward
    is watched (a torch function mode while it runs) for ``F.linear`` on one expert's slice of a 3-D weight; that
    call's rows are the tokens the router sent to that expert, in the order the eager loop gathers them
    (top-k slot, then token), so each row's segment id is known."""

    def __init__(self, module: nn.Module, name: str, accumulators: dict[str, Accumulator]) -> None:
        self.module, self.name, self.accumulators = module, name, accumulators
        self.params = {id(w): n for n, w in module.named_parameters(recurse=False) if w.dim() == 3}
        self.rows: dict[int, torch.Tensor] = {}  # expert -> flat token index of each row it receives
        self.hidden: torch.Tensor | None = None  # [N, d] the tokens entering the module
        self.segment: torch.Tensor | None = None  # [N] their segment ids
        self.mode: _LinearWatch | None = None
        self.seen: set[int] = set()  # experts whose first linear ran in this forward
        self.handles = [
            module.register_forward_pre_hook(self._enter, with_kwargs=True),
            module.register_forward_hook(self._exit, always_call=True),
        ]

    def _enter(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden, top_k_index = (list(args) + list(kwargs.values()))[:2]  # [N, d], [N, k]
        batch_segment = next(iter(self.accumulators.values())).segment
        assert batch_segment is not None
        self.hidden, self.segment = hidden, batch_segment.reshape(-1)  # [N]
        self.rows = {e: torch.where((top_k_index == e).T)[1] for e in range(self.module.num_experts)}
        self.seen.clear()
        self.mode = _LinearWatch(self)
        self.mode.__enter__()

    def _exit(self, *_: Any) -> None:
        if self.mode is not None:
            self.mode.__exit__(None, None, None)
            self.mode = None

    def linear(self, X: torch.Tensor, weight: torch.Tensor) -> None:
        """One ``F.linear(X [n, in], weight)`` inside the module: sum it if ``weight`` is an expert's slice."""
        base = weight._base
        if base is None or id(base) not in self.params:
            return
        e = (weight.storage_offset() - base.storage_offset()) // base.stride(0)
        rows = self.rows[e]
        assert self.hidden is not None and self.segment is not None
        first = e not in self.seen  # the expert's first linear reads the routed tokens themselves
        self.seen.add(e)
        if X.shape[0] != rows.numel() or (first and not torch.equal(X, self.hidden[rows])):
            raise RacError(
                f"experts {self.name}: expert {e} was given rows that are not the tokens routed to it; its forward "
                "is not the eager loop rac reads"
            )
        acc = self.accumulators.get(f"{self.name}.{self.params[id(base)]}.{e}")
        if acc is not None:
            acc.add(X, self.segment[rows])


class _LinearWatch(TorchFunctionMode):
    """Reports every ``F.linear`` call to its tap, then runs it unchanged."""

    def __init__(self, tap: ExpertTap) -> None:
        super().__init__()
        self.tap = tap

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.linear:
            X, weight = (list(args) + [kwargs.get("input"), kwargs.get("weight")])[:2]
            self.tap.linear(X, weight)
        return func(*args, **kwargs)


def attach(layer: nn.Module, accumulators: dict[str, Accumulator]) -> list[Any]:
    """Hook every accumulator (by member name) onto decoder layer ``layer``: a pre-hook on a linear, an
    ``ExpertTap`` on each experts module; returns the handles to remove."""
    handles: list[Any] = []
    by_owner: dict[str, dict[str, Accumulator]] = {}
    for name, acc in accumulators.items():
        expert = expert_member(name)
        if expert is None:
            handles.append(layer.get_submodule(name).register_forward_pre_hook(acc))
        else:
            by_owner.setdefault(expert[0], {})[name] = acc
    for owner, accs in by_owner.items():
        handles += ExpertTap(layer.get_submodule(owner), owner, accs).handles
    return handles


class _Stop(Exception):
    """Raised by the probe of the wanted layer: nothing after it needs to run."""


class _Probe(nn.Module):
    """Stands in for decoder layer ``index``: passes hidden states on, and at ``stop`` records what it got."""

    def __init__(self, index: int, stop: int, sink: list[tuple[torch.Tensor, tuple, dict]]) -> None:
        super().__init__()
        self.index, self.stop, self.sink = index, stop, sink

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.index == self.stop:
            self.sink.append((hidden_states, args, kwargs))
            raise _Stop
        return hidden_states


def _zeros_like_input(hidden_states: torch.Tensor, *_args: Any, **_kwargs: Any) -> torch.Tensor:
    """An experts module's forward during the meta probe: an output of its input's shape."""
    return torch.zeros_like(hidden_states)


def _record(
    _module: nn.Module, args: tuple[torch.Tensor, ...], name: str, seen: dict[int, list[str]], inputs: list
) -> None:
    """Pre-hook of a probe: file linear ``name`` under the identity of its input tensor."""
    inputs.append(args[0])
    seen.setdefault(id(args[0]), []).append(name)


class Checkpoint:
    """The checkpoint's tensors under the names the model's modules use: each stored tensor is renamed, merged or
    split by transformers' own conversion mapping for the model (what ``from_pretrained`` applies)."""

    def __init__(self, model: PreTrainedModel, directory: Path, name: str) -> None:
        self.model = model
        self.files: dict[str, Path] = {}  # stored name -> file
        self.nbytes: dict[str, int] = {}  # stored name -> its bytes in the file
        for file in sorted(directory.glob("*.safetensors")):
            with file.open("rb") as f:
                header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
            header.pop("__metadata__", None)
            self.files.update(dict.fromkeys(header, file))
            self.nbytes.update({k: t["data_offsets"][1] - t["data_offsets"][0] for k, t in header.items()})
        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        self.converters = {pattern: c for c in converters for pattern in c.source_patterns}
        wanted = model.state_dict()
        prefix = model.base_model_prefix
        # target (first target of a split) -> [(stored name, converter source pattern or None)]
        self.sources: dict[str, list[tuple[str, str | None]]] = {}
        self.covers: dict[str, str] = {}  # every module tensor name a stored tensor gives -> its first target
        for key in sorted(self.files, key=dot_natural_key):
            target, pattern = rename_source_key(key, renamings, converters, prefix, wanted)
            if target not in wanted and key in wanted:
                target, pattern = key, None
            if target not in wanted:
                continue
            self.sources.setdefault(target, []).append((key, pattern))
            if pattern is None:
                self.covers[target] = target
            else:
                first = self.converters[pattern].target_patterns[0]
                for t in self.converters[pattern].target_patterns:
                    self.covers[target.replace(first, t)] = target
        # Tied weights (lm_head = embed_tokens) are one parameter, named once: what the checkpoint must hold.
        persistent = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers() if n in wanted}
        absent = sorted(n for n in persistent if n not in self.covers)
        # A converted tensor (experts merged from one stored tensor each) needs every one of its stored parts.
        converted = {t: wanted[t] for t, pairs in self.sources.items() if pairs[0][1] is not None}
        absent += sorted(k for k in revert_weight_conversion(model, converted) if k not in self.files)
        if absent:
            raise RacError(f"model {name!r} lacks weights {absent[:3]} ({len(absent)} in all); {FIX_SAVE}")

    def stored_bytes(self, names: list[str]) -> int:
        """Bytes of the stored tensors that give the module tensors ``names`` (what reading them holds)."""
        return sum(self.nbytes[k] for t in {self.covers[n] for n in names} for k, _ in self.sources[t])

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The module tensors ``names`` (full names in the model), as stored (dtype and all)."""
        firsts = sorted({self.covers[n] for n in names})
        stored = self._stored([k for t in firsts for k, _ in self.sources[t]])
        out: dict[str, torch.Tensor] = {}
        for target in firsts:
            pairs = self.sources[target]
            pattern = pairs[0][1]
            if pattern is None:
                out[target] = stored[pairs[0][0]]
                continue
            converter = copy.deepcopy(self.converters[pattern])
            for key, source_pattern in pairs:
                converter.add_tensor(target, key, source_pattern, stored[key])
            for t, value in converter.convert(target, model=self.model, config=self.model.config).items():
                out[t] = value[0] if isinstance(value, list) else value
        return {n: out[n] for n in names}

    def _stored(self, keys: list[str]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for file in sorted({self.files[k] for k in keys}):
            with safe_open(str(file), framework="pt") as f:
                out.update({k: f.get_tensor(k) for k in keys if self.files[k] == file})
        return out


def stored_layout(model: PreTrainedModel, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` (module names) in the checkpoint layout ``save_pretrained`` writes (transformers' conversion
    mapping reversed), so that every engine that reads the original checkpoints reads an export."""
    return revert_weight_conversion(model, state)


class Skeleton:
    """The model's structure on the meta device; weights come one module at a time from its safetensors files.

    Modules outside the decoder layers that hold tensors (final norm, learned positions, rotary tables) stay
    loaded for the whole walk (``resident``); the input embedding is loaded only while the batches are embedded."""

    def __init__(self, model: str, device: torch.device) -> None:
        self.directory = model_dir(model)
        self.device = device
        config = AutoConfig.from_pretrained(self.directory)
        transformers_logging.disable_progress_bar()
        with torch.device("meta"):
            # Eager experts: the grouped kernels have no float32 CPU path, and the eager loop is the reference.
            self.model = AutoModelForCausalLM.from_config(
                config, dtype=torch.float32, experts_implementation="eager"
            ).eval()
        self.architecture = type(self.model).__name__
        self.base = self.model.base_model
        self.layers = decoder_layers(self.model)
        self.layers_name = next(n for n, m in self.model.named_modules() if m is self.layers)
        self.checkpoint = Checkpoint(self.model, self.directory, model)
        self.dtypes: dict[str, torch.dtype] = {}  # the stored dtype of each tensor loaded so far
        table = self.model.get_input_embeddings()
        self.embedding_name = next(n for n, m in self.model.named_modules() if m is table)
        base_name = next(n for n, m in self.model.named_modules() if m is self.base)
        self.resident = [
            f"{base_name}.{n}".lstrip(".")
            for n, m in self.base.named_children()
            if m is not self.layers and m is not table and next(_tensors(m), None) is not None
        ]
        for name in self.resident:
            self.load(name)

    def tensors(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The module tensors ``names``, as stored (dtype and all)."""
        return self.checkpoint.read(names)

    def prefix(self, i: int) -> str:
        """The checkpoint name prefix of decoder layer ``i``, e.g. ``model.layers.3.``."""
        return f"{self.layers_name}.{i}."

    def load(self, name: str) -> nn.Module:
        """The submodule ``name`` with its checkpoint weights in float32 on the compute device; buffers that are
        computed, not saved (rotary frequencies, embedding scales), are computed by the model's own
        initialisation (``_init_weights``, as ``from_pretrained`` does)."""
        module = self.model.get_submodule(name)
        saved = list(module.state_dict())
        state = self.tensors([f"{name}.{k}".lstrip(".") for k in saved])
        self.dtypes.update({k: v.dtype for k, v in state.items()})
        module.to_empty(device=self.device)
        # Copied into the float32 tensors as stored: no second float32 copy of a large table is ever held.
        module.load_state_dict({k: state[f"{name}.{k}".lstrip(".")] for k in saved}, strict=True)
        for sub in module.modules():
            computed = [b for b, _ in sub.named_buffers(recurse=False) if b in sub._non_persistent_buffers_set]
            if not computed:
                continue
            for t in (
                *sub.parameters(recurse=False),
                *(b for n, b in sub.named_buffers(recurse=False) if n not in computed),
            ):
                t._is_hf_initialized = True  # loaded: the initialisation leaves it alone
            self.model._init_weights(sub)
        return module

    def release(self, module: nn.Module) -> None:
        """Drop ``module``'s weights (back to the meta device)."""
        module.to("meta")

    @contextlib.contextmanager
    def loaded(self, name: str) -> Iterator[nn.Module]:
        """``load(name)`` for the block, released after it."""
        module = self.load(name)
        try:
            yield module
        finally:
            self.release(module)

    @torch.no_grad()
    def capture(self, i: int, **inputs: Any) -> tuple[torch.Tensor, tuple, dict[str, Any]]:
        """What the model's forward on ``inputs`` passes decoder layer ``i``: (hidden states, args, kwargs)."""
        sink: list[tuple[torch.Tensor, tuple, dict]] = []
        parent_name, _, attr = self.layers_name.rpartition(".")
        parent = self.model.get_submodule(parent_name)
        setattr(parent, attr, nn.ModuleList(_Probe(k, i, sink) for k in range(len(self.layers))))
        try:
            self.base(**inputs, use_cache=False)
        except _Stop:
            pass
        finally:
            setattr(parent, attr, self.layers)
        if not sink:
            raise RacError(f"{type(self.model).__name__}'s forward never reached decoder layer {i}")
        return sink[0]

    @torch.no_grad()
    def groups(self) -> list[LinearGroup]:
        """Each decoder layer's linears grouped by the input tensor they receive, from a probe on the meta device
        (no weight is loaded)."""
        hidden = torch.zeros(1, 2, self.hidden_size(), device=self.device)
        out: list[LinearGroup] = []
        for i, layer in enumerate(self.layers):
            _, args, kwargs = self.capture(i, inputs_embeds=hidden)
            args, kwargs = tree_map(lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t, (args, kwargs))
            seen: dict[int, list[str]] = {}
            inputs: list[torch.Tensor] = []  # held so that no id() is reused while probing
            experts, routers = moe_parts(layer)
            hooks = [
                m.register_forward_pre_hook(functools.partial(_record, name=n, seen=seen, inputs=inputs))
                for n, m in layer.named_modules()
                if isinstance(m, LINEAR_LIKE) and n not in routers
            ]
            try:
                # Routing is data-dependent (no meta kernel): the probe skips the experts, whose groups are known.
                for m in experts.values():
                    m.forward = _zeros_like_input
                layer(hidden.to("meta"), *args, **kwargs)
            finally:
                for hook in hooks:
                    hook.remove()
                for m in experts.values():
                    del m.forward
            out += [LinearGroup(layer=i, members=members) for members in seen.values()]
            out += [
                LinearGroup(layer=i, members=[f"{name}.{param}.{e}"])
                for name, module in experts.items()
                for e in range(module.num_experts)
                for param, w in module.named_parameters(recurse=False)
                if w.dim() == 3
            ]
        return out

    def loading_bytes(self, name: str) -> int:
        """What loading module ``name`` holds at most: its float32 tensors and the stored ones they come from."""
        module = self.model.get_submodule(name)
        stored = self.checkpoint.stored_bytes([f"{name}.{k}" for k in module.state_dict()])
        return sum(t.numel() for t in _tensors(module)) * FP32 + stored

    def resident_bytes(self) -> int:
        """fp32 bytes of the modules outside the decoder layers kept loaded for the walk."""
        return sum(t.numel() for name in self.resident for t in _tensors(self.model.get_submodule(name))) * FP32

    def embedding_bytes(self) -> int:
        """The input embedding table's bytes while it is loaded to embed the batches (fp32 and stored copy)."""
        return self.loading_bytes(self.embedding_name)

    def hidden_size(self) -> int:
        return int(self.model.config.get_text_config().hidden_size)

    def layer_bytes(self) -> int:
        """The largest decoder layer's bytes while loaded (fp32 weights and the stored copy they come from)."""
        return max(self.loading_bytes(self.prefix(i).rstrip(".")) for i in range(len(self.layers)))

    def sums_bytes(self, groups: list[LinearGroup]) -> int:
        """fp32 bytes of the largest decoder layer's sums (two segments per group)."""
        per_layer: dict[int, int] = {}
        for g in groups:
            d = member_weight(self.layers[g.layer], g.name).shape[1]
            per_layer[g.layer] = per_layer.get(g.layer, 0) + len(SEGMENT_IDS) * FP32 * d * d
        return max(per_layer.values())


def _tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    """The parameters and buffers of ``module`` and its submodules."""
    yield from module.parameters()
    yield from module.buffers()


def peak_rss_gb() -> float:
    """This process's peak resident memory so far, in GB (Linux reports ru_maxrss in KB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def scratch_root(disk_dir: str | None, repo: Path) -> Path:
    """Where activation scratch folders go: ``activations.disk_dir``, else ``<repo>/.rac/activations``."""
    return Path(disk_dir).expanduser() if disk_dir else repo / ".rac" / "activations"


class ActivationCache:
    """Hidden states [B, T, d] per batch: the first batches that fit ``budget`` bytes in memory, the others in
    files under a scratch folder of ``root`` (named for this process, so ``rac clean`` can remove one a killed
    run left behind), removed by ``close``."""

    def __init__(self, budget: float, root: Path) -> None:
        self.budget = budget
        self.root = Path(root)
        self.memory: dict[int, torch.Tensor] = {}
        self.on_disk: set[int] = set()
        self.in_memory_bytes = 0
        self.disk_bytes = 0
        self.folder: Path | None = None

    def _scratch(self) -> Path:
        if self.folder is None:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                folder = tmp_sibling(self.root / "activations")
                folder.mkdir()
                self.folder = folder
            except OSError as err:
                raise RacError(
                    f"activations.disk_dir {str(self.root)!r} is not writable ({err.strerror}); "
                    "point it at a writable local folder, or raise activations.memory_gb"
                ) from err
        return self.folder

    def check_writable(self) -> None:
        """Create the scratch folder now, so a folder that can't be written fails before any forward pass."""
        self._scratch()

    def put(self, b: int, X: torch.Tensor) -> None:
        """Keep batch ``b``'s hidden states; a batch stays where it was first put (memory or disk)."""
        size = X.numel() * X.element_size()
        if b in self.memory or (b not in self.on_disk and self.in_memory_bytes + size <= self.budget):
            self.in_memory_bytes += size - (self.memory[b].numel() * FP32 if b in self.memory else 0)
            self.memory[b] = X
            return
        torch.save(X.cpu(), self._scratch() / f"{b}.pt")
        if b not in self.on_disk:
            self.disk_bytes += size
        self.on_disk.add(b)

    def get(self, b: int) -> torch.Tensor:
        if b in self.memory:
            return self.memory[b]
        assert self.folder is not None and b in self.on_disk
        return torch.load(self.folder / f"{b}.pt", weights_only=True)

    def close(self) -> None:
        """Drop the in-memory part and remove the scratch folder."""
        self.memory.clear()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            with contextlib.suppress(OSError):  # another run's folder is there
                self.root.rmdir()


def check_budget(budget: float, work: list[Batch], d: int) -> None:
    """The in-memory budget holds at least one batch of activations; else a one-line error with the minimum."""
    one = max(b.ids.numel() for b in work) * d * FP32
    if budget < one:
        raise RacError(
            f"activations.memory_gb={budget / 2**30:g} is below one batch of activations ({one / 2**30:.4g} GB: "
            f"batch_tokens x hidden size {d} x 4 bytes); raise it to at least {one / 2**30:.4g} or lower "
            "activations.batch_tokens"
        )


@dataclass(frozen=True)
class MemoryPlan:
    """What a layer walk holds at most: the modules outside the decoder layers it keeps loaded, the in-memory
    activations and one batch, with either the embedding table (while embedding) or one layer's weights and sums."""

    resident: int
    embedding: int
    layer_weights: int
    layer_sums: int
    activations_in_memory: int
    activations_on_disk: int
    batch: int

    @property
    def peak(self) -> int:
        held = max(self.embedding, self.layer_weights + self.layer_sums)
        return self.resident + held + self.activations_in_memory + self.batch

    def as_dict(self) -> dict[str, float]:
        """The plan in GB, for logs and reports."""
        gb = {k: round(v / 2**30, 6) for k, v in vars(self).items()}
        return gb | {"peak": round(self.peak / 2**30, 6)}


def plan(skeleton: Skeleton, groups: list[LinearGroup], positions: list[int], budget: float) -> MemoryPlan:
    """The memory plan of walking batches of ``positions`` padded tokens each under an in-memory activation
    ``budget`` (bytes)."""
    d = skeleton.hidden_size()
    sizes = [n * d * FP32 for n in positions]
    in_memory = 0
    for size in sizes:
        if in_memory + size <= budget:
            in_memory += size
    return MemoryPlan(
        resident=skeleton.resident_bytes(),
        embedding=skeleton.embedding_bytes(),
        layer_weights=skeleton.layer_bytes(),
        layer_sums=skeleton.sums_bytes(groups),
        activations_in_memory=in_memory,
        activations_on_disk=sum(sizes) - in_memory,
        batch=max(sizes),
    )


class LayerWalk:
    """The calibration batches pushed through the decoder layers one at a time (see the module docstring)."""

    def __init__(self, skeleton: Skeleton, work: list[Batch], cache: ActivationCache, progress: bool = True) -> None:
        self.skeleton = skeleton
        self.work = work
        self.cache = cache
        self.progress = progress  # progress bars on stderr (not for a check on a few tokens)

    @torch.no_grad()
    def embed(self) -> None:
        """Cache the inputs of decoder layer 0 of every batch; the embedding table is loaded for this only."""
        with self.skeleton.loaded(self.skeleton.embedding_name):
            bar = tqdm(self.work, desc="embed", unit="batch", leave=False, disable=not self.progress)
            for b, batch in enumerate(bar):
                device = self.skeleton.device
                ids, mask = batch.ids.to(device), batch.attention_mask.to(device)
                X, _, _ = self.skeleton.capture(0, input_ids=ids, attention_mask=mask)  # [B, T, d]
                self.cache.put(b, X)

    @torch.no_grad()
    def forward(
        self, i: int, layer: nn.Module, keep: bool, accumulators: dict[str, Accumulator] | None = None, label: str = ""
    ) -> None:
        """Run decoder layer ``i`` (loaded as ``layer``) on every batch's cached inputs; ``accumulators`` (by
        linear name) see their linear's inputs; with ``keep`` the outputs replace the inputs in the cache."""
        accumulators = accumulators or {}
        hooks = attach(layer, accumulators)
        device = self.skeleton.device
        try:
            bar = tqdm(self.work, desc=label or f"layer {i}", unit="batch", leave=False, disable=not self.progress)
            for b, batch in enumerate(bar):
                X = self.cache.get(b).to(device)  # [B, T, d]
                mask = batch.attention_mask.to(device)
                _, args, kwargs = self.skeleton.capture(i, inputs_embeds=X, attention_mask=mask)
                segment = batch.segment.to(device)
                for acc in accumulators.values():
                    acc.segment = segment
                Y = layer(X, *args, **kwargs)
                if keep:
                    self.cache.put(b, Y[0] if isinstance(Y, tuple) else Y)
        finally:
            for hook in hooks:
                hook.remove()

    def advance(self, i: int) -> None:
        """Run decoder layer ``i`` with its checkpoint weights, only to pass its outputs on (a resume)."""
        with self.skeleton.loaded(self.skeleton.layers_name + f".{i}") as layer:
            self.forward(i, layer, keep=True, label=f"layer {i} (resume)")


def _architecture(model: str) -> str:
    """The class name config.json records (``architectures``), else its model_type."""
    config = AutoConfig.from_pretrained(model_dir(model))
    return (getattr(config, "architectures", None) or [config.model_type])[0]


def _refused(architecture: str, why: str) -> RacError:
    return RacError(
        f"{architecture} is not supported by rac's layer walk: {why}; use a model of a family docs/models.md lists"
    )


@contextlib.contextmanager
def _one_line(architecture: str, doing: str) -> Iterator[None]:
    """Whatever the family's code raises while ``doing``, the user gets one line naming the architecture."""
    try:
        yield
    except RacError:
        raise
    except Exception as err:  # any failure of transformers' code for this family, not only the known ones
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise _refused(architecture, f"{doing} failed ({type(err).__name__}: {first})") from err


def _unhandled(skeleton: Skeleton) -> list[str]:
    """Weight matrices inside decoder layer 0 that neither a linear-like module, an experts module nor a router
    holds: rac would leave them dense while reporting the target sparsity, so a model that has them is refused."""
    layer = skeleton.layers[0]
    experts, routers = moe_parts(layer)
    owned = {id(m.weight) for m in layer.modules() if isinstance(m, LINEAR_LIKE)}
    owned |= {id(w) for m in experts.values() for w in m.parameters(recurse=False) if w.dim() == 3}
    owned |= {id(w) for r in routers for w in layer.get_submodule(r).parameters()}
    return [n for n, w in layer.named_parameters() if w.dim() >= 2 and id(w) not in owned]


def _unreadable_experts(skeleton: Skeleton) -> list[str]:
    """Experts modules whose weights are not one [out, in] slice per expert applied by ``F.linear`` (transposed
    layouts, biases): the tap could not read them."""
    experts, _ = moe_parts(skeleton.layers[0])
    return [
        n
        for n, m in experts.items()
        if getattr(m, "is_transposed", True) or getattr(m, "has_bias", True) or not hasattr(m, "num_experts")
    ]


def open_skeleton(model: str, device: torch.device) -> tuple[Skeleton, list[LinearGroup]]:
    """The skeleton of ``model`` and its linear groups; an architecture the layer walk cannot handle, or any
    failure while building or probing it, is a one-line error naming the architecture."""
    architecture = _architecture(model)
    with _one_line(architecture, "building or probing it"):
        skeleton = Skeleton(model, device)
        unhandled = _unhandled(skeleton)
        unreadable = _unreadable_experts(skeleton)
        if unreadable:
            raise _refused(
                architecture,
                f"its experts ({', '.join(unreadable[:2])}) are stored transposed or with biases, which rac's "
                "expert tap cannot read",
            )
        if unhandled:
            raise _refused(
                architecture,
                f"its decoder layers hold weights outside linear layers ({', '.join(unhandled[:3])}), "
                "which rac cannot compress",
            )
        groups = skeleton.groups()
    grouped = {(g.layer, m) for g in groups for m in g.members}
    for i, layer in enumerate(skeleton.layers):
        routers = moe_parts(layer)[1]
        unused = [
            n
            for n, m in layer.named_modules()
            if isinstance(m, LINEAR_LIKE) and (i, n) not in grouped and n not in routers
        ]
        if unused:
            raise _refused(
                architecture, f"decoder layer {i}'s forward never calls {unused[:3]}, so no Hessian would reach them"
            )
    return skeleton, groups


@torch.no_grad()
def check_walkable(model: str, device: torch.device) -> None:
    """Walk ``model`` layer by layer on a few tokens with sums on every group, as the hessians stage will (before
    any rollout); any failure is one line naming the architecture."""
    skeleton, groups = open_skeleton(model, device)
    vocab = int(skeleton.model.config.get_text_config().vocab_size)
    n = min(4, vocab)
    work = batches([list(range(n))], [[0, 0, 1, 1][:n]], n, pad=0)
    with (
        tempfile.TemporaryDirectory() as scratch,
        _one_line(skeleton.architecture, f"a layer-by-layer pass on {n} tokens"),
    ):
        walk = LayerWalk(skeleton, work, ActivationCache(float("inf"), Path(scratch)), progress=False)
        walk.embed()
        for i in range(len(skeleton.layers)):
            with skeleton.loaded(skeleton.prefix(i).rstrip(".")) as layer:
                sums = {
                    g.name: Accumulator(member_weight(layer, g.name).shape[1], device) for g in groups if g.layer == i
                }
                walk.forward(i, layer, keep=True, accumulators=sums, label=f"check layer {i}")
        walk.cache.close()
