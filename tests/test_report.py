"""The report: the sweep is read from `dvc exp show --json` as DVC 3 writes it; bad calls are one-line errors."""

from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from stages import report
from stages.cli import main
from stages.errors import RacError

SOURCES = ["prompt", "rac"]


def _revision(rev: str, sparsity: float, accuracy: float, timestamp: str | None, **params: Any) -> dict[str, Any]:
    metrics = {
        f"data/evaluate/{name}/metrics.json": {"data": {"accuracy": accuracy}} for name in ["dense", *SOURCES]
    } | {f"data/timings/evaluate-{name}.json": {"data": {"wall_seconds": 1.0}} for name in ["dense", *SOURCES]}
    return {
        "rev": rev,
        "name": None,
        "error": None,
        "data": {
            "rev": rev,
            "timestamp": timestamp,
            "params": {"params.yaml": {"data": {"sparsity": sparsity, "pruner": "sparsegpt", **params}}},
            "metrics": metrics,
        },
    }


def _exp_show(*experiments: dict[str, Any]) -> list[dict[str, Any]]:
    """The workspace, its baseline commit, and ``experiments`` below the baseline, as `dvc exp show --json`."""
    workspace = _revision("workspace", 0.7, 0.9, None)
    baseline = _revision("abc123", 0.7, 0.9, "2026-11-24T08:00:00")
    baseline["experiments"] = [{"name": e["rev"], "executor": None, "revs": [e]} for e in experiments]
    return [workspace, baseline]


def test_sweep_points_one_per_sparsity() -> None:
    shown = _exp_show(
        _revision("e1", 0.5, 0.95, "2026-11-24T09:00:00"),
        _revision("e2", 0.5, 0.97, "2026-11-24T10:00:00"),  # newer: wins
        _revision("e3", 0.3, 0.99, "2026-11-24T09:30:00"),
        _revision("e4", 0.4, 0.5, "2026-11-24T09:40:00", pruner="wanda"),  # another pruner: not this sweep
    )
    points = report.sweep_points(shown, SOURCES)
    assert list(points) == [0.3, 0.5, 0.7]
    assert points[0.5]["rac"]["accuracy"] == 0.97
    assert set(points[0.3]) == {"dense", "prompt", "rac"}


def test_sweep_points_skips_unfinished_experiments() -> None:
    failed = _revision("e1", 0.5, 0.95, "2026-11-24T09:00:00")
    failed["error"] = {"type": "ReproductionError", "msg": "failed"}
    partial = _revision("e2", 0.6, 0.95, "2026-11-24T09:00:00")
    del partial["data"]["metrics"]["data/evaluate/rac/metrics.json"]
    assert list(report.sweep_points(_exp_show(failed, partial), SOURCES)) == [0.7]


def test_sweep_points_without_any_metrics() -> None:
    shown = _exp_show()
    for revision in shown:
        revision["data"]["metrics"] = {}
    with pytest.raises(RacError, match="no finished experiment has metrics for every source"):
        report.sweep_points(shown, SOURCES)


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
