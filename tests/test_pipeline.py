"""The real pipeline through DVC: `dvc repro`, then `dvc repro -f` gives a byte-identical dvc.lock (every out
is a pure function of its inputs), then `dvc exp run -S sparsity=… -S prune.allocation=owl` re-runs only prune,
evaluate and report, and leaves the Hessian stores and loss tables untouched; a teammate pulls the caches;
upgrading rac re-runs only the stages whose implementation version moved."""

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
from conftest import DVC, ROOT, SMALL_PIPELINE, dvc_project, git_commit, run_cmd

UPSTREAM = ("rollout", "calibrate@", "hessians@", "losses@")


def _tree_digest(path: Path) -> dict[str, str]:
    return {
        str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(path.rglob("*"))
        if f.is_file()
    }


@pytest.mark.slow
def test_repro_then_sparsity_experiment_reuses_hessians(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    params = dvc_project(repo, SMALL_PIPELINE)

    first = run_cmd([*DVC, "repro"], repo)
    for stage in ("rollout", "hessians@rac", "prune@rac", "evaluate_dense", "evaluate@rac", "analyze", "report"):
        assert f"Running stage '{stage}'" in first
    assert (repo / "data" / "analyze" / "heatmap.png").read_bytes().startswith(b"\x89PNG")
    table = (repo / "data" / "report" / "table.md").read_text()
    assert "| rac |" in table and "| dense |" in table
    stores = {s: _tree_digest(repo / "data" / "hessians" / f"{s}.zarr") for s in params["sources"]}
    # cache.type hardlink: every chunk of a store is one inode shared with .dvc/cache, never a second copy. (DVC
    # copies a file whose bytes another file of the out already has: only the small, identical zarr.json files.)
    chunks = [f for f in (repo / "data" / "hessians").rglob("*") if f.is_file() and "/c/" in str(f)]
    assert chunks and {f.stat().st_nlink for f in chunks} == {2}
    lock = (repo / "dvc.lock").read_bytes()
    timings = json.loads((repo / "data" / "timings" / "evaluate-rac.json").read_text())
    assert timings["wall_seconds"] > 0 and timings["stage_seconds"] >= timings["wall_seconds"]
    assert "wall_seconds" not in json.loads((repo / "data" / "evaluate" / "rac" / "metrics.json").read_text())
    forced = run_cmd([*DVC, "repro", "-f"], repo)
    assert "Running stage 'hessians@rac'" in forced and "Running stage 'report'" in forced
    assert (repo / "dvc.lock").read_bytes() == lock  # same inputs, same bytes: timings live outside the outs
    mtimes = {s: (repo / "data" / "hessians" / f"{s}.zarr" / "zarr.json").stat().st_mtime_ns for s in stores}
    git_commit(repo, "repro")

    second = run_cmd([*DVC, "exp", "run", "-S", "sparsity=0.5", "-S", "prune.allocation=owl"], repo)
    ran = [line for line in second.splitlines() if line.startswith("Running stage")]
    assert not [line for line in ran if any(f"'{u}" in line for u in UPSTREAM)], ran
    assert "Running stage 'evaluate_dense'" not in second
    for stage in ("prune@generic", "prune@prompt", "prune@rac", "evaluate@rac", "analyze", "report"):
        assert f"Running stage '{stage}'" in second
    for s in stores:  # same bytes, and never rewritten
        assert _tree_digest(repo / "data" / "hessians" / f"{s}.zarr") == stores[s]
        assert (repo / "data" / "hessians" / f"{s}.zarr" / "zarr.json").stat().st_mtime_ns == mtimes[s]
    report = json.loads((repo / "data" / "prune" / "rac" / "report.json").read_text())
    assert report["target_sparsity"] == 0.5
    assert abs(report["achieved_sparsity"] - 0.5) < 1e-3
    assert report["allocation"]["method"] == "owl" and len(set(report["allocation"]["targets"])) > 1
    # The JSON, then DVC's note on stderr that the sweep's plots have no data yet.
    plots = json.JSONDecoder().raw_decode(run_cmd([*DVC, "plots", "show", "--json"], repo))[0]["data"]
    (targets,) = plots["per-layer target sparsity per calibration source"]
    points = {(v["filename"], int(v["layer"])) for v in targets["content"]["data"]["values"]}
    assert len(points) == len(params["sources"]) * params["toy"]["num_layers"], points

    shown = json.loads(run_cmd([*DVC, "exp", "show", "--json"], repo))
    assert "data/evaluate/rac/metrics.json" in json.dumps(shown)

    # A teammate's view through a local-directory remote: push, lose cache and outs, pull, prune again.
    run_cmd([*DVC, "remote", "add", "-d", "team", str(tmp_path / "remote")], repo)
    run_cmd([*DVC, "push"], repo)
    shutil.rmtree(repo / ".dvc" / "cache")
    for out in ("rollout", "calibrate", "hessians"):
        shutil.rmtree(repo / "data" / out)
    run_cmd([*DVC, "pull", "rollout", "calibrate", "hessians"], repo)
    assert "changed" not in run_cmd([*DVC, "status", "rollout", "calibrate", "hessians"], repo)
    for s in stores:
        assert _tree_digest(repo / "data" / "hessians" / f"{s}.zarr") == stores[s]
    again = run_cmd([*DVC, "exp", "run", "-S", "sparsity=0.4"], repo)
    assert not [line for line in again.splitlines() if line.startswith("Running stage") and "'hessians@" in line]
    assert "Running stage 'prune@rac'" in again

    # Upgrading rac, with a copy of its code as the installed rac. An edited error message in params validation
    # changes no implementation version: nothing re-runs.
    code = tmp_path / "upgraded" / "stages"
    shutil.copytree(ROOT / "stages", code, ignore=shutil.ignore_patterns("template", "__pycache__"))
    params_py = code / "params.py"
    params_py.write_text(params_py.read_text().replace("or fix the spelling", "or correct the spelling"))
    assert "Running stage" not in _dry_run(repo, code)
    # A solver change that moves the pruned weights comes with prune's version bumped: prune re-runs (and DVC then
    # re-runs what reads the models it rewrites), nothing upstream of it.
    versions_py = code / "versions.py"
    bumped = re.sub(r'"prune": (\d+),', lambda m: f'"prune": {int(m[1]) + 1},', versions_py.read_text())
    assert bumped != versions_py.read_text()
    versions_py.write_text(bumped)
    would = {line.split("'")[1] for line in _dry_run(repo, code).splitlines() if line.startswith("Running stage")}
    assert would == {f"prune@{s}" for s in stores}


def _dry_run(repo: Path, code: Path) -> str:
    """What `dvc repro` would run after the implementation versions of rac at ``code`` are written."""
    run_cmd([*DVC, "repro", "versions"], repo, rac_from=code.parent)
    return "\n".join(
        line
        for line in run_cmd([*DVC, "repro", "--dry"], repo, rac_from=code.parent).splitlines()
        if line.startswith("Running stage") and "'versions'" not in line and "'model'" not in line
    )
