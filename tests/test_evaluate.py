"""The evaluate stage: acc@1 over samples, pass@k, length statistics, and real generation on real models."""

import json
import math
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from stages import evaluate
from stages.params import load_params
from stages.tasks import ANSWER_VERDICTS
from tests.conftest import SHIPPED_PARAMS

INSTRUCTION = load_params(SHIPPED_PARAMS).benchmarks["math500"].instruction

EMBEDDED = Path(__file__).parents[1] / "data" / "embedded"
MATH500 = Path(__file__).parent / "fixtures" / "math500_tiny.jsonl"


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [(4, 0, 1, 0.0), (4, 4, 1, 1.0), (4, 1, 1, 0.25), (4, 1, 2, 0.5), (4, 1, 4, 1.0), (5, 2, 3, 0.9), (1, 1, 1, 1.0)],
)
def test_pass_at_k(n: int, c: int, k: int, expected: float) -> None:
    # (5, 2, 3): 1 - C(3, 3) / C(5, 3) = 1 - 1/10
    assert evaluate.pass_at_k(n, c, k) == pytest.approx(expected)


def test_metrics_average_over_samples_and_problems() -> None:
    correct = [[True, False, False, False], [True, True, True, True]]
    lengths = [10, 20, 30, 40, 50, 60, 70, 100]
    hit_max = [False] * 7 + [True]
    verdicts = ["passed", "no_answer", "wrong_answer", "no_answer", *["passed"] * 4]
    m = evaluate.metrics(correct, lengths, hit_max, [True] * 6 + [False] * 2, verdicts, ANSWER_VERDICTS)
    assert m["accuracy"] == pytest.approx(0.625)  # (1/4 + 4/4) / 2
    assert m["accuracy_se"] == pytest.approx(0.375 / math.sqrt(2))  # spread of per-problem means over 2 problems
    assert (m["pass@1"], m["pass@2"], m["pass@4"]) == pytest.approx((0.625, 0.75, 1.0))
    assert not any(k.startswith("pass@") for k in m if k not in ("pass@1", "pass@2", "pass@4"))
    assert (m["mean_cot_tokens"], m["median_cot_tokens"]) == (47.5, 45.0)
    assert m["p90_cot_tokens"] == pytest.approx(79.0)
    assert m["frac_hit_max"] == 1 / 8
    assert m["frac_parseable"] == 6 / 8
    assert not {"wall_seconds", "tokens_per_second"} & m.keys()  # volatile: in the timings, not the metrics
    assert (m["n_problems"], m["samples_per_problem"]) == (2, 4)
    assert m["verdicts"] == {"passed": 5, "wrong_answer": 1, "no_answer": 2}


def test_metrics_one_sample_is_binomial() -> None:
    verdicts = ["passed", "wrong_answer", "passed", "passed"]
    m = evaluate.metrics([[True], [False], [True], [True]], [5] * 4, [False] * 4, [True] * 4, verdicts, ANSWER_VERDICTS)
    assert m["accuracy"] == m["pass@1"] == 0.75
    assert m["accuracy_se"] == pytest.approx(math.sqrt(0.75 * 0.25 / 4))


def test_pass_at_k_for_three_samples() -> None:
    verdicts = ["passed", "wrong_answer", "wrong_answer"]
    m = evaluate.metrics([[True, False, False]], [1, 1, 1], [False] * 3, [True] * 3, verdicts, ANSWER_VERDICTS)
    assert [k for k in m if k.startswith("pass@")] == ["pass@1", "pass@2", "pass@3"]


def test_evaluate_samples_per_problem_on_embedded(tmp_path: Path, params_file: Callable[..., Path]) -> None:
    overrides = {
        "evaluate": {"backend": "hf", "n_problems": 6, "samples_per_problem": 3, "temperature": 1.0, "seed": 3}
    }
    p = load_params(params_file(EMBEDDED, overrides))
    evaluate.run(p, str(EMBEDDED), tmp_path)
    samples = pq.read_table(tmp_path / "samples.parquet").to_pylist()
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert [(r["problem_id"], r["sample_idx"]) for r in samples] == [(i, j) for i in range(6) for j in range(3)]
    assert m["accuracy"] == pytest.approx(sum(r["correct"] for r in samples) / 18)
    assert m["accuracy"] > 0.5  # the trained reasoner solves most additions even when sampling at temperature 1
    assert m["accuracy"] <= m["pass@2"] <= m["pass@3"]
    assert m["mean_cot_tokens"] == pytest.approx(sum(r["n_completion_tokens"] for r in samples) / 18)
    assert (m["n_problems"], m["samples_per_problem"]) == (6, 3)


def test_evaluate_math_benchmark_file(tmp_path: Path, tiny_model_dir: Path, params_file: Callable[..., Path]) -> None:
    overrides = {
        "task": "math500",
        "benchmarks": {"math500": {"path": str(MATH500)}},
        "evaluate": {"backend": "hf", "n_problems": 5, "max_new_tokens": 4},
    }
    evaluate.run(load_params(params_file(tiny_model_dir, overrides)), str(tiny_model_dir), tmp_path)
    samples = pq.read_table(tmp_path / "samples.parquet").to_pylist()
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert len(samples) == 5 and all(r["prompt"].endswith(INSTRUCTION) for r in samples)
    # An untrained model writes no \boxed{} answer in 4 tokens: nothing extracted, nothing correct, all at the max.
    assert all(r["extracted"] is None and not r["correct"] for r in samples)
    assert m["accuracy"] == 0.0 and m["frac_hit_max"] == 1.0 and m["mean_cot_tokens"] == 4.0
    assert m["frac_parseable"] == 0.0  # the hint that the answer format is wrong
