"""The report: the sweep is read from `dvc exp show --json` as DVC 3 writes it; bad calls are one-line errors."""

import csv
import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import ROOT, SHIPPED_PARAMS, assert_bad_input

from stages import report
from stages.cli import main
from stages.errors import RacError
from stages.params import load_params

SOURCES = ["prompt", "rac"]
# The workspace's params, nested as params.yaml (a subset: the report reads no section itself)
WORKSPACE = {
    "sources": SOURCES,
    "sparsity": 0.7,
    "pruner": "sparsegpt",
    "prune": {"pattern": "unstructured", "overrides": {}, "mix": {"prompt": 1.0, "decode": 1.0}},
    "evaluate": {"max_new_tokens": 256, "n_problems": 16},
}


def _merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """``base`` with nested ``changes`` applied."""
    out = dict(base)
    for key, value in changes.items():
        out[key] = _merge(base[key], value) if isinstance(value, dict) and value else value
    return out


def _revision(rev: str, accuracy: float, timestamp: str | None, **changes: Any) -> dict[str, Any]:
    """One revision of `dvc exp show --json` (DVC 3), its params the workspace's with nested ``changes``."""
    model = {"accuracy": accuracy, "accuracy_se": 0.01, "n_problems": 16, "mean_cot_tokens": 90.0, "frac_hit_max": 0.1}
    metrics = (
        {f"data/evaluate/{name}/metrics.json": {"data": dict(model)} for name in SOURCES}
        | {"data/evaluate/dense/metrics.json": {"data": model | {"accuracy": 0.95}}}
        | {
            f"data/timings/evaluate-{name}.json": {"data": {"wall_seconds": 1.0, "tokens_per_second": 50.0}}
            for name in ["dense", *SOURCES]
        }
    )
    return {
        "rev": rev,
        "name": None,
        "error": None,
        "data": {
            "rev": rev,
            "timestamp": timestamp,
            "params": {"params.yaml": {"data": _merge(WORKSPACE, changes)}},
            "metrics": metrics,
        },
    }


def _exp_show(*experiments: dict[str, Any]) -> list[dict[str, Any]]:
    """The workspace, its baseline commit, and ``experiments`` below the baseline, as `dvc exp show --json`."""
    workspace = _revision("workspace", 0.9, None)
    baseline = _revision("abc123", 0.9, "2026-11-24T08:00:00")
    baseline["experiments"] = [{"name": e["rev"], "executor": None, "revs": [e]} for e in experiments]
    return [workspace, baseline]


def _run_experiments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shown: list[dict[str, Any]], key: str | None
) -> tuple[list[dict[str, str]], str]:
    """``run_experiments`` on ``shown`` with the shipped params but SOURCES: the rows of sweep.csv and table.md."""
    monkeypatch.setattr(report, "exp_show", lambda: shown)
    p = dataclasses.replace(load_params(SHIPPED_PARAMS), sources=SOURCES)
    report.run_experiments(p, tmp_path, key)
    assert (tmp_path / "figure1.png").read_bytes().startswith(b"\x89PNG")
    return list(csv.DictReader((tmp_path / "sweep.csv").open())), (tmp_path / "table.md").read_text()


def test_flatten_to_dotted_keys() -> None:
    flat = report.flatten(WORKSPACE)
    assert flat["prune.mix.prompt"] == 1.0 and flat["evaluate.max_new_tokens"] == 256
    assert flat["sources"] == '["prompt", "rac"]' and flat["prune.overrides"] == "{}"  # one value each
    assert "prune" not in flat and "prune.mix" not in flat


def test_sweep_points_one_per_sparsity(caplog: pytest.LogCaptureFixture) -> None:
    shown = _exp_show(
        _revision("e1", 0.95, "2026-11-24T09:00:00", sparsity=0.5),
        _revision("e2", 0.97, "2026-11-24T10:00:00", sparsity=0.5),  # newer: wins
        _revision("e3", 0.99, "2026-11-24T09:30:00", sparsity=0.3),
        _revision("e4", 0.5, "2026-11-24T09:40:00", sparsity=0.4, pruner="wanda"),  # two keys: not this sweep
    )
    with caplog.at_level(logging.INFO, logger="stages.report"):
        key, points = report.sweep_points(shown, SOURCES, None)
    assert key == "sparsity" and list(points) == [0.3, 0.5, 0.7]
    assert points[0.5]["rac"]["accuracy"] == 0.97
    assert set(points[0.3]) == {"dense", "prompt", "rac"} and points[0.3]["rac"]["wall_seconds"] == 1.0
    assert "skipping e4, whose params differ in 2 keys (pruner, sparsity)" in caplog.text


def test_sweep_points_over_a_categorical_key() -> None:
    shown = _exp_show(
        _revision("e1", 0.5, "2026-11-24T09:00:00", pruner="wanda"),
        _revision("e2", 0.4, "2026-11-24T09:10:00", pruner="magnitude"),
    )
    key, points = report.sweep_points(shown, SOURCES, None)
    assert key == "pruner" and list(points) == ["magnitude", "sparsegpt", "wanda"]  # not all numbers: by text
    assert points["wanda"]["rac"]["accuracy"] == 0.5 and points["sparsegpt"]["rac"]["accuracy"] == 0.9


@pytest.mark.parametrize(
    ("changes", "key", "values"),
    [
        ({"evaluate": {"max_new_tokens": 512}}, "evaluate.max_new_tokens", [256, 512]),
        ({"prune": {"pattern": "2:4"}}, "prune.pattern", ["2:4", "unstructured"]),
        ({"prune": {"mix": {"decode": 0.0}}}, "prune.mix.decode", [0.0, 1.0]),
    ],
)
def test_sweep_points_over_a_nested_key(changes: dict[str, Any], key: str, values: list[Any]) -> None:
    shown = _exp_show(_revision("e1", 0.5, "2026-11-24T09:00:00", **changes))
    swept, points = report.sweep_points(shown, SOURCES, None)
    assert swept == key and list(points) == values
    assert sorted(m["rac"]["accuracy"] for m in points.values()) == [0.5, 0.9]  # the experiment and the workspace


def test_sweep_points_needs_a_key_where_experiments_vary_several() -> None:
    shown = _exp_show(
        _revision("e1", 0.5, "2026-11-24T09:00:00", pruner="wanda"),
        _revision("e2", 0.6, "2026-11-24T09:10:00", sparsity=0.5),
        _revision("e3", 0.7, "2026-11-24T09:20:00", evaluate={"max_new_tokens": 512}),
    )
    with pytest.raises(
        RacError, match=r"vary different params \['evaluate.max_new_tokens', 'pruner', 'sparsity'\]; pass --key"
    ):
        report.sweep_points(shown, SOURCES, None)
    key, points = report.sweep_points(shown, SOURCES, "pruner")
    assert key == "pruner" and list(points) == ["sparsegpt", "wanda"]
    assert list(report.sweep_points(shown, SOURCES, "evaluate.max_new_tokens").points) == [256, 512]
    with pytest.raises(RacError, match="--key 'sparsty' is not a param"):
        report.sweep_points(shown, SOURCES, "sparsty")


def test_sweep_points_skips_unfinished_experiments() -> None:
    failed = _revision("e1", 0.95, "2026-11-24T09:00:00", sparsity=0.5)
    failed["error"] = {"type": "ReproductionError", "msg": "failed"}
    partial = _revision("e2", 0.95, "2026-11-24T09:00:00", sparsity=0.6)
    del partial["data"]["metrics"]["data/evaluate/rac/metrics.json"]
    shown = _exp_show(failed, partial)
    assert list(report.sweep_points(shown, SOURCES, "sparsity").points) == [0.7]  # the workspace alone
    with pytest.raises(RacError, match="no finished experiment differs from the workspace in one param"):
        report.sweep_points(shown, SOURCES, None)


def test_sweep_points_without_any_metrics() -> None:
    shown = _exp_show()
    for revision in shown:
        revision["data"]["metrics"] = {}
    with pytest.raises(RacError, match="no finished experiment has metrics for every source"):
        report.sweep_points(shown, SOURCES, None)


def test_sweep_points_without_revisions() -> None:
    with pytest.raises(RacError, match="lists no revisions"):
        report.sweep_points([], SOURCES, None)


def test_categorical_sweep_table_with_parseable_answers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shown = _exp_show(
        _revision("e1", 0.5, "2026-11-24T09:00:00", pruner="wanda"),
        _revision("e2", 0.4, "2026-11-24T09:10:00", pruner="magnitude"),
    )
    for revision in [*shown, *(e["revs"][0] for e in shown[1]["experiments"])]:
        for name in ["dense", *SOURCES]:
            revision["data"]["metrics"][f"data/evaluate/{name}/metrics.json"]["data"]["frac_parseable"] = 0.75
    rows, table = _run_experiments(tmp_path, monkeypatch, shown, None)
    assert list(rows[0])[:2] == ["pruner", "dense_accuracy"] and "rac_frac_parseable" in rows[0]
    assert [r["pruner"] for r in rows] == ["magnitude", "sparsegpt", "wanda"]
    assert [float(r["rac_accuracy"]) for r in rows] == [0.4, 0.9, 0.5]
    assert table.startswith("Sweep of `pruner`: sparsity 0.7, ") and "pruner `" not in table
    assert "| pruner | prompt | rac |" in table  # the pruner does not change dense: it is in the head
    assert "| wanda | 0.500 ± 0.010 (1.0 s, 50 tok/s) | 0.500 ± 0.010 (1.0 s, 50 tok/s) |" in table
    assert "fraction with a parseable answer" in table and "| wanda | 90.0 / 0.100 / 0.750 |" in table


def test_numeric_sweep_table_shows_dense_where_it_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    longer = _revision("e1", 0.95, "2026-11-24T09:00:00", evaluate={"max_new_tokens": 512})
    longer["data"]["metrics"]["data/evaluate/dense/metrics.json"]["data"]["accuracy"] = 0.97
    shown = _exp_show(longer, _revision("e2", 0.3, "2026-11-24T09:10:00", evaluate={"max_new_tokens": 64}))
    rows, table = _run_experiments(tmp_path, monkeypatch, shown, None)
    assert list(rows[0])[:2] == ["evaluate.max_new_tokens", "dense_accuracy"] and "rac_frac_parseable" not in rows[0]
    assert [int(r["evaluate.max_new_tokens"]) for r in rows] == [64, 256, 512]
    assert "| evaluate.max_new_tokens | dense | prompt | rac |" in table and "dense:" not in table
    assert (
        "| 512 | 0.970 ± 0.010 (1.0 s, 50 tok/s) | 0.950 ± 0.010 (1.0 s, 50 tok/s) |" in table
        and "parseable" not in table
    )  # not every point has it


def test_ambiguous_sweep_needs_key_on_the_command_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, params_file: Callable[..., Path]
) -> None:
    shown = _exp_show(
        _revision("e1", 0.5, "2026-11-24T09:00:00", pruner="wanda"),
        _revision("e2", 0.6, "2026-11-24T09:10:00", sparsity=0.5),
    )
    monkeypatch.setattr(report, "exp_show", lambda: shown)
    params = params_file(ROOT / "data" / "embedded", {"sources": SOURCES})
    args = ["report", "--params", str(params), "--experiments", "--out", str(tmp_path / "out")]
    assert_bad_input(CliRunner().invoke(main, args), "vary different params ['pruner', 'sparsity']", "pass --key")
    assert not (tmp_path / "out").exists()
    result = CliRunner().invoke(main, [*args, "--key", "sparsity"])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((tmp_path / "out" / "sweep.csv").open()))
    assert [(r["sparsity"], r["rac_accuracy"]) for r in rows] == [("0.5", "0.6"), ("0.7", "0.9")]


@pytest.mark.parametrize("args", [[], ["--evaluations", "data/evaluate", "--experiments"]])
def test_report_needs_one_input(args: list[str], tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["report", *args, "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and result.stderr.startswith("rac: error: rac report needs exactly one of")
    assert not (tmp_path / "out").exists()


def test_experiments_outside_a_dvc_repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    params = Path(__file__).parents[1] / "params.yaml"
    result = CliRunner().invoke(main, ["report", "--params", str(params), "--experiments", "--out", "out"])
    assert result.exit_code == 2, result.output
    assert len(result.stderr.splitlines()) == 1 and "`dvc exp show --json` failed" in result.stderr
    assert not (tmp_path / "out").exists()
