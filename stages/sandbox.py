"""Running untrusted programs (code a model wrote) one at a time in a throwaway jail, and nothing of them left after.

Each run is a fresh Python process started through a small init (``_INIT``). Three modes, the strongest the kernel
allows (``isolation()`` says which):

- ``namespaces`` (rac runs as root): new PID, network and mount namespaces. The init builds a root of its own (a
  tmpfs holding read-only, nosuid binds of the system directories and of the interpreter's prefix, a few device
  nodes, an empty ``/tmp`` and the program's working folder), makes it the namespace's root with ``pivot_root`` and
  unmounts the old root, so no path of the host's mount tree is left to climb back to. The program then runs as an
  unprivileged uid of its own (one per concurrent run, so that one run's process limit is not another's).
- ``user-namespaces`` (an ordinary user): the same jail inside a new user namespace. The program runs as the
  namespace's uid 0, which is the user outside, but with every capability dropped (bounding, ambient, permitted,
  effective and inheritable sets emptied, ``SECBIT_NOROOT`` locked, ``PR_SET_NO_NEW_PRIVS``), so it can neither
  chroot, mount nor regain privileges by exec. Processes count against the user's process limit.
- ``none`` (the kernel refuses both): resource limits, a session of its own, and an init that is a child subreaper
  and kills whatever the program left when it ends. This mode does NOT protect the user's files, the network or
  the user's other processes: grading warns in the log and records the mode in the metrics.

In both namespace modes the program sees no project file, no home, no ``/proc``, no network (a new namespace has
only a loopback that is down) and no other process; it holds no descriptor but its stdin, stdout and stderr; what
it writes lives in the tmpfs, which vanishes with the namespace; and when the init is killed (on the wall-clock
limit), the kernel kills the program, which is the namespace's PID 1, and with it every process it started.

Memory and processes are limited per run, not per process, where this process may make a cgroup (memory and pids
controllers: root, or a delegated cgroup v2); elsewhere the memory limit is the address space of each process.
``limit_scope()`` says which. Anything the init reports that does not parse (which a program cannot forge, as it
holds no descriptor of the init's) is a failed run, never an exception.
"""

import contextlib
import ctypes
import json
import logging
import os
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
# Seconds the init of a run without namespaces gets to kill what its program left, once told to stop.
_GRACE_SECONDS = 2.0
_MB = 1 << 20
# Memory of the init's own interpreter, which shares the run's cgroup with the program.
_INIT_MB = 32


@dataclass(frozen=True)
class Limits:
    """What one run of a program may use."""

    wall_seconds: float  # wall clock, then the whole namespace is killed
    cpu_seconds: int  # CPU time of each process (SIGXCPU, then SIGKILL a second later)
    memory_mb: int  # memory of the whole run (a cgroup), and address space of each process
    processes: int  # processes and threads of the run (a cgroup, and the run's uid)
    file_mb: int  # largest file it may write, stdout included; also the size of its tmpfs


class Outcome(NamedTuple):
    """How one run ended."""

    exit_code: int | None  # None when killed by a signal, or when its status could not be read
    signal: int | None  # the signal that killed the program (SIGKILL on the wall-clock limit)
    timed_out: bool  # killed on the wall-clock limit
    stdout: bytes  # what it printed, at most file_mb
    stderr: bytes  # the last 4 KB of its standard error
    seconds: float  # wall seconds of the run
    out_of_memory: bool = False  # its cgroup killed a process for memory

    @property
    def limit(self) -> str | None:
        """The resource limit that ended the run, if one did (Python ignores SIGXFSZ, so a file or stdout over
        the limit, or a full tmpfs, shows as the OSError it raised)."""
        if self.timed_out:
            return "wall"
        if self.out_of_memory:
            return "memory"
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


# The init of a run, executed by the interpreter with ``-I -c``: as root in its new namespaces, as the user in a
# user namespace, or as the user with no namespace (``jail`` false). It reads its settings from argv[1] (JSON),
# builds the jail, forks the program and writes the program's wait status to the descriptor ``status_fd``, which
# the program never holds.
_INIT = r"""
import ctypes, json, os, resource, signal, sys
cfg = json.loads(sys.argv[1])
status_fd = cfg["status_fd"]
os.set_inheritable(status_fd, False)
libc = ctypes.CDLL(None, use_errno=True)
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 32, 4096, 16384, 1 << 18
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_SECUREBITS, PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT = 1, 24, 28, 38, 47
PR_SET_CHILD_SUBREAPER, PR_CAP_AMBIENT_CLEAR_ALL = 36, 4
SECBIT_NOROOT, SECBIT_NOROOT_LOCKED, SECBIT_KEEP_CAPS_LOCKED = 1, 2, 32

def check(ret, what):
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")

def mount(src, dst, fstype, flags, data=None):
    ret = libc.mount(src.encode(), dst.encode(), fstype and fstype.encode(), flags, data and data.encode())
    check(ret, f"mount {src} on {dst}")

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

def build_jail():
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
    if cfg["uid"] is not None:
        os.chown(f"{root}/work", cfg["uid"], cfg["uid"])
    # The jail becomes the namespace's root and the host's tree is unmounted: no chroot can climb out of it.
    os.chdir(root)
    check(libc.pivot_root(b".", b"."), "pivot_root")
    check(libc.umount2(b".", MNT_DETACH), "umount the old root")
    os.chdir("/work")

def drop_privileges(uid):
    # Every capability goes, for good: the bounding and ambient sets, then (after the uid change in root mode)
    # the permitted, effective and inheritable sets; uid 0 of a user namespace regains none by exec.
    cap = 0
    while libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) == 0:
        cap += 1
    check(libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), "clear ambient capabilities")
    bits = SECBIT_NOROOT | SECBIT_NOROOT_LOCKED | SECBIT_KEEP_CAPS_LOCKED
    check(libc.prctl(PR_SET_SECUREBITS, bits, 0, 0, 0), "securebits")
    if uid is not None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = (ctypes.c_uint32 * 6)()
    check(libc.capset(header, data), "capset")

try:
    if cfg["jail"]:
        build_jail()
    else:
        check(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "subreaper")
        os.chdir(cfg["workdir"])
except OSError as err:
    os.write(2, f"sandbox init: {err}\n".encode())
    os._exit(125)
alive_r, alive_w = os.pipe()  # the init holds the write end: EOF on the read end means it is gone
pid = os.fork()
if pid == 0:
    try:
        os.close(alive_w)
        os.close(status_fd)
        os.setsid()  # a session of its own: kill(0, ...) reaches no process of the init's
        if cfg["jail"]:
            drop_privileges(cfg["uid"])
        check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "death signal")
        os.set_blocking(alive_r, False)
        try:
            if os.read(alive_r, 1) == b"":  # the init died before the death signal was armed
                os._exit(125)
        except BlockingIOError:
            pass
        os.close(alive_r)
        check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no new privileges")
        mb = 1 << 20
        resource.setrlimit(resource.RLIMIT_CPU, (cfg["cpu_seconds"], cfg["cpu_seconds"] + 1))
        resource.setrlimit(resource.RLIMIT_AS, (cfg["memory_mb"] * mb, cfg["memory_mb"] * mb))
        resource.setrlimit(resource.RLIMIT_FSIZE, (cfg["file_mb"] * mb, cfg["file_mb"] * mb))
        if cfg["jail"]:  # counted per uid, in the run's own user namespace where it has one
            resource.setrlimit(resource.RLIMIT_NPROC, (cfg["processes"], cfg["processes"]))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        os.execv(cfg["python"], [cfg["python"], "-I", "main.py"])
    except OSError as err:
        os.write(2, f"sandbox init: {err}\n".encode())
        os._exit(125)
os.close(alive_r)

def leftovers():
    # Processes whose parent is this init: the program's orphans, reparented here (it is their subreaper).
    me, found = str(os.getpid()), []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            if stat.rsplit(")", 1)[1].split()[1] == me:
                found.append(int(entry))
    return found

def kill_leftovers():
    while True:
        for child in leftovers():
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return

def stop(signum, frame):
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    kill_leftovers()
    os._exit(0)

if not cfg["jail"]:
    signal.signal(signal.SIGTERM, stop)
_, status = os.waitpid(pid, 0)
os.write(status_fd, json.dumps({"status": status}).encode())
if not cfg["jail"]:
    kill_leftovers()
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
    """``namespaces`` (root: its own uid per run too), ``user-namespaces`` (uid 0 of its namespace without any
    capability: limits on processes count the user's), or ``none`` (resource limits and a session only)."""
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


def _cgroup_parents() -> dict[str, Path] | None:
    """Where a run's cgroup can be made, per controller (memory, pids): this process's own cgroup where it may
    write there (cgroup v1, or v2 with both controllers delegated to its children); None elsewhere."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
        mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    own = {}
    for line in lines:
        _, controllers, path = line.split(":", 2)
        for name in controllers.split(",") if controllers else [""]:
            own[name] = path
    v1: dict[str, Path] = {}
    v2: Path | None = None
    for line in mounts:
        fields = line.split()
        fstype, options = fields[fields.index("-") + 1], fields[-1].split(",")
        if fstype == "cgroup2" and "" in own:
            v2 = Path(fields[4]) / own[""].lstrip("/")
        for name in ("memory", "pids"):
            if fstype == "cgroup" and name in options and name in own:
                v1[name] = Path(fields[4]) / own[name].lstrip("/")
    if len(v1) == 2 and all(os.access(p, os.W_OK) for p in v1.values()):
        return v1
    if v2 is not None and os.access(v2, os.W_OK):
        with contextlib.suppress(OSError):
            if {"memory", "pids"} <= set((v2 / "cgroup.subtree_control").read_text().split()):
                return {"unified": v2}
    return None


_CGROUPS: list[dict[str, Path] | None] = []


def _cgroups() -> dict[str, Path] | None:
    with _FLAGS_LOCK:
        if not _CGROUPS:
            _CGROUPS.append(_cgroup_parents())
        return _CGROUPS[0]


def limit_scope() -> str:
    """``run`` where memory and processes are limited per run by a cgroup, ``process`` where only per process."""
    return "run" if _cgroups() is not None else "process"


class _RunCgroup:
    """The cgroup(s) of one run: made with its limits before the run, removed after it."""

    def __init__(self, parents: dict[str, Path], limits: Limits, name: str) -> None:
        self.dirs = {key: parent / name for key, parent in parents.items()}
        # The run's init lives in its cgroup too (the program inherits the cgroup from it): its one process and its
        # interpreter's memory come on top of what the program may use.
        memory, pids = (limits.memory_mb + _INIT_MB) * _MB, limits.processes + 1
        settings = {
            "memory": {"memory.limit_in_bytes": memory},
            "pids": {"pids.max": pids},
            "unified": {"memory.max": memory, "memory.swap.max": 0, "pids.max": pids},
        }
        for key, path in self.dirs.items():
            path.mkdir()
            for file, value in settings[key].items():
                (path / file).write_text(str(value))

    def enter(self) -> None:
        """Move the calling process (the run's init, before it execs) into the run's cgroups."""
        for path in self.dirs.values():
            (path / "cgroup.procs").write_text("0")

    def out_of_memory(self) -> bool:
        """Whether the kernel killed a process of the run for its memory limit."""
        path = self.dirs.get("unified") or self.dirs["memory"]
        events = path / ("memory.events" if "unified" in self.dirs else "memory.oom_control")
        for line in events.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value) > 0
        return False

    def remove(self) -> None:
        """Kill whatever is left in the run's cgroups, then remove them (the kernel reaps asynchronously)."""
        deadline = time.monotonic() + 5
        for path in self.dirs.values():
            while True:
                for pid in (path / "cgroup.procs").read_text().split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
                try:
                    path.rmdir()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.01)


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
    parents = _cgroups()
    with tempfile.TemporaryDirectory(prefix="rac-sandbox-") as tmp, _SLOTS.uid() as uid:
        work = Path(tmp)
        (work / "main.py").write_text(program)
        (work / "stdin").write_text(stdin)
        cgroup = _RunCgroup(parents, limits, work.name) if parents is not None else None
        try:
            with (
                (work / "stdin").open("rb") as fin,
                (work / "stdout").open("wb") as fout,
                (work / "stderr").open("wb") as ferr,
                (work / "status").open("wb") as fstatus,
            ):
                cfg = {
                    "jail": flags is not None,
                    "program": str(work / "main.py"),
                    "root": str(work / "root"),
                    "workdir": str(work / "run"),
                    "visible": _visible(),
                    "python": _python(),
                    "uid": uid if flags is not None and not flags & CLONE_NEWUSER else None,
                    "cpu_seconds": limits.cpu_seconds,
                    "memory_mb": limits.memory_mb,
                    "file_mb": limits.file_mb,
                    "processes": limits.processes,
                    "status_fd": fstatus.fileno(),
                }
                (work / "root").mkdir()
                (work / "run").mkdir()
                (work / "run" / "main.py").write_text(program)
                start = time.perf_counter()
                timed_out, exit_code, sig = _run_init(cfg, flags, limits, cgroup, (fin, fout, ferr), work / "status")
                seconds = time.perf_counter() - start
            out_of_memory = cgroup is not None and cgroup.out_of_memory()
        finally:
            if cgroup is not None:
                cgroup.remove()
        stdout = (work / "stdout").read_bytes()[: limits.file_mb << 20]
        stderr = (work / "stderr").read_bytes()[-4096:]
    return Outcome(exit_code, sig, timed_out, stdout, stderr, seconds, out_of_memory)


def _run_init(
    cfg: dict, flags: int | None, limits: Limits, cgroup: "_RunCgroup | None", streams: tuple, status: Path
) -> tuple[bool, int | None, int | None]:
    """The init, in new namespaces or (``flags`` None) without: (timed out, the program's exit code, the signal
    that killed it)."""
    user_ns = flags is not None and bool(flags & CLONE_NEWUSER)
    real_uid, real_gid = os.getuid(), os.getgid()

    def enter() -> None:  # in the child, before the init's exec
        os.setsid()
        if cgroup is not None:
            cgroup.enter()
        if flags is not None and _libc().unshare(flags) != 0:
            os._exit(INIT_FAILED)
        if user_ns:  # root inside the namespace, the user outside it
            Path("/proc/self/setgroups").write_text("deny")
            Path("/proc/self/uid_map").write_text(f"0 {real_uid} 1")
            Path("/proc/self/gid_map").write_text(f"0 {real_gid} 1")

    fin, fout, ferr = streams
    proc = subprocess.Popen(
        [_python(), "-I", "-c", _INIT, json.dumps(cfg)],
        pass_fds=(cfg["status_fd"],),
        preexec_fn=enter,
        stdin=fin,
        stdout=fout,
        stderr=ferr,
    )
    timed_out = _wait(proc, limits, jailed=flags is not None)
    text = status.read_bytes()[:4096]
    if not text:  # killed on the wall-clock limit, or the jail could not be built
        if not timed_out and proc.returncode == INIT_FAILED:
            ferr.flush()
            raise OSError(f"the sandbox could not start: {status.with_name('stderr').read_text()[-500:]}")
        return timed_out, None, signal.SIGKILL
    wait_status = _wait_status(text)
    if wait_status is None:
        log.warning("a sandboxed run reported an unreadable status %r: graded as a failed run", text[:80])
        return timed_out, None, None
    if os.WIFSIGNALED(wait_status):
        return timed_out, None, os.WTERMSIG(wait_status)
    return timed_out, os.waitstatus_to_exitcode(wait_status), None


def _wait_status(text: bytes) -> int | None:
    """The wait status the init wrote (``{"status": N}``), or None if the text is anything else."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None
    status = value.get("status") if isinstance(value, dict) and len(value) == 1 else None
    if not isinstance(status, int) or isinstance(status, bool) or not 0 <= status < 1 << 16:
        return None
    return status


def _wait(proc: subprocess.Popen, limits: Limits, jailed: bool) -> bool:
    """Wait up to the wall-clock limit, then stop the run; whether it timed out. A jailed run dies with its init
    (the program is the PID namespace's init, armed with a death signal); without namespaces the init is told to
    kill what the program started first, and killed itself if it does not in time."""
    try:
        proc.wait(timeout=limits.wall_seconds)
        return False
    except subprocess.TimeoutExpired:
        if not jailed:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=_GRACE_SECONDS)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return True
