"""params.yaml: the shipped file loads; every bad value, missing key or unknown key is a one-line RacError."""

import dataclasses
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from stages.errors import RacError
from stages.params import (
    _SECTIONS,
    Params,
    apply_preset,
    load_params,
)

SHIPPED = Path(__file__).parents[1] / "params.yaml"


def test_shipped_params_load() -> None:
    p = load_params(SHIPPED)
    raw = yaml.safe_load(SHIPPED.read_text())
    assert isinstance(p, Params)
    assert p.sparsity == raw["sparsity"] and 0 <= p.sparsity < 1
    assert p.pruner == raw["pruner"]
    assert p.sources == raw["sources"]
    # every mapping in params.yaml but the free-form `benchmarks` is a typed section
    assert set(_SECTIONS) == {k for k, v in raw.items() if isinstance(v, dict)} - {"benchmarks"}
    for name, cls in _SECTIONS.items():
        section = getattr(p, name)
        assert isinstance(section, cls)
        assert dataclasses.asdict(section) == raw[name]  # nothing dropped, nothing defaulted
    assert p.toy.hidden_size // p.toy.num_heads >= 32


def test_missing_params_file(tmp_path: Path) -> None:
    with pytest.raises(RacError, match=r"nope\.yaml.*does not exist"):
        load_params(tmp_path / "nope.yaml")


@pytest.mark.parametrize("sparsity", [1.0, -0.1, 1.5])
def test_sparsity_outside_unit_interval(params_file: Callable[..., Path], sparsity: float) -> None:
    with pytest.raises(RacError, match=rf"sparsity={sparsity!r}"):
        load_params(params_file("m", {"sparsity": sparsity}))


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.99])
def test_sparsity_inside_unit_interval(params_file: Callable[..., Path], sparsity: float) -> None:
    assert load_params(params_file("m", {"sparsity": sparsity})).sparsity == sparsity


def test_unknown_source(params_file: Callable[..., Path]) -> None:
    with pytest.raises(RacError, match="'c4'"):
        load_params(params_file("m", {"sources": ["generic", "c4"]}))


def _without(path: Path, *keys: str) -> Path:
    """Remove the key at ``keys`` (a path into the nested mapping) from the params file."""
    raw = yaml.safe_load(path.read_text())
    node: dict[str, Any] = raw
    for key in keys[:-1]:
        node = node[key]
    del node[keys[-1]]
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize(
    ("keys", "pattern"),
    [
        (("sparsity",), r"'top level' lacks \['sparsity'\]"),
        (("pruner",), r"'top level' lacks \['pruner'\]"),
        (("model",), r"'top level' lacks \['model'\]"),
        (("calibrate", "budget_tokens"), r"'calibrate' lacks \['budget_tokens'\]"),
        (("prune", "mix"), r"'prune' lacks \['mix'\]"),
        (("hessians",), r"'hessians' lacks \['chunk'\]"),
        (("activations",), r"'activations' lacks \['batch_tokens', 'disk_dir', 'memory_gb'\]"),
    ],
)
def test_missing_key_named(params_file: Callable[..., Path], keys: tuple[str, ...], pattern: str) -> None:
    path = _without(params_file("m"), *keys)
    with pytest.raises(RacError, match=pattern):
        load_params(path)


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        ({"sparsityy": 0.5}, r"'top level' has unknown keys \['sparsityy'\]"),
        ({"prune": {"dampp": 0.1}}, r"'prune' has unknown keys \['dampp'\]"),
        ({"toy": {"seeed": 1}}, r"'toy' has unknown keys \['seeed'\]"),
    ],
)
def test_unknown_key_named(params_file: Callable[..., Path], overrides: dict[str, Any], pattern: str) -> None:
    with pytest.raises(RacError, match=pattern):
        load_params(params_file("m", overrides))


@pytest.mark.parametrize(("hidden", "heads"), [(64, 4), (96, 4), (128, 5)])
def test_head_dim_below_32_or_fractional_rejected(params_file: Callable[..., Path], hidden: int, heads: int) -> None:
    with pytest.raises(RacError, match=rf"{hidden}/{heads}"):
        load_params(params_file("m", {"toy": {"hidden_size": hidden, "num_heads": heads}}))


def test_head_dim_32_accepted(params_file: Callable[..., Path]) -> None:
    p = load_params(params_file("m", {"toy": {"hidden_size": 64, "num_heads": 2}}))
    assert p.toy.hidden_size // p.toy.num_heads == 32


@pytest.mark.parametrize(
    "mix", [{"prompt": -1.0, "decode": 1.0}, {"prompt": 0.0, "decode": 0.0}, {"prompt": 1.0}, {"prompt": 1, "x": 1}]
)
def test_bad_prune_mix_rejected(params_file: Callable[..., Path], mix: dict[str, float]) -> None:
    path = params_file("m")
    raw = yaml.safe_load(path.read_text())
    raw["prune"]["mix"] = mix  # replaced whole, not merged into the shipped mix
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(RacError, match=r"prune\.mix"):
        load_params(path)


def test_decode_only_mix_accepted(params_file: Callable[..., Path]) -> None:
    p = load_params(params_file("m", {"prune": {"mix": {"prompt": 0.0, "decode": 1.0}}}))
    assert p.prune.mix == {"prompt": 0.0, "decode": 1.0}


@pytest.mark.parametrize(
    ("overrides", "name"),
    [
        ({"calibrate": {"budget_tokens": 0}}, "calibrate.budget_tokens"),
        ({"hessians": {"chunk": -1}}, "hessians.chunk"),
        ({"rollout": {"backend": "tgi"}}, "rollout.backend"),
        ({"evaluate": {"top_p": 0.0}}, "evaluate.top_p"),
        ({"rollout": {"temperature": -0.5}}, "rollout.temperature"),
        ({"prune": {"damp": 0.0}}, "prune.damp"),
    ],
)
def test_bad_section_values_named(params_file: Callable[..., Path], overrides: dict, name: str) -> None:
    with pytest.raises(RacError, match=name.replace(".", r"\.")):
        load_params(params_file("m", overrides))


def test_section_not_a_mapping(params_file: Callable[..., Path]) -> None:
    with pytest.raises(RacError, match="'hessians' must be a mapping"):
        load_params(params_file("m", {"hessians": 3}))


def test_mistyped_value_is_rac_error(params_file: Callable[..., Path]) -> None:
    with pytest.raises(RacError, match="sparsity"):
        load_params(params_file("m", {"sparsity": "half"}))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"prune": {"pattern": "3:2"}, "sparsity": 0.5}, "3:2"),
        ({"prune": {"pattern": "0:4"}, "sparsity": 0.5}, "0:4"),
        ({"prune": {"pattern": "2-4"}, "sparsity": 0.5}, "2-4"),
        ({"prune": {"pattern": "2:4"}, "sparsity": 0.7}, "sparsity=0.7 contradicts prune.pattern='2:4'"),
        ({"prune": {"pattern": "2:4", "overrides": {"0": 0.3}}, "sparsity": 0.5}, "sparsity=0.3 contradicts"),
        ({"prune": {"scope": "heads"}}, "prune.scope='heads'"),
        ({"prune": {"layers": "3-1"}}, "layer spec '3-1'"),
        ({"prune": {"overrides": {"0": 1.0}}}, "sparsity=1.0 is outside"),
        ({"prune": {"kernel": "cuda"}}, "prune.kernel='cuda'"),
        ({"pruner": "obc"}, "pruner='obc'"),
    ],
)
def test_bad_pruning_params(params_file: Callable[..., Path], overrides: dict, message: str) -> None:
    with pytest.raises(RacError, match=re.escape(message)):
        load_params(params_file("m", overrides))


def test_pattern_from_dvc_set_is_a_string(params_file: Callable[..., Path]) -> None:
    # `dvc exp run -S prune.pattern=2:4` writes it unquoted; YAML 1.1 would read the integer 124.
    path = params_file("m", {"sparsity": 0.5})
    path.write_text(path.read_text().replace("pattern: unstructured", "pattern: 2:4"))
    assert load_params(path).prune.pattern == "2:4"


PAPER_PRESETS = [Path(__file__).parents[1] / "presets" / f"{name}.yaml" for name in ("qwen3-8b", "r1-distill-qwen-7b")]


@pytest.mark.parametrize("preset", PAPER_PRESETS, ids=lambda p: p.stem)
def test_shipped_presets_give_deepseek_settings(preset: Path, tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(SHIPPED.read_text())
    p = apply_preset(params, preset)
    assert (p.task, p.calib_task, p.calibrate.budget_tokens, p.rollout.max_new_tokens) == (
        "math500",
        "openr1_math",
        1_000_000,
        8192,
    )
    assert (p.evaluate.temperature, p.evaluate.top_p, p.evaluate.max_new_tokens) == (0.6, 0.95, 32768)
    assert load_params(params) == p
    text = params.read_text()
    assert "# The only home of defaults." in text and "offpolicy_traces: null" in text  # comments and nulls kept
    assert p.toy == load_params(SHIPPED).toy  # keys the preset does not name keep their values


@pytest.mark.parametrize(
    ("preset", "message"),
    [
        ("sparsity: 1.5\n", "sparsity=1.5 is outside"),
        ("evaluate:\n  max_new_tokens: 0\n", "evaluate.max_new_tokens=0 must be > 0"),
        ("evaluate:\n  max_tokens: 10\n", "preset key 'evaluate.max_tokens' is not in params.yaml"),
        ("- a list\n", "must hold a mapping"),
        ("benchmarks:\n  seq: {kind: arithmetic}\n", "params 'benchmarks.seq' lacks"),
        ("benchmark:\n  seq: {kind: arithmetic}\n", "preset key 'benchmark' is not in params.yaml"),
    ],
)
def test_bad_preset_leaves_params_untouched(preset: str, message: str, tmp_path: Path) -> None:
    params, bad = tmp_path / "params.yaml", tmp_path / "bad.yaml"
    params.write_text(SHIPPED.read_text())
    bad.write_text(preset)
    with pytest.raises(RacError, match=message):
        apply_preset(params, bad)
    assert params.read_text() == SHIPPED.read_text()
    assert sorted(f.name for f in tmp_path.iterdir()) == ["bad.yaml", "params.yaml"]


def test_preset_adds_a_benchmark(tmp_path: Path) -> None:
    """A new entry of a map (a benchmark named `seq`) is added whole and validated; the others keep their values."""
    params, preset = tmp_path / "params.yaml", tmp_path / "seq.yaml"
    params.write_text(SHIPPED.read_text())
    preset.write_text(
        "task: seq\nbenchmarks:\n  seq: {kind: arithmetic, path: null, split: test, instruction: '', "
        "extractor: last_number, pattern: null}\n"
    )
    p = apply_preset(params, preset)
    assert p.task == "seq" and p.benchmarks["seq"].extractor == "last_number"
    assert {k: v for k, v in p.benchmarks.items() if k != "seq"} == load_params(SHIPPED).benchmarks
    assert load_params(params) == p


def test_revision_of_a_local_model_is_refused(params_file: Callable[..., Path]) -> None:
    with pytest.raises(RacError, match=r"revision='v1' is set but model='data/embedded' is a local directory"):
        load_params(params_file("data/embedded", {"revision": "v1"}))
    assert load_params(params_file("org/name", {"revision": "v1"})).dense == "org/name@v1"
