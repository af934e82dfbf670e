"""Running untrusted programs (code a model wrote) one at a time in a throwaway jail, and nothing of them left after.

Each run is a fresh Python process started through a small init (``_INIT``) in new PID, network and mount
namespaces. The init builds a root of its own: a tmpfs holding read-only binds of the system directories and of
the interpreter's prefix, a few device nodes, an empty ``/tmp`` and the program's working folder, then chroots
into it, drops to an unprivileged uid of its own (one per concurrent run, so that one run's process limit is not
another's), sets the resource limits and executes the program. So the program sees no project file, no home, no
network (a new namespace has only a loopback that is down) and no other process; what it writes lives in the
tmpfs, which vanishes with the namespace; and when the init is killed (on the wall-clock limit), the kernel kills
the program, which is the namespace's PID 1, and with it every process it started, however it forked or
detached. Where the kernel refuses namespaces (an unprivileged user without user namespaces), programs run with
the resource limits and a process group only, and ``isolation()`` says so: grading then warns in the log and
records it in the metrics.
"""

import contextlib
import ctypes
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

log = logging.getLogger(__name__)

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x10000000, 0x20000000, 0x40000000
# Unprivileged uids of the runs: one per concurrent run, from here on (far above any login account).
UID_BASE = 2_000_000
# Exit statuses of the init itself (the program's own status is reported through the status file).
INIT_FAILED = 125


@dataclass(frozen=True)
class Limits:
    """What one run of a program may use."""

    wall_seconds: float  # wall clock, then the whole namespace is killed
    cpu_seconds: int  # CPU time (SIGXCPU, then SIGKILL a second later)
    memory_mb: int  # address space of each process
    processes: int  # processes and threads of the run's uid
    file_mb: int  # largest file it may write, stdout included; also the size of its tmpfs


class Outcome(NamedTuple):
    """How one run ended."""

    exit_code: int | None  # None when killed by a signal
    signal: int | None  # the signal that killed the program (SIGKILL on the wall-clock limit)
    timed_out: bool  # killed on the wall-clock limit
    stdout: bytes  # what it printed, at most file_mb
    stderr: bytes  # the last 4 KB of its standard error
    seconds: float  # wall seconds of the run

    @property
    def limit(self) -> str | None:
        """The resource limit that ended the run, if one did (Python ignores SIGXFSZ, so a file or stdout over
        the limit, or a full tmpfs, shows as the OSError it raised)."""
        if self.timed_out:
            return "wall"
        if self.signal in (signal.SIGXCPU, signal.SIGKILL):
            return "cpu"
        tail = self.stderr[-400:]
        if self.signal == signal.SIGXFSZ or b"[Errno 27] File too large" in tail or b"[Errno 28] No space" in tail:
            return "file"
        if b"MemoryError" in tail:
            return "memory"
        if b"[Errno 11] Resource temporarily unavailable" in tail:
            return "processes"
        return None


# The init of a run, executed by the interpreter with ``-I -c``, as root in its new namespaces (or as the user in
# a user namespace). It reads its settings from argv[1] (JSON), builds the jail, forks the program and writes the
# program's wait status to the file descriptor ``status_fd``.
_INIT = r"""
import ctypes, json, os, resource, signal, sys
cfg = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 32, 4096, 16384, 1 << 18

def mount(src, dst, fstype, flags, data=None):
    if libc.mount(src.encode(), dst.encode(), fstype and fstype.encode(), flags, data and data.encode()):
        err = ctypes.get_errno()
        raise OSError(err, f"mount {src} on {dst}: {os.strerror(err)}")

def bind_ro(path, root):
    inside = root + path
    if os.path.islink(path):
        os.makedirs(os.path.dirname(inside), exist_ok=True)
        os.symlink(os.readlink(path), inside)
        return
    if os.path.isdir(path):
        os.makedirs(inside, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(inside), exist_ok=True)
        open(inside, "w").close()
    mount(path, inside, None, MS_BIND | MS_REC)
    mount(path, inside, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)

try:
    program = open(cfg["program"], "rb").read()
    root = cfg["root"]
    mount("none", "/", None, MS_REC | MS_PRIVATE)
    mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, f"size={cfg['file_mb']}m,mode=755")
    for path in cfg["visible"]:
        if os.path.lexists(path):
            bind_ro(path, root)
    os.makedirs(f"{root}/dev", exist_ok=True)
    for name in ("null", "zero", "random", "urandom"):
        open(f"{root}/dev/{name}", "w").close()
        mount(f"/dev/{name}", f"{root}/dev/{name}", None, MS_BIND)
    os.makedirs(f"{root}/tmp", mode=0o1777, exist_ok=True)
    os.chmod(f"{root}/tmp", 0o1777)
    os.makedirs(f"{root}/work", exist_ok=True)
    with open(f"{root}/work/main.py", "wb") as f:
        f.write(program)
    uid = cfg["uid"]
    if uid is not None:
        os.chown(f"{root}/work", uid, uid)
    os.chroot(root)
    os.chdir("/work")
except OSError as err:
    os.write(2, f"sandbox init: {err}\n".encode())
    os._exit(125)
alive_r, alive_w = os.pipe()  # the init holds the write end: EOF on the read end means it is gone
pid = os.fork()
if pid == 0:
    try:
        os.close(alive_w)
        if uid is not None:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG, after the uid change (which clears it)
        os.set_blocking(alive_r, False)
        try:
            if os.read(alive_r, 1) == b"":  # the init died before the death signal was armed
                os._exit(125)
        except BlockingIOError:
            pass
        os.close(alive_r)
        mb = 1 << 20
        resource.setrlimit(resource.RLIMIT_CPU, (cfg["cpu_seconds"], cfg["cpu_seconds"] + 1))
        resource.setrlimit(resource.RLIMIT_AS, (cfg["memory_mb"] * mb, cfg["memory_mb"] * mb))
        resource.setrlimit(resource.RLIMIT_FSIZE, (cfg["file_mb"] * mb, cfg["file_mb"] * mb))
        resource.setrlimit(resource.RLIMIT_NPROC, (cfg["processes"], cfg["processes"]))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        os.execv(cfg["python"], [cfg["python"], "-I", "main.py"])
    except OSError as err:
        os.write(2, f"sandbox init: {err}\n".encode())
        os._exit(125)
os.close(alive_r)
_, status = os.waitpid(pid, 0)
os.write(cfg["status_fd"], json.dumps({"status": status}).encode())
os._exit(0)
"""


def _unshare_flags() -> int | None:
    """The namespaces a run gets here: as root, PID + network + mount; else in a user namespace too; None where
    the kernel refuses both (checked once, in a throwaway child)."""
    for flags in (CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWNS, CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWNS):
        if flags & CLONE_NEWUSER == 0 and os.geteuid() != 0:
            continue
        pid = os.fork()
        if pid == 0:
            os._exit(0 if _libc().unshare(flags) == 0 else 1)
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) == 0:
            return flags
    return None


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


_FLAGS: list[int | None] = []
_FLAGS_LOCK = threading.Lock()


def isolation() -> str:
    """``namespaces`` (root: its own uid per run too), ``user-namespaces`` (no uid of its own: limits on processes
    count the user's), or ``none`` (resource limits and a process group only)."""
    flags = _flags()
    if flags is None:
        return "none"
    return "user-namespaces" if flags & CLONE_NEWUSER else "namespaces"


def _flags() -> int | None:
    with _FLAGS_LOCK:
        if not _FLAGS:
            _FLAGS.append(_unshare_flags())
        return _FLAGS[0]


def _visible() -> list[str]:
    """What a program may read: the system's directories (top-level links kept as links) and the interpreter."""
    system = ["/bin", "/lib", "/lib32", "/lib64", "/libx32", "/usr", "/etc/alternatives", "/etc/ld.so.cache"]
    return [*system, sys.base_prefix]


def _python() -> str:
    """The base interpreter (a virtualenv's python is a link into the project, which a program never sees)."""
    return os.path.realpath(sys.executable)


class _Slots:
    """Uids for concurrent runs: each run holds one, so that RLIMIT_NPROC (per uid) bounds that run alone."""

    def __init__(self) -> None:
        self._free: list[int] = []
        self._next = UID_BASE
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def uid(self) -> Iterator[int]:
        with self._lock:
            uid = self._free.pop() if self._free else self._next
            if uid == self._next:
                self._next += 1
        try:
            yield uid
        finally:
            with self._lock:
                self._free.append(uid)


_SLOTS = _Slots()


def run(program: str, stdin: str, limits: Limits) -> Outcome:
    """Run ``program`` (Python source) on ``stdin`` within ``limits``; nothing of it outlives the call."""
    flags = _flags()
    with tempfile.TemporaryDirectory(prefix="rac-sandbox-") as tmp, _SLOTS.uid() as uid:
        work = Path(tmp)
        (work / "main.py").write_text(program)
        (work / "stdin").write_text(stdin)
        with (
            (work / "stdin").open("rb") as fin,
            (work / "stdout").open("wb") as fout,
            (work / "stderr").open("wb") as ferr,
            (work / "status").open("wb") as fstatus,
        ):
            streams = {"stdin": fin, "stdout": fout, "stderr": ferr}
            start = time.perf_counter()
            if flags is None:
                timed_out, exit_code, sig = _run_plain(work, limits, streams)
            else:
                cfg = {
                    "program": str(work / "main.py"),
                    "root": str(work / "root"),
                    "visible": _visible(),
                    "python": _python(),
                    "uid": None if flags & CLONE_NEWUSER else uid,
                    "cpu_seconds": limits.cpu_seconds,
                    "memory_mb": limits.memory_mb,
                    "file_mb": limits.file_mb,
                    "processes": limits.processes,
                    "status_fd": fstatus.fileno(),
                }
                (work / "root").mkdir()
                timed_out, exit_code, sig = _run_jailed(cfg, flags, limits, streams, work / "status")
            seconds = time.perf_counter() - start
        stdout = (work / "stdout").read_bytes()[: limits.file_mb << 20]
        stderr = (work / "stderr").read_bytes()[-4096:]
    return Outcome(exit_code, sig, timed_out, stdout, stderr, seconds)


def _run_jailed(
    cfg: dict, flags: int, limits: Limits, streams: dict, status: Path
) -> tuple[bool, int | None, int | None]:
    """The init in new namespaces: (timed out, the program's exit code, the signal that killed it)."""
    user_ns = bool(flags & CLONE_NEWUSER)
    real_uid, real_gid = os.getuid(), os.getgid()

    def enter() -> None:  # in the child, before the init's exec
        os.setsid()
        if _libc().unshare(flags) != 0:
            os._exit(INIT_FAILED)
        if user_ns:  # root inside the namespace, the user outside it
            Path("/proc/self/setgroups").write_text("deny")
            Path("/proc/self/uid_map").write_text(f"0 {real_uid} 1")
            Path("/proc/self/gid_map").write_text(f"0 {real_gid} 1")

    proc = subprocess.Popen(
        [_python(), "-I", "-c", _INIT, json.dumps(cfg)], pass_fds=(cfg["status_fd"],), preexec_fn=enter, **streams
    )
    timed_out = _wait(proc, limits)
    text = status.read_text()
    if not text:  # killed on the wall-clock limit, or the jail could not be built
        if not timed_out and proc.returncode == INIT_FAILED:
            streams["stderr"].flush()
            raise OSError(f"the sandbox could not start: {status.with_name('stderr').read_text()[-500:]}")
        return timed_out, None, signal.SIGKILL
    wait_status = json.loads(text)["status"]
    if os.WIFSIGNALED(wait_status):
        return timed_out, None, os.WTERMSIG(wait_status)
    return timed_out, os.waitstatus_to_exitcode(wait_status), None


def _wait(proc: subprocess.Popen, limits: Limits) -> bool:
    """Wait up to the wall-clock limit, then kill the process group; whether it timed out."""
    try:
        proc.wait(timeout=limits.wall_seconds)
        return False
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return True


def _run_plain(work: Path, limits: Limits, streams: dict) -> tuple[bool, int | None, int | None]:
    """Without namespaces: the program in a process group of its own, with the resource limits, in its folder."""
    import resource

    (work / "run").mkdir()
    shutil.copyfile(work / "main.py", work / "run" / "main.py")
    mb = 1 << 20

    def limit() -> None:
        os.setsid()
        resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds + 1))
        resource.setrlimit(resource.RLIMIT_AS, (limits.memory_mb * mb, limits.memory_mb * mb))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_mb * mb, limits.file_mb * mb))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    proc = subprocess.Popen([_python(), "-I", "main.py"], cwd=work / "run", preexec_fn=limit, **streams)
    timed_out = _wait(proc, limits)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # whatever it left in its group
    code = proc.returncode
    return timed_out, (code if code >= 0 else None), (-code if code < 0 else None)
