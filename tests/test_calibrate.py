"""Calibration sequences: one exact token budget per source, decode tokens exactly where the CoT is."""

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from stages import calibrate, toy
from stages.corpus import word_sentences
from stages.errors import RacError
from stages.models import encode_prompt, load_tokenizer, vocab_hash
from stages.params import Params, load_params
from stages.schemas import CALIBRATION, TRACES, read_parquet, write_parquet
from stages.tasks import get_task
from tests.conftest import SHIPPED_PARAMS

BENCHMARKS = load_params(SHIPPED_PARAMS).benchmarks
BUDGET = 300
MATH500 = Path(__file__).parent / "fixtures" / "math500_tiny.jsonl"


def test_take_budget_cuts_last_sequence() -> None:
    stream = iter([([1, 2, 3], [0, 0, 1]), ([4, 5, 6, 7], [0, 1, 1, 1]), ([8, 9], [0, 0])])
    taken = calibrate.take_budget(stream, 5, "rac")
    assert taken == [([1, 2, 3], [0, 0, 1]), ([4, 5], [0, 1])]
    assert next(stream) == ([8, 9], [0, 0])  # stops drawing once the budget is met


def test_take_budget_exact_fit_keeps_whole_sequences() -> None:
    stream = iter([([1, 2], [0, 1]), ([3, 4, 5], [0, 0, 1]), ([6], [0])])
    assert calibrate.take_budget(stream, 5, "prompt") == [([1, 2], [0, 1]), ([3, 4, 5], [0, 0, 1])]


def test_take_budget_too_short_names_budget() -> None:
    stream = iter([([1, 2, 3], [0, 0, 1]), ([4], [1])])
    with pytest.raises(RacError, match=r"budget_tokens=10 exceeds the 4 tokens .*'rac'"):
        calibrate.take_budget(stream, 10, "rac")


def _traces(n: int, seed: int = 5) -> list[dict]:
    """Trace rows shaped like rollout's: BOS+prompt ids and a CoT completion ending in EOS."""
    tokenizer, task = toy.build_tokenizer(), get_task("arithmetic", BENCHMARKS)
    rows = []
    for i, problem in enumerate(task.problems(n, seed)):
        prompt_ids = encode_prompt(tokenizer, problem.prompt, "default")
        completion_ids = [*tokenizer.encode(problem.solution, add_special_tokens=False), tokenizer.eos_token_id]
        rows.append(
            {
                "prompt_id": i,
                "sample_idx": 0,
                "prompt_token_ids": prompt_ids,
                "completion_token_ids": completion_ids,
                "prompt": problem.prompt,
                "completion": problem.solution,
                "n_prompt_tokens": len(prompt_ids),
                "n_completion_tokens": len(completion_ids),
                "finish_reason": "stop",
                "answer": problem.answer,
                "correct": True,
            }
        )
    return rows


@pytest.fixture
def setup(tiny_model_dir: Path, params_file: Callable[..., Path], tmp_path: Path) -> tuple[Params, Path, list[dict]]:
    rows = _traces(40)
    traces = tmp_path / "rollout" / "traces.parquet"
    vocab = vocab_hash(load_tokenizer(str(tiny_model_dir)))
    write_parquet(rows, TRACES, traces, {"model": str(tiny_model_dir), "tokenizer": vocab})
    p = load_params(params_file(tiny_model_dir, {"calibrate": {"budget_tokens": BUDGET, "generic_seq_len": 64}}))
    return p, traces, rows


def _run(p: Params, source: str, traces: Path, tmp_path: Path) -> tuple[list[dict], dict]:
    out = tmp_path / "calibrate" / f"{source}.parquet"
    calibrate.run(p, source, traces, out)
    table, meta = read_parquet(out, CALIBRATION, "calibration")
    return table.to_pylist(), meta


@pytest.mark.parametrize("source", ["generic", "prompt", "rac"])
def test_run_gives_exact_budget(setup: tuple, tmp_path: Path, source: str) -> None:
    p, traces, _ = setup
    rows, meta = _run(p, source, traces, tmp_path)
    assert sum(len(r["token_ids"]) for r in rows) == BUDGET
    assert all(len(r["token_ids"]) == len(r["segment"]) > 0 for r in rows)
    assert [r["seq_id"] for r in rows] == list(range(len(rows)))
    assert {r["source"] for r in rows} == {source}
    assert meta["source"] == source
    assert meta["n_tokens"] == BUDGET
    assert meta["n_sequences"] == len(rows)
    assert meta["n_decode_tokens"] == sum(sum(r["segment"]) for r in rows)


def test_rac_decode_tokens_are_the_completions(setup: tuple, tmp_path: Path) -> None:
    p, traces, trace_rows = setup
    rows, _ = _run(p, "rac", traces, tmp_path)
    left = BUDGET
    for row, trace in zip(rows, trace_rows, strict=False):
        prompt, completion = trace["prompt_token_ids"], trace["completion_token_ids"]
        want_ids = (prompt + completion)[:left]
        want_seg = ([0] * len(prompt) + [1] * len(completion))[:left]
        assert row["token_ids"] == want_ids
        assert row["segment"] == want_seg
        left -= len(want_ids)
    assert left == 0
    assert sum(sum(r["segment"]) for r in rows) > BUDGET // 2  # the CoT dominates RAC's tokens


@pytest.mark.parametrize("source", ["generic", "prompt"])
def test_generic_and_prompt_have_no_decode_tokens(setup: tuple, tmp_path: Path, source: str) -> None:
    p, traces, _ = setup
    rows, meta = _run(p, source, traces, tmp_path)
    assert all(set(r["segment"]) == {0} for r in rows)
    assert meta["n_decode_tokens"] == 0


def test_generic_sequences_have_generic_seq_len(setup: tuple, tmp_path: Path) -> None:
    p, traces, _ = setup
    rows, _ = _run(p, "generic", traces, tmp_path)
    assert [len(r["token_ids"]) for r in rows] == [64] * (BUDGET // 64) + [BUDGET % 64]
    assert all(r["token_ids"][0] == 1 for r in rows)  # each starts with BOS


def test_prompt_only_needs_more_sequences_than_rac(setup: tuple, tmp_path: Path) -> None:
    p, traces, _ = setup
    prompt_rows, _ = _run(p, "prompt", traces, tmp_path)
    rac_rows, _ = _run(p, "rac", traces, tmp_path)
    assert len(prompt_rows) > 3 * len(rac_rows)  # CoTs are several times longer than prompts


def test_prompt_sequences_are_the_task_prompts(setup: tuple, tmp_path: Path) -> None:
    p, traces, _ = setup
    rows, _ = _run(p, "prompt", traces, tmp_path)
    tokenizer, task = toy.build_tokenizer(), get_task("arithmetic", BENCHMARKS)
    problems = task.problems(256, p.calibrate.seed * 1_000_003)
    for row, problem in zip(rows[:-1], problems, strict=False):
        assert row["token_ids"] == encode_prompt(tokenizer, problem.prompt, "default")


def test_generic_sequences_decode_to_the_generic_text(setup: tuple, tmp_path: Path) -> None:
    p, traces, _ = setup
    rows, _ = _run(p, "generic", traces, tmp_path)
    tokenizer = toy.build_tokenizer()
    text = word_sentences(2 * BUDGET, p.calibrate.seed)
    assert tokenizer.decode(rows[0]["token_ids"][1:]) == text[:63]


def test_rac_budget_too_large(setup: tuple, tmp_path: Path) -> None:
    p, traces, rows = setup
    available = sum(r["n_prompt_tokens"] + r["n_completion_tokens"] for r in rows)
    out = tmp_path / "calibrate" / "rac.parquet"
    p = replace(p, calibrate=replace(p.calibrate, budget_tokens=available + 1))
    with pytest.raises(RacError, match=rf"budget_tokens={available + 1} exceeds the {available} tokens"):
        calibrate.run(p, "rac", traces, out)
    assert not out.exists()


def test_unknown_source(setup: tuple, tmp_path: Path) -> None:
    p, traces, _ = setup
    with pytest.raises(RacError, match="'offline'"):
        calibrate.run(p, "offline", traces, tmp_path / "x.parquet")
    assert not (tmp_path / "x.parquet").exists()


def test_generic_seq_len_one_is_rac_error(params_file: Callable[..., Path], tmp_path: Path) -> None:
    # A generic sequence of length 1 would hold only BOS: refused when params are read.
    with pytest.raises(RacError, match="generic_seq_len=1"):
        load_params(params_file(tmp_path, {"calibrate": {"generic_seq_len": 1}}))


def test_offpolicy_uses_the_other_models_traces(
    tiny_model_dir: Path, tiny_llama_dir: Path, params_file: Callable[..., Path], tmp_path: Path
) -> None:
    # Traces of another model with the same tokenizer (the Llama fixture shares the character vocab).
    other = tmp_path / "other.parquet"
    vocab = vocab_hash(load_tokenizer(str(tiny_llama_dir)))
    rows = [
        {
            "prompt_id": i,
            "sample_idx": 0,
            "prompt_token_ids": [1, 5, 14, 6, 15, 18],
            "completion_token_ids": [9, 9, 9, 2],
            "prompt": "1+2=\n",
            "completion": "xxx",
            "n_prompt_tokens": 6,
            "n_completion_tokens": 4,
            "finish_reason": "stop",
            "answer": "3",
            "correct": False,
        }
        for i in range(10)
    ]
    write_parquet(rows, TRACES, other, {"model": str(tiny_llama_dir), "tokenizer": vocab})
    p = load_params(
        params_file(
            tiny_model_dir,
            {"sources": ["rac", "offpolicy"], "calibrate": {"budget_tokens": 50, "offpolicy_traces": str(other)}},
        )
    )
    out = tmp_path / "offpolicy.parquet"
    calibrate.run(p, "offpolicy", tmp_path / "unused.parquet", out)
    table, meta = read_parquet(out, CALIBRATION, "calibration")
    assert meta["source"] == "offpolicy" and sum(map(len, table["token_ids"].to_pylist())) == 50
    assert table["token_ids"].to_pylist()[0] == [1, 5, 14, 6, 15, 18, 9, 9, 9, 2]
    assert table["segment"].to_pylist()[0] == [0] * 6 + [1] * 4

    write_parquet(rows, TRACES, other, {"model": "bpe-model", "tokenizer": "0123456789abcdef"})
    with pytest.raises(RacError, match="another vocabulary"):
        calibrate.run(p, "offpolicy", tmp_path / "unused.parquet", tmp_path / "x.parquet")
    assert not (tmp_path / "x.parquet").exists()


def test_offpolicy_needs_traces(tiny_model_dir: Path, params_file: Callable[..., Path]) -> None:
    with pytest.raises(RacError, match=r"calibrate\.offpolicy_traces is not set"):
        load_params(params_file(tiny_model_dir, {"sources": ["rac", "offpolicy"]}))


def test_generic_corpus_file(setup: tuple, tmp_path: Path) -> None:
    p, traces, _ = setup
    docs = [f"the {w} cat sees a dog near the river and then walks home slowly today." * 3 for w in ("red", "big")]
    corpus = tmp_path / "c4-shard.jsonl"
    corpus.write_text("".join(json.dumps({"text": d, "url": "x", "timestamp": "y"}) + "\n" for d in docs))
    c = replace(p.calibrate, generic_corpus=str(corpus), budget_tokens=200, generic_seq_len=64)
    rows, _ = _run(replace(p, calibrate=c), "generic", traces, tmp_path)
    tokenizer = toy.build_tokenizer()
    windows = [tokenizer.decode(r["token_ids"][1:]) for r in rows]
    whole = {d[i : i + 63] for d in docs for i in range(0, len(d) - 62, 63)}  # never across two documents
    assert [len(r["token_ids"]) for r in rows] == [64, 64, 64, 8]
    assert set(windows[:3]) <= whole
    assert any(w.startswith(windows[3]) for w in whole)  # the last one cut to the budget


def test_generic_corpus_without_text(setup: tuple, tmp_path: Path) -> None:
    p, traces, _ = setup
    corpus = tmp_path / "wrong.jsonl"
    corpus.write_text(json.dumps({"content": "hello"}) + "\n")
    with pytest.raises(RacError, match=r"rows lack a 'text' field \(they have \['content'\]\)"):
        _run(replace(p, calibrate=replace(p.calibrate, generic_corpus=str(corpus))), "generic", traces, tmp_path)


def test_prompt_source_from_a_fixed_benchmark_uses_each_problem_once(setup: tuple, tmp_path: Path) -> None:
    p, traces, _ = setup
    math500 = replace(BENCHMARKS["math500"], path=str(MATH500))
    p = replace(p, calib_task="math500", benchmarks={**p.benchmarks, "math500": math500})
    tokenizer = toy.build_tokenizer()
    everything = [
        encode_prompt(tokenizer, pr.prompt, "default") for pr in get_task("math500", p.benchmarks).problems(5, 0)
    ]
    total = sum(len(ids) for ids in everything)
    rows, _ = _run(replace(p, calibrate=replace(p.calibrate, budget_tokens=total)), "prompt", traces, tmp_path)
    assert sorted(r["token_ids"] for r in rows) == sorted(everything)  # each of the 5 problems, once
    with pytest.raises(RacError, match=rf"budget_tokens={total + 1} exceeds the {total} tokens .* 'prompt'"):
        _run(replace(p, calibrate=replace(p.calibrate, budget_tokens=total + 1)), "prompt", traces, tmp_path)


def test_keep_correct_calibrates_on_correct_traces_only(setup: tuple, tmp_path: Path) -> None:
    p, traces, rows = setup
    for i, row in enumerate(rows):
        row["correct"] = i % 2 == 0
    write_parquet(rows, TRACES, traces, read_parquet(traces, TRACES, "traces")[1])
    correct = [r for r in rows if r["correct"]]
    budget = sum(r["n_prompt_tokens"] + r["n_completion_tokens"] for r in correct)
    p = replace(p, rollout=replace(p.rollout, keep="correct"), calibrate=replace(p.calibrate, budget_tokens=budget))
    out, _ = _run(p, "rac", traces, tmp_path)
    assert [r["token_ids"] for r in out] == [r["prompt_token_ids"] + r["completion_token_ids"] for r in correct]
    with pytest.raises(
        RacError, match=rf"budget_tokens={budget + 1} exceeds the {budget} tokens .*rollout.keep=correct"
    ):
        _run(replace(p, calibrate=replace(p.calibrate, budget_tokens=budget + 1)), "rac", traces, tmp_path)


def test_keep_correct_without_a_correct_trace(setup: tuple, tmp_path: Path) -> None:
    p, traces, rows = setup
    write_parquet([r | {"correct": False} for r in rows], TRACES, traces, read_parquet(traces, TRACES, "traces")[1])
    p = replace(p, rollout=replace(p.rollout, keep="correct"))
    out = tmp_path / "calibrate" / "rac.parquet"
    with pytest.raises(RacError, match=r"rollout.keep='correct' keeps none of the 40 traces .* set rollout.keep: all"):
        calibrate.run(p, "rac", traces, out)
    assert not out.exists()
