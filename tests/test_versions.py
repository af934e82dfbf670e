"""Cache keys: every stage is keyed by its implementation version (stages/versions.py), never by rac's source
files, and its output on a small fixed input matches the fingerprints recorded for that version.

When an output changes, the test names the stage whose version to bump; after bumping it (or after a change
that moves no output), ``RAC_UPDATE_GOLDEN=1 pytest tests/test_versions.py`` rewrites tests/golden/stages.json.
"""

import hashlib
import json
import math
import os
import platform
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
import zarr
from safetensors.numpy import load_file

from stages import analyze, calibrate, evaluate, hessians, losses, prune, report, rollout
from stages.params import Params, load_params
from stages.versions import VERSIONS

ROOT = Path(__file__).resolve().parents[1]
EMBEDDED = ROOT / "data" / "embedded"
GOLDEN = Path(__file__).parent / "golden" / "stages.json"
# Floats are compared, not hashed: another BLAS build or CPU sums in another order and moves each fp32 value by
# ~1e-7 of the array's norm; RTOL (of the norm) is 100x that, yet a single entry moved by 1e-5 of the norm shows.
RTOL, ATOL = 1e-5, 1e-9
PROJECTIONS = 8
SOURCES = ["prompt", "rac"]  # analyze needs both
# The stages whose outputs each stage reads: a stage whose inputs changed is re-run by DVC anyway.
UPSTREAM = {
    "rollout": [],
    "calibrate": ["rollout"],
    "hessians": ["calibrate"],
    "losses": ["hessians"],
    "prune": ["hessians", "losses"],
    "evaluate": ["prune"],
    "analyze": ["prune"],
    "report": ["evaluate"],
}
SMALL = {
    "sources": SOURCES,
    "sparsity": 0.5,
    "rollout": {"backend": "hf", "n_prompts": 12, "max_new_tokens": 48},
    "calibrate": {"budget_tokens": 400},
    "hessians": {"chunk": 32},
    "losses": {"pruners": ["sparsegpt"], "sparsities": [0.4, 0.5, 0.6]},
    "activations": {"batch_tokens": 256},
    "evaluate": {"backend": "hf", "n_problems": 4, "max_new_tokens": 48},
    "analyze": {"backend": "hf", "n_problems": 2, "max_new_tokens": 24},
}


def _machine() -> str:
    """The kind of CPU, which decides float summation orders: fingerprints hold on the kind they were recorded
    on, while another kind may flip a near-tied pruning decision and move every output after it."""
    cpuinfo = Path("/proc/cpuinfo")
    text = cpuinfo.read_text() if cpuinfo.exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "")
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    units = sorted(set(flags) & {"fma", "avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile"})
    return " ".join([platform.machine(), model or platform.processor(), *units])


def _dvc_stages() -> dict[str, dict[str, Any]]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def test_every_stage_is_keyed_by_its_version_and_no_source_file() -> None:
    stages = _dvc_stages()
    written = [next(iter(o)) if isinstance(o, dict) else o for o in stages["versions"]["outs"]]
    assert written == [f"data/versions/{v}.json" for v in VERSIONS]
    used = set()
    for name, stage in stages.items():
        body = stage.get("do", stage)
        deps = body.get("deps", [])
        assert not [d for d in deps if d.startswith("stages")], f"{name} depends on source files: {deps}"
        if name in ("versions", "model"):
            continue
        keyed = [d for d in deps if d.startswith("data/versions/")]
        assert len(keyed) == 1, f"{name} must depend on exactly one data/versions/<stage>.json"
        used.add(Path(keyed[0]).stem)
    assert used == set(VERSIONS)


def _floats(values: np.ndarray) -> dict[str, Any]:
    """A float array's fingerprint: its L2 norm and its projections on fixed Gaussian directions, in float64."""
    x = np.asarray(values, dtype=np.float64).ravel()
    directions = np.random.default_rng(0).standard_normal((PROJECTIONS, x.size))
    return {"norm": float(np.linalg.norm(x)), "proj": [float(v) for v in directions @ x]}


def _json(value: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict):
        for k in sorted(value):
            yield from _json(value[k], f"{prefix}.{k}")
    elif isinstance(value, list) and value and all(isinstance(v, float) for v in value):
        yield prefix, _floats(np.array(value))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _json(v, f"{prefix}[{i}]")
    else:
        yield prefix, value


def _fingerprint_file(path: Path, name: str) -> Iterator[tuple[str, Any]]:
    if path.suffix == ".parquet":
        table = pq.read_table(path)
        for column in table.column_names:
            values = table.column(column).to_pylist()
            flat = [v for row in values for v in (row if isinstance(row, list) else [row])]
            if flat and all(isinstance(v, float) for v in flat):
                yield f"{name}:{column}", _floats(np.array(flat))
            else:
                yield f"{name}:{column}", hashlib.sha256(json.dumps(values).encode()).hexdigest()
    elif path.suffix == ".json":
        yield from _json(json.loads(path.read_text()), name)
    elif path.suffix == ".safetensors":
        for key, tensor in sorted(load_file(path).items()):
            yield f"{name}:{key}", [list(tensor.shape), _floats(tensor)]
    elif path.suffix in (".md", ".csv", ".txt"):
        yield name, hashlib.sha256(path.read_bytes()).hexdigest()
    # figures (.png) are drawn by matplotlib: its version, not rac's, decides their bytes


def fingerprint(out: Path) -> dict[str, Any]:
    """What a stage wrote under ``out``: exact for ids, text and structure, floats as ``_floats``."""
    found: dict[str, Any] = {}
    if out.suffix == ".zarr":
        group = zarr.open_group(out, mode="r")
        found.update(_json(dict(group.attrs), "attrs"))
        for path, array in _arrays(group):
            found[f"array:{path}"] = [list(array.shape), _floats(array[...])]
        return found
    for path in sorted(out.rglob("*") if out.is_dir() else [out]):
        if path.is_file():
            found.update(_fingerprint_file(path, str(path.relative_to(out)) if out.is_dir() else path.name))
    return found


def _arrays(group: zarr.Group, prefix: str = "") -> Iterator[tuple[str, zarr.Array]]:
    for name, member in sorted(group.members(), key=lambda m: m[0]):
        if isinstance(member, zarr.Group):
            yield from _arrays(member, f"{prefix}{name}/")
        else:
            yield f"{prefix}{name}", member


def _close(a: Any, b: Any) -> bool:
    if isinstance(a, dict) and set(a) == set(b) == {"norm", "proj"}:
        tol = RTOL * max(a["norm"], b["norm"]) + ATOL
        deltas = [abs(a["norm"] - b["norm"])] + [abs(x - y) for x, y in zip(a["proj"], b["proj"], strict=True)]
        return max(deltas) <= tol
    if isinstance(a, float) or isinstance(b, float):
        return (
            isinstance(a, int | float) and isinstance(b, int | float) and math.isclose(a, b, rel_tol=RTOL, abs_tol=ATOL)
        )
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _diff(now: dict[str, Any], then: dict[str, Any]) -> list[str]:
    keys = sorted(set(now) | set(then))
    return [k for k in keys if k not in now or k not in then or not _close(now[k], then[k])]


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every stage run once on the embedded model with small settings and the generation in transformers."""
    tmp = tmp_path_factory.mktemp("versions")
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for key, value in SMALL.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) else value
    raw["model"] = "data/embedded"  # as shipped: a path relative to the project, recorded in the stores
    shutil.copytree(EMBEDDED, tmp / "data" / "embedded")
    (tmp / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    data = Path("data")  # relative, as dvc.yaml passes them: paths recorded in an out are the same on every run
    cwd, threads = Path.cwd(), torch.get_num_threads()
    os.chdir(tmp)
    torch.set_num_threads(1)  # one summation order (an in-process vLLM engine may have raised it)
    try:
        p: Params = load_params(Path("params.yaml"))
        rollout.run(p, data / "rollout" / "traces.parquet", p.dense)
        for source in SOURCES:
            calibrate.run(p, source, data / "rollout" / "traces.parquet", data / "calibrate" / f"{source}.parquet")
            store = data / "hessians" / f"{source}.zarr"
            hessians.run(p, data / "calibrate" / f"{source}.parquet", store, 1)
            losses.run(p, store, data / "losses" / f"{source}.parquet")
            prune.run(p, store, None, data / "prune" / source, data / "losses" / f"{source}.parquet")
            evaluate.run(p, str(data / "prune" / source), data / "evaluate" / source)
        evaluate.run(p, p.dense, data / "evaluate" / "dense")
        analyze.run(p, data / "prune", data / "analyze")
        report.run(p, data / "evaluate", data / "report")
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)
    data = tmp / "data"
    return {
        "rollout": data / "rollout",
        "calibrate": data / "calibrate",
        "hessians": data / "hessians" / "rac.zarr",
        "losses": data / "losses" / "rac.parquet",
        "prune": data / "prune" / "rac",
        "evaluate": data / "evaluate" / "rac",
        "analyze": data / "analyze",
        "report": data / "report",
    }


@pytest.mark.slow
def test_outputs_change_only_with_their_version(outputs: dict[str, Path]) -> None:
    now = {stage: {"version": VERSIONS[stage], "fingerprint": fingerprint(outputs[stage])} for stage in VERSIONS}
    if os.environ.get("RAC_UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps({"machine": _machine(), "stages": now}, indent=1, sort_keys=True) + "\n")
    recorded = json.loads(GOLDEN.read_text())
    if recorded["machine"] != _machine():
        pytest.skip(
            f"the fingerprints were recorded on {recorded['machine']!r}, not this {_machine()!r}: check the outputs "
            "here by hand, then record them with RAC_UPDATE_GOLDEN=1"
        )
    golden = recorded["stages"]
    changed = {s: _diff(now[s]["fingerprint"], golden[s]["fingerprint"]) for s in now if s in golden}
    problems = []
    for stage, record in now.items():
        then = golden.get(stage)
        if then is None or then["version"] != record["version"]:
            problems.append(
                f"{stage}: version {record['version']} has no recorded fingerprint; if its output change is "
                "intended, rerun with RAC_UPDATE_GOLDEN=1 to record it"
            )
        elif changed[stage] and not any(changed.get(up) for up in UPSTREAM[stage]):
            # Same inputs, other output: the stage's own code changed what it computes.
            problems.append(
                f"{stage}: output changed at the same version {record['version']} ({changed[stage][:4]}): bump "
                f"VERSIONS[{stage!r}] in stages/versions.py, then rerun with RAC_UPDATE_GOLDEN=1"
            )
    assert not problems, "\n".join(problems)


def test_fingerprints_see_a_changed_float_and_ignore_summation_order(tmp_path: Path) -> None:
    """The tolerance separates a real change (one weight moved by 1e-3) from fp32 reordering (~1e-7)."""
    from safetensors.numpy import save_file

    w = np.random.default_rng(1).standard_normal((64, 64)).astype(np.float32)
    save_file({"w": w}, tmp_path / "a.safetensors")
    base = fingerprint(tmp_path / "a.safetensors")
    save_file({"w": w * np.float32(1 + 1e-7)}, tmp_path / "a.safetensors")
    assert _diff(fingerprint(tmp_path / "a.safetensors"), base) == []
    moved = w.copy()
    moved[3, 5] += 1e-2  # 1.6e-4 of the norm (64)
    save_file({"w": moved}, tmp_path / "a.safetensors")
    assert _diff(fingerprint(tmp_path / "a.safetensors"), base) == ["a.safetensors:w"]
