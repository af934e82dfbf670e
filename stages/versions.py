"""Implementation versions: each stage's cache key is its params, its input artifacts and its version here.

A stage's version changes when, and only when, what the stage writes would change for the same inputs: a new
error message, a refactor or a new stage changes none, so upgrading rac re-runs nothing; a change of the Hessian
math bumps ``hessians`` and DVC re-runs hessians and what reads its stores. ``tests/test_versions.py`` holds
fingerprints of every stage's output on a small fixed input and fails, naming the version to bump, when an
output changes while its version does not.

Reads: nothing. Writes (``rac versions --out DIR``): ``DIR/<stage>.json`` for every stage, the file its
DVC stage depends on instead of rac's source files.
"""

import json
from pathlib import Path

from stages.schemas import atomic_path

# stage -> implementation version; the stage's module and everything of rac it imports are covered.
VERSIONS: dict[str, int] = {
    "rollout": 1,
    "calibrate": 1,
    "hessians": 1,
    "losses": 1,
    "prune": 2,
    "evaluate": 1,
    "analyze": 1,
    "report": 1,
}


def write(out: Path) -> None:
    """Write each stage's version to ``out/<stage>.json``, leaving files that already say it untouched."""
    out.mkdir(parents=True, exist_ok=True)
    for stage, version in VERSIONS.items():
        path = out / f"{stage}.json"
        text = json.dumps({"stage": stage, "version": version}) + "\n"
        if not path.exists() or path.read_text() != text:
            with atomic_path(path) as tmp:
                tmp.write_text(text)
