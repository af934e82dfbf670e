"""A sparsity sweep through the DVC queue, reported as the paper's table 1 and figure 1 (slow: real pipeline)."""

import csv
import json
import time
from pathlib import Path

import pytest
from conftest import DVC, SMALL_PIPELINE, dvc_project, git_commit, run_cmd

from stages import report


def _wait_for_queue(repo: Path, timeout_s: float) -> str:
    """Poll `dvc queue status` until no task is queued or running; its last output."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = run_cmd([*DVC, "queue", "status"], repo)
        if not any(word in status for word in ("Queued", "Running")):
            return status
        time.sleep(5)
    raise AssertionError(f"the queue did not finish in {timeout_s} s:\n{status}")


@pytest.mark.slow
def test_queued_sweep_gives_table_and_figure(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    params = dvc_project(repo, SMALL_PIPELINE)
    run_cmd([*DVC, "repro"], repo)
    git_commit(repo, "baseline at sparsity 0.6")

    queued = run_cmd([*DVC, "exp", "run", "--queue", "-S", "sparsity=0.3,0.5,0.7"], repo)
    assert queued.count("Queued experiment") == 3, queued
    run_cmd([*DVC, "queue", "start"], repo)
    status = _wait_for_queue(repo, timeout_s=1500)
    assert status.count("Success") == 3, status

    run_cmd(["rac", "report", "--experiments", "--out", "data/sweep"], repo)
    sweep = repo / "data" / "sweep"
    rows = list(csv.DictReader((sweep / "sweep.csv").open()))
    assert [float(r["sparsity"]) for r in rows] == [0.3, 0.5, 0.6, 0.7]  # three experiments and the baseline
    table = (sweep / "table.md").read_text()
    shown = json.loads(run_cmd([*DVC, "exp", "show", "--json"], repo))
    key, points = report.sweep_points(shown, params["sources"], None)
    assert key == "sparsity" and table.startswith("Sweep of `sparsity`: pruner `sparsegpt`")
    for sparsity, models in points.items():
        for source in params["sources"]:
            m = models[source]
            timing = f"{m['wall_seconds']:.1f} s, {m['tokens_per_second']:.0f} tok/s"
            assert f"{m['accuracy']:.3f} ± {m['accuracy_se']:.3f} ({timing})" in table
            assert float(rows[list(points).index(sparsity)][f"{source}_accuracy"]) == m["accuracy"]
        assert table.count(f"| {sparsity:g} | ") == 2  # the accuracy table and the CoT length table
    # Pruning harder never helps the embedded reasoner much: RAC at 0.3 is at least as good as at 0.7.
    assert points[0.3]["rac"]["accuracy"] >= points[0.7]["rac"]["accuracy"]
    assert (sweep / "figure1.png").read_bytes().startswith(b"\x89PNG")

    plots = json.loads(run_cmd([*DVC, "plots", "show", "--json"], repo))["data"]
    (accuracy,) = plots["accuracy against sparsity per calibration source"]
    lines = {(v["field"], float(v["sparsity"])) for v in accuracy["content"]["data"]["values"]}
    assert lines == {(f"{n}_accuracy", x) for n in ["dense", *params["sources"]] for x in (0.3, 0.5, 0.6, 0.7)}
