"""The `rac` command: help everywhere; bad input is one stderr line, exit code 2, and no artifact at --out."""

import json
from collections.abc import Callable
from pathlib import Path

import click
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from conftest import assert_bad_input

from stages import hessians, toy
from stages.cli import main
from stages.models import vocab_hash
from stages.params import load_params
from stages.schemas import CALIBRATION, TRACES, write_parquet


def _command_paths(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for name, command in sorted(group.commands.items()):
        out.append((*prefix, name))
        if isinstance(command, click.Group):
            out += _command_paths(command, (*prefix, name))
    return out


COMMANDS = _command_paths(main)


def test_every_stage_has_a_subcommand() -> None:
    assert set(COMMANDS) >= {
        ("toy",),
        ("toy", "train"),
        ("rollout",),
        ("calibrate",),
        ("hessians",),
        ("prune",),
        ("evaluate",),
        ("analyze",),
        ("report",),
        ("preset",),
    }


@pytest.mark.parametrize("args", [(), *COMMANDS], ids=lambda a: " ".join(a) or "rac")
def test_help(args: tuple[str, ...]) -> None:
    result = CliRunner().invoke(main, [*args, "--help"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("Usage:")
    assert result.stderr == ""


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _traces(path: Path, n: int) -> int:
    """A small valid traces file; returns its number of tokens."""
    rows = [
        {
            "prompt_id": i,
            "sample_idx": 0,
            "prompt_token_ids": [1, 5, 14, 6, 15, 18],
            "completion_token_ids": [5, 14, 6, 14, 4, 15, 4, 7, 2],
            "prompt": "1+2=\n",
            "completion": "1+2+0=03",
            "n_prompt_tokens": 6,
            "n_completion_tokens": 9,
            "finish_reason": "stop",
            "answer": "3",
            "correct": True,
        }
        for i in range(n)
    ]
    write_parquet(rows, TRACES, path, {"model": "tiny", "tokenizer": vocab_hash(toy.build_tokenizer())})
    return 15 * n


@pytest.mark.parametrize("sparsity", [1.0, 1.5, -0.1])
def test_prune_sparsity_outside_unit_interval(
    in_tmp: Path, tiny_model_dir: Path, params_file: Callable[..., Path], sparsity: float
) -> None:
    params = params_file(tiny_model_dir, {"sparsity": sparsity})
    out = Path("data/prune/rac")
    result = CliRunner().invoke(
        main, ["prune", "--params", str(params), "--hessians", "data/hessians/rac.zarr", "--out", str(out)]
    )
    assert_bad_input(result, f"sparsity={sparsity}")
    assert not out.exists()
    assert _leftovers(out.parent) == []


def test_prune_unknown_pruner(in_tmp: Path, tiny_model_dir: Path, params_file: Callable[..., Path]) -> None:
    calib, store = Path("data/calibrate/rac.parquet"), Path("data/hessians/rac.zarr")
    rows = [
        {"seq_id": 0, "token_ids": [1, 5, 14, 6, 15, 18, 7], "segment": [0, 0, 0, 0, 0, 0, 1], "source": "rac"},
        {"seq_id": 1, "token_ids": [1, 9, 14, 9], "segment": [0, 0, 1, 1], "source": "rac"},
    ]
    write_parquet(rows, CALIBRATION, calib, {"source": "rac"})
    # A valid store, so that only the pruner is wrong.
    hessians.run(
        load_params(params_file(tiny_model_dir, {"activations": {"batch_tokens": 128}, "hessians": {"chunk": 32}})),
        calib,
        store,
        1,
    )
    params = params_file(tiny_model_dir, {"pruner": "foo"})
    out = Path("data/prune/rac")
    result = CliRunner().invoke(main, ["prune", "--params", str(params), "--hessians", str(store), "--out", str(out)])
    assert_bad_input(result, "pruner='foo'", "sparsegpt")
    assert not out.exists()
    assert _leftovers(out.parent) == []


def test_prune_store_of_another_model(
    in_tmp: Path, tiny_model_dir: Path, tiny_llama_dir: Path, params_file: Callable[..., Path]
) -> None:
    calib, store = Path("data/calibrate/rac.parquet"), Path("data/hessians/rac.zarr")
    rows = [{"seq_id": 0, "token_ids": [1, 5, 14, 6], "segment": [0, 0, 1, 1], "source": "rac"}]
    write_parquet(rows, CALIBRATION, calib, {"source": "rac"})
    hessians.run(load_params(params_file(tiny_llama_dir)), calib, store, 1)
    params = params_file(tiny_model_dir)
    out = Path("data/prune/rac")
    result = CliRunner().invoke(main, ["prune", "--params", str(params), "--hessians", str(store), "--out", str(out)])
    assert_bad_input(result, str(store), "fingerprint")
    assert not out.exists()


def test_calibrate_unknown_source(in_tmp: Path, tiny_model_dir: Path, params_file: Callable[..., Path]) -> None:
    params = params_file(tiny_model_dir)
    traces = Path("data/rollout/traces.parquet")
    _traces(traces, 3)
    out = Path("data/calibrate/c4.parquet")
    result = CliRunner().invoke(
        main, ["calibrate", "--params", str(params), "--source", "c4", "--traces", str(traces), "--out", str(out)]
    )
    assert_bad_input(result, "'c4'")
    assert _leftovers(out.parent) == []


@pytest.mark.parametrize("model", ["data/nope", "/tmp/does/not/exist"])
def test_rollout_missing_model(in_tmp: Path, params_file: Callable[..., Path], model: str) -> None:
    params = params_file(model, {"rollout": {"backend": "hf", "n_prompts": 2}})
    out = Path("data/rollout/traces.parquet")
    result = CliRunner().invoke(main, ["rollout", "--params", str(params), "--out", str(out)])
    assert_bad_input(result, repr(model))
    assert _leftovers(out.parent) == []


def test_calibrate_budget_larger_than_traces(
    in_tmp: Path, tiny_model_dir: Path, params_file: Callable[..., Path]
) -> None:
    traces = Path("data/rollout/traces.parquet")
    available = _traces(traces, 4)
    params = params_file(tiny_model_dir, {"calibrate": {"budget_tokens": available + 1}})
    out = Path("data/calibrate/rac.parquet")
    result = CliRunner().invoke(
        main, ["calibrate", "--params", str(params), "--source", "rac", "--traces", str(traces), "--out", str(out)]
    )
    assert_bad_input(result, f"budget_tokens={available + 1}", f"the {available} tokens")
    assert _leftovers(out.parent) == []


def test_calibrate_traces_with_wrong_schema(
    in_tmp: Path, tiny_model_dir: Path, params_file: Callable[..., Path]
) -> None:
    traces = Path("data/rollout/traces.parquet")
    traces.parent.mkdir(parents=True)
    # Re-tokenised text instead of the exact ids: the column the contract requires is absent.
    pq.write_table(
        pa.table({"prompt": ["1+2=\n"], "completion": ["#### 3"], "prompt_id": pa.array([0], pa.int64())}), traces
    )
    params = params_file(tiny_model_dir, {"calibrate": {"budget_tokens": 4}})
    out = Path("data/calibrate/rac.parquet")
    result = CliRunner().invoke(
        main, ["calibrate", "--params", str(params), "--source", "rac", "--traces", str(traces), "--out", str(out)]
    )
    assert_bad_input(result, str(traces), "prompt_token_ids")
    assert _leftovers(out.parent) == []


def test_calibrate_missing_traces(in_tmp: Path, tiny_model_dir: Path, params_file: Callable[..., Path]) -> None:
    params = params_file(tiny_model_dir)
    out = Path("data/calibrate/rac.parquet")
    result = CliRunner().invoke(
        main, ["calibrate", "--params", str(params), "--source", "rac", "--traces", "nope.parquet", "--out", str(out)]
    )
    assert_bad_input(result, "nope.parquet")
    assert not out.parent.exists() or _leftovers(out.parent) == []


def test_missing_params_file(in_tmp: Path) -> None:
    result = CliRunner().invoke(main, ["rollout", "--out", "traces.parquet"])
    assert_bad_input(result, "params.yaml")
    assert _leftovers(in_tmp) == []


def test_hessians_missing_calibration(in_tmp: Path, tiny_model_dir: Path, params_file: Callable[..., Path]) -> None:
    params = params_file(tiny_model_dir)
    out = Path("data/hessians/rac.zarr")
    result = CliRunner().invoke(
        main, ["hessians", "--params", str(params), "--calib", "data/calibrate/rac.parquet", "--out", str(out)]
    )
    assert_bad_input(result, "rac.parquet")
    assert not out.exists()


def test_unknown_task(in_tmp: Path, tiny_model_dir: Path, params_file: Callable[..., Path]) -> None:
    params = params_file(tiny_model_dir, {"task": "gsm9k"})
    out = Path("data/calibrate/prompt.parquet")
    result = CliRunner().invoke(
        main, ["calibrate", "--params", str(params), "--source", "prompt", "--traces", "x", "--out", str(out)]
    )
    assert_bad_input(result, "'gsm9k'")


def _jsonl(path: Path, rows: list[dict[str, str]]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize(
    ("case", "needles"),
    [
        ("missing_file", ["benchmark path", "nope.jsonl", "does not exist"]),
        ("wrong_fields", ["row 0 lacks fields ['problem', 'answer']", "expected fields: problem, answer"]),
        ("unknown_benchmark", ["task='gsm8k' is not in benchmarks", "math500"]),
        ("unknown_kind", ["benchmarks.math500.kind='prose' is unknown", "word_arithmetic"]),
        ("bad_regex", ["benchmarks.math500.pattern='Answer: (' does not compile", "fix the regular expression"]),
        ("unknown_vllm_option", ["vllm.options ['tensor_paralel_size'] are not vLLM engine arguments"]),
        ("gpu_only_on_cpu", ["vllm.tensor_parallel_size=2 needs CUDA GPUs and this machine has none"]),
        ("no_chat_template", ["has no chat template", "chat.require_template: false"]),
        ("zero_max_new_tokens", ["evaluate.max_new_tokens=0 must be > 0"]),
        ("negative_max_new_tokens", ["evaluate.max_new_tokens=-5 must be > 0"]),
        ("greedy_with_samples", ["evaluate.samples_per_problem=4 with temperature 0"]),
    ],
)
def test_evaluate_bad_benchmark_input(
    in_tmp: Path, tiny_model_dir: Path, params_file: Callable[..., Path], case: str, needles: list[str]
) -> None:
    good = _jsonl(in_tmp / "math500.jsonl", [{"problem": "What is $1+1$?", "answer": "2"}])
    overrides = {
        "missing_file": {"task": "math500", "benchmarks": {"math500": {"path": "nope.jsonl"}}},
        "wrong_fields": {
            "task": "math500",
            "benchmarks": {"math500": {"path": _jsonl(in_tmp / "q.jsonl", [{"question": "q"}])}},
        },
        "unknown_benchmark": {"task": "gsm8k"},
        "unknown_kind": {"task": "math500", "benchmarks": {"math500": {"path": good, "kind": "prose"}}},
        "bad_regex": {
            "task": "math500",
            "benchmarks": {"math500": {"path": good, "extractor": "regex", "pattern": "Answer: ("}},
        },
        "unknown_vllm_option": {"evaluate": {"backend": "vllm"}, "vllm": {"options": {"tensor_paralel_size": 2}}},
        "gpu_only_on_cpu": {"evaluate": {"backend": "vllm"}, "vllm": {"tensor_parallel_size": 2}},
        "no_chat_template": {"chat": {"require_template": True}},
        "zero_max_new_tokens": {
            "task": "math500",
            "benchmarks": {"math500": {"path": good}},
            "evaluate": {"max_new_tokens": 0},
        },
        "negative_max_new_tokens": {"evaluate": {"max_new_tokens": -5}},
        "greedy_with_samples": {"evaluate": {"temperature": 0.0, "samples_per_problem": 4}},
    }[case]
    params = params_file(tiny_model_dir, overrides)
    out = Path("data/evaluate/rac")
    result = CliRunner().invoke(
        main, ["evaluate", "--params", str(params), "--model", str(tiny_model_dir), "--out", str(out)]
    )
    assert_bad_input(result, *needles)
    assert _leftovers(out.parent) == []
