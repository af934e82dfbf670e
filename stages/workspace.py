"""The project's scratch space: partial Hessian builds under ``<repo>/.rac/partial``, their locks, and
``rac clean``, which removes the builds and temporary artifacts that killed runs left behind.

The repository is found from the artifact's path (the nearest ancestor holding ``.dvc`` or ``.git``),
never from the working directory, so a build started from a subdirectory resumes the same partial build.
"""

import contextlib
import fcntl
import logging
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from stages.errors import RacError
from stages.schemas import TMP_MARK

log = logging.getLogger(__name__)

LOCK = "lock"
# Folders that hold no artifacts of rac: never searched for stale temporaries.
_SKIP = {".git", ".dvc", ".venv", ".rac", "node_modules", "__pycache__"}
_TMP = re.compile(rf"^\..+{re.escape(TMP_MARK)}(\d+)-[0-9a-f]{{8}}$")


def repo_root(path: Path) -> Path:
    """The nearest ancestor of ``path`` (resolved) that holds ``.dvc`` or ``.git``; else ``path``'s folder."""
    path = Path(path).resolve()
    start = path if path.is_dir() else path.parent
    for folder in (start, *start.parents):
        if (folder / ".dvc").is_dir() or (folder / ".git").exists():
            return folder
    return start


def partial_root(artifact: Path) -> Path:
    """Where partial builds of ``artifact``'s repository live."""
    return repo_root(Path(artifact).parent) / ".rac" / "partial"


@contextlib.contextmanager
def build_lock(work: Path) -> Iterator[None]:
    """Hold ``work/lock`` for the block: a second build of the same inputs is refused, not interleaved.

    flock is released by the kernel when the process dies, so a killed build never leaves a stale lock.
    """
    work.mkdir(parents=True, exist_ok=True)
    path = work / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            holder = path.read_text().strip() or "?"
            raise RacError(
                f"another Hessian build of these inputs (pid {holder}) is using {str(work)!r}; "
                "wait for it to finish, or stop it and rerun"
            ) from err
        # The holder may have removed the folder between our open and flock: then this lock guards nothing.
        if not path.exists() or os.stat(path).st_ino != os.fstat(fd).st_ino:
            raise RacError(f"the partial build {str(work)!r} was removed while this build started; rerun")
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        os.close(fd)


def remove_build(work: Path) -> None:
    """Remove the partial build ``work``, and ``.rac/partial`` and ``.rac`` once they are empty."""
    shutil.rmtree(work, ignore_errors=True)
    for folder in (work.parent, work.parent.parent):
        with contextlib.suppress(OSError):  # not empty: another build's folder is there
            folder.rmdir()


def _held(work: Path) -> bool:
    """Whether a running build holds ``work``'s lock."""
    path = work / LOCK
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@dataclass(frozen=True)
class Leftover:
    """A partial build or temporary artifact; ``running`` when its process is still alive."""

    path: Path
    kind: str  # "partial build" | "activations" | "temporary"
    running: bool
    bytes: int


def leftovers(root: Path) -> list[Leftover]:
    """Partial builds under ``root/.rac/partial``, activation scratch folders under ``root/.rac/activations`` and
    temporaries (``.<name>.tmp-<pid>-<hex>``) in the tree."""
    found = []
    partial = root / ".rac" / "partial"
    if partial.is_dir():
        for work in sorted(partial.iterdir()):
            found.append(Leftover(work, "partial build", _held(work), _size(work)))
    scratch = root / ".rac" / "activations"
    if scratch.is_dir():
        for folder in sorted(scratch.iterdir()):
            match = _TMP.match(folder.name)
            found.append(Leftover(folder, "activations", not match or _alive(int(match.group(1))), _size(folder)))
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _SKIP]
        for name in [*dirs, *files]:
            match = _TMP.match(name)
            if match:
                path = Path(folder) / name
                found.append(Leftover(path, "temporary", _alive(int(match.group(1))), _size(path)))
        dirs[:] = [d for d in dirs if not _TMP.match(d)]
    return found


def clean(root: Path, dry_run: bool) -> list[Leftover]:
    """Remove the leftovers of ``root`` whose process is gone (all of them listed); return those removed."""
    if not root.is_dir():
        raise RacError(f"{str(root)!r} is not a folder; run rac clean in the project, or pass --root")
    removed = []
    for item in leftovers(root):
        state = "running, kept" if item.running else ("would remove" if dry_run else "removed")
        print(f"{item.kind:<14} {item.bytes / 2**20:>10.1f} MB  {state:<13} {item.path}")
        if item.running or dry_run:
            continue
        if item.path.is_dir():
            shutil.rmtree(item.path)
        else:
            item.path.unlink()
        removed.append(item)
    if not dry_run:
        for folder in (root / ".rac" / "activations", root / ".rac" / "partial", root / ".rac"):
            with contextlib.suppress(OSError):  # absent, or not empty: a running build's folder is there
                folder.rmdir()
    print(f"{len(removed)} removed, {sum(i.bytes for i in removed) / 2**20:.1f} MB freed")
    return removed
