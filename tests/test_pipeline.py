"""The real pipeline through DVC: `dvc repro`, then `dvc exp run -S sparsity=…` re-runs only
prune, evaluate and report, and leaves the Hessian stores untouched."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
UPSTREAM = ("rollout", "calibrate@", "hessians@")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # the venv's `rac` and `dvc`
    return env


def _run(args: list[str], cwd: Path) -> str:
    proc = subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout + proc.stderr


def _tree_digest(path: Path) -> dict[str, str]:
    return {
        str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(path.rglob("*"))
        if f.is_file()
    }


@pytest.mark.slow
def test_repro_then_sparsity_experiment_reuses_hessians(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", "stages"):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, repo / name)
    shutil.copytree(ROOT / "data" / "embedded", repo / "data" / "embedded")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["sparsity"] = 0.6
    params["rollout"].update(n_prompts=24, max_new_tokens=160)
    params["calibrate"]["budget_tokens"] = 2000
    params["evaluate"].update(n_problems=24, max_new_tokens=160)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    _run(["git", "init", "-q", "-b", "main"], repo)
    _run([sys.executable, "-m", "dvc", "init", "-q"], repo)
    _run(["git", "add", "-A"], repo)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"], repo)

    first = _run([sys.executable, "-m", "dvc", "repro"], repo)
    for stage in ("rollout", "hessians@rac", "prune@rac", "evaluate_dense", "evaluate@rac", "report"):
        assert f"Running stage '{stage}'" in first
    table = (repo / "data" / "report" / "table.md").read_text()
    assert "| rac |" in table and "| dense |" in table
    stores = {s: _tree_digest(repo / "data" / "hessians" / f"{s}.zarr") for s in params["sources"]}
    mtimes = {s: (repo / "data" / "hessians" / f"{s}.zarr" / "zarr.json").stat().st_mtime_ns for s in stores}
    _run(["git", "add", "-A"], repo)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "repro"], repo)

    second = _run([sys.executable, "-m", "dvc", "exp", "run", "-S", "sparsity=0.5"], repo)
    ran = [line for line in second.splitlines() if line.startswith("Running stage")]
    assert not [line for line in ran if any(f"'{u}" in line for u in UPSTREAM)], ran
    assert "Running stage 'evaluate_dense'" not in second
    for stage in ("prune@generic", "prune@prompt", "prune@rac", "evaluate@rac", "report"):
        assert f"Running stage '{stage}'" in second
    for s in stores:  # same bytes, and never rewritten
        assert _tree_digest(repo / "data" / "hessians" / f"{s}.zarr") == stores[s]
        assert (repo / "data" / "hessians" / f"{s}.zarr" / "zarr.json").stat().st_mtime_ns == mtimes[s]
    report = json.loads((repo / "data" / "prune" / "rac" / "report.json").read_text())
    assert report["target_sparsity"] == 0.5
    assert abs(report["achieved_sparsity"] - 0.5) < 1e-3

    shown = json.loads(_run([sys.executable, "-m", "dvc", "exp", "show", "--json"], repo))
    assert "data/evaluate/rac/metrics.json" in json.dumps(shown)

    # A teammate's view through a local-directory remote: push, lose cache and outs, pull, prune again.
    dvc = [sys.executable, "-m", "dvc"]
    _run([*dvc, "remote", "add", "-d", "team", str(tmp_path / "remote")], repo)
    _run([*dvc, "push"], repo)
    shutil.rmtree(repo / ".dvc" / "cache")
    for out in ("rollout", "calibrate", "hessians"):
        shutil.rmtree(repo / "data" / out)
    _run([*dvc, "pull", "rollout", "calibrate", "hessians"], repo)
    assert "changed" not in _run([*dvc, "status", "rollout", "calibrate", "hessians"], repo)
    for s in stores:
        assert _tree_digest(repo / "data" / "hessians" / f"{s}.zarr") == stores[s]
    again = _run([*dvc, "exp", "run", "-S", "sparsity=0.4"], repo)
    assert not [line for line in again.splitlines() if line.startswith("Running stage") and "'hessians@" in line]
    assert "Running stage 'prune@rac'" in again
