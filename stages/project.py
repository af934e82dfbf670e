"""A rac project in any git repository: ``rac init`` writes the pipeline, the params and the embedded model there.

Reads: the pipeline (dvc.yaml), params.yaml, the embedded reasoner and the presets shipped in the package
(``stages/template/``: in this repository, links to its own files, so this repo is one such project).
Writes: ``dvc.yaml``, ``params.yaml`` (with a preset merged, if given), ``data/embedded/`` and DVC's set-up
(``dvc init`` where the repository has none, with rac's cache settings) in the target repository.
"""

import logging
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from stages.errors import RacError
from stages.params import apply_preset

log = logging.getLogger(__name__)

TEMPLATE = Path(__file__).resolve().parent / "template"
# rac never edits an out in place (writers build elsewhere and rename), so hardlinks from the cache are safe.
CACHE_TYPE = "hardlink,copy"


def preset_path(preset: str) -> Path:
    """A shipped preset by name (``r1-distill-qwen-7b``) or a preset file by path."""
    shipped = TEMPLATE / "presets" / f"{preset}.yaml"
    if shipped.is_file():
        return shipped
    path = Path(preset)
    if not path.is_file():
        names = sorted(p.stem for p in (TEMPLATE / "presets").glob("*.yaml"))
        raise RacError(f"preset {preset!r} is neither a shipped preset {names} nor a file")
    return path


def init(repo: Path, preset: str | None) -> None:
    """Make ``repo`` (a git repository) a rac project; refuse, writing nothing, if it is one already."""
    if not (repo / ".git").exists():
        raise RacError(f"{str(repo)!r} is not a git repository; run `git init` there first")
    present = [name for name in ("dvc.yaml", "params.yaml", "data/embedded") if (repo / name).exists()]
    if present:
        raise RacError(f"{str(repo)!r} already has {present}; rac init writes them, so remove them or use another repo")
    with tempfile.TemporaryDirectory() as tmp:
        params = Path(tmp) / "params.yaml"
        shutil.copyfile(TEMPLATE / "params.yaml", params)
        if preset is not None:
            apply_preset(params, preset_path(preset))  # a bad preset is refused before anything is written
        if not (repo / ".dvc").is_dir():
            _dvc(repo, "init", "-q")
        _dvc(repo, "config", "cache.type", CACHE_TYPE)
        shutil.copytree(TEMPLATE / "embedded", repo / "data" / "embedded")
        shutil.copyfile(params, repo / "params.yaml")
    shutil.copyfile(TEMPLATE / "pipeline.yaml", repo / "dvc.yaml")  # last: a repo with dvc.yaml is whole
    log.info("rac project in %s: `dvc repro` runs its pipeline", repo)


def _dvc(repo: Path, *args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RacError(f"dvc {' '.join(args)} failed in {str(repo)!r}: {done.stderr.strip().splitlines()[-1:]}")
