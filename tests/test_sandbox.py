"""The sandbox on hand-written programs, hostile ones included: each graded as it deserves, none able to touch the
machine, and nothing of any of them (process or file) left after the suite."""

import json
import os
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from stages import sandbox
from stages.sandbox import UID_BASE, Limits
from stages.tasks.code import judge

LIMITS = Limits(wall_seconds=4, cpu_seconds=3, memory_mb=512, processes=32, file_mb=8)
SUM = json.dumps({"fn_name": None, "tests": [["2 3\n", "5\n", False], ["10 -4\n", "6\n", False]]})
CORRECT = "a, b = map(int, input().split())\nprint(a + b)\n"

jailed = pytest.mark.skipif(sandbox.isolation() == "none", reason="the kernel refuses namespaces here")


def _sandbox_processes() -> list[int]:
    """Pids of processes running as a sandbox uid."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                uid = int((entry / "status").read_text().split("\nUid:")[1].split()[0])
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
            if uid >= UID_BASE:
                pids.append(int(entry.name))
    return pids


def _leftover_dirs() -> list[str]:
    return [p.name for p in Path(tempfile.gettempdir()).glob("rac-sandbox-*")]


@pytest.fixture(autouse=True)
def _nothing_left_behind() -> Iterator[None]:
    """Every test leaves no sandbox process and no sandbox folder behind."""
    before = set(_leftover_dirs())
    yield
    deadline = time.monotonic() + 5  # the kernel reaps a killed namespace asynchronously
    while _sandbox_processes() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _sandbox_processes() == []
    assert set(_leftover_dirs()) <= before


@pytest.mark.parametrize(
    ("program", "verdict"),
    [
        (CORRECT, "passed"),
        ("a, b = map(int, input().split())\nprint(a - b)\n", "wrong_answer"),
        ("print(", "runtime_error"),  # a syntax error
        ("raise ValueError('no')\n", "runtime_error"),
        ("while True:\n    pass\n", "timeout"),
        ("x = bytearray(10 ** 10)\n", "limit"),  # 10 GB against 512 MB of address space
        ("import sys\nwhile True:\n    sys.stdout.write('y' * 65536)\n", "limit"),  # megabytes of output
        (None, "no_code"),
    ],
)
def test_programs_get_their_verdict(program: str | None, verdict: str) -> None:
    assert judge(program, SUM, LIMITS).verdict == verdict


def test_the_first_failing_test_stops_grading() -> None:
    only_first = "a, b = map(int, input().split())\nprint(5)\n"
    assert judge(only_first, SUM, LIMITS) == ("wrong_answer", 1, 2)
    assert judge(CORRECT, SUM, LIMITS) == ("passed", 2, 2)


@jailed
def test_a_fork_bomb_is_contained_and_reaped() -> None:
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    outcome = sandbox.run(bomb, "", LIMITS)
    assert outcome.timed_out
    # The fixture checks that every process of it is gone; the machine still starts processes.
    assert sandbox.run("print('still here')", "", LIMITS).stdout == b"still here\n"


@jailed
def test_a_detached_grandchild_dies_with_the_run() -> None:
    daemon = (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        time.sleep(600)\n"
        "    os._exit(0)\n"
        "print('parent done')\n"
    )
    assert sandbox.run(daemon, "", LIMITS).stdout == b"parent done\n"


def test_a_program_that_ignores_sigterm_is_killed_on_time() -> None:
    stubborn = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(600)\n"
    start = time.monotonic()
    outcome = sandbox.run(stubborn, "", LIMITS)
    assert outcome.timed_out and outcome.limit == "wall"
    assert time.monotonic() - start < LIMITS.wall_seconds + 3


def test_a_10_gb_file_is_stopped_and_gone(tmp_path: Path) -> None:
    writer = "f = open('big', 'wb')\nwhile True:\n    f.write(b'0' * (1 << 20))\n"
    outcome = sandbox.run(writer, "", LIMITS)
    assert outcome.exit_code != 0 and outcome.limit == "file"
    assert judge(writer, SUM, LIMITS).verdict == "limit"


@jailed
def test_no_network() -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.2)
    port = server.getsockname()[1]
    accepted: list[object] = []

    def accept() -> None:
        for _ in range(40):
            try:
                accepted.append(server.accept())
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept)
    thread.start()
    client = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('connected')\n"
    outcome = sandbox.run(client, "", LIMITS)
    thread.join()
    server.close()
    assert outcome.exit_code == 1 and b"connected" not in outcome.stdout
    assert b"Network is unreachable" in outcome.stderr
    assert accepted == []


@jailed
def test_files_outside_its_folder_are_out_of_reach(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("expected output: 5")
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    project = Path(__file__).resolve().parents[1] / "params.yaml"
    for path in (secret, project):
        outcome = sandbox.run(f"print(open({str(path)!r}).read())", "", LIMITS)
        assert outcome.exit_code == 1 and b"FileNotFoundError" in outcome.stderr, path
    outcome = sandbox.run(f"import os\nos.remove({str(victim)!r})\n", "", LIMITS)
    assert outcome.exit_code == 1 and victim.read_text() == "keep me"
    # The system it may read is mounted read-only, and it runs as an unprivileged uid of its own.
    outcome = sandbox.run("import os\nopen('/usr/rac-was-here', 'w')\n", "", LIMITS)
    assert outcome.exit_code == 1 and not Path("/usr/rac-was-here").exists()
    outcome = sandbox.run("import os\nprint(os.getuid(), sorted(os.listdir('/')))", "", LIMITS)
    uid, listing = outcome.stdout.decode().split(" ", 1)
    assert int(uid) >= UID_BASE or sandbox.isolation() == "user-namespaces"
    assert "'work'" in listing and "'home'" not in listing and "'proc'" not in listing


@jailed
def test_what_it_writes_in_tmp_vanishes() -> None:
    name = f"rac-sandbox-probe-{os.getpid()}"
    outcome = sandbox.run(f"open('/tmp/{name}', 'w').write('x')\nprint('ok')\n", "", LIMITS)
    assert outcome.stdout == b"ok\n"
    assert not (Path("/tmp") / name).exists()


def test_hostile_programs_graded_in_parallel_do_not_stall_the_others() -> None:
    from concurrent.futures import ThreadPoolExecutor

    programs = ["while True:\n    pass\n", CORRECT, "x = bytearray(10 ** 10)\n", CORRECT]
    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=2) as pool:
        verdicts = [j.verdict for j in pool.map(lambda c: judge(c, SUM, LIMITS), programs)]
    assert verdicts == ["timeout", "passed", "limit", "passed"]
    assert time.monotonic() - start < 2 * LIMITS.wall_seconds + 10


def test_the_user_namespace_mode_isolates_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """The mode of a user without root (tried here as root, which may create user namespaces as well): the same
    jail, minus a uid of its own."""
    user_ns = sandbox.CLONE_NEWUSER | sandbox.CLONE_NEWPID | sandbox.CLONE_NEWNET | sandbox.CLONE_NEWNS
    monkeypatch.setattr(sandbox, "_FLAGS", [user_ns])
    try:
        outcome = sandbox.run("import os\nprint(sorted(os.listdir('/')))\n", "", LIMITS)
    except OSError as err:
        pytest.skip(f"this kernel refuses user namespaces: {err}")
    assert sandbox.isolation() == "user-namespaces"
    assert "'work'" in outcome.stdout.decode() and "'home'" not in outcome.stdout.decode()
    net = sandbox.run("import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)\n", "", LIMITS)
    assert b"Network is unreachable" in net.stderr
    assert judge(CORRECT, SUM, LIMITS).verdict == "passed"
    assert judge("while True:\n    pass\n", SUM, LIMITS).verdict == "timeout"


_ORPHANS = (
    "import os, sys, time\n"
    "for _ in range(3):\n"
    "    if os.fork() == 0:\n"
    "        os.setsid()\n"
    "        if os.fork() == 0:\n"
    "            print(os.getpid(), flush=True)\n"
    "            time.sleep(600)\n"
    "        os._exit(0)\n"
    "time.sleep(0.5)\n"
)


def _gone(pids: list[int]) -> bool:
    """Whether none of ``pids`` is still running (zombies count as gone: they hold no resource but their pid)."""
    for pid in pids:
        try:
            state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            continue
        if state != "Z":
            return False
    return True


@pytest.mark.parametrize("forever", [False, True])
def test_without_namespaces_what_a_program_leaves_is_killed(monkeypatch: pytest.MonkeyPatch, forever: bool) -> None:
    """The fallback mode: detached grandchildren in sessions of their own die with the run, whether the program
    ends by itself or on the wall-clock limit."""
    monkeypatch.setattr(sandbox, "_FLAGS", [None])
    assert sandbox.isolation() == "none"
    outcome = sandbox.run(_ORPHANS + ("time.sleep(600)\n" if forever else ""), "", LIMITS)
    assert outcome.timed_out == forever
    pids = [int(line) for line in outcome.stdout.split()]
    assert len(pids) == 3
    assert _gone(pids)


@pytest.mark.skipif(sandbox.limit_scope() != "run", reason="no cgroup may be made here: memory is per process")
def test_memory_is_limited_per_run_not_per_process() -> None:
    """Four processes of 200 MB each are within the address-space limit of each, but not within the run's."""
    hog = (
        "import os, time\n"
        "kids = []\n"
        "for _ in range(4):\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        block = bytearray(200 << 20)\n"
        "        for i in range(0, len(block), 4096):\n"
        "            block[i] = 1\n"
        "        time.sleep(1)\n"
        "        os._exit(0)\n"
        "    kids.append(pid)\n"
        "codes = [os.waitstatus_to_exitcode(os.waitpid(k, 0)[1]) for k in kids]\n"
        "raise SystemExit(0 if codes == [0, 0, 0, 0] else 1)\n"
    )
    limits = Limits(wall_seconds=10, cpu_seconds=8, memory_mb=512, processes=32, file_mb=8)
    outcome = sandbox.run(hog, "", limits)
    assert outcome.out_of_memory and outcome.limit == "memory"
    assert judge(hog, SUM, limits).verdict == "limit"
    roomy = Limits(wall_seconds=10, cpu_seconds=8, memory_mb=1536, processes=32, file_mb=8)
    assert sandbox.run(hog, "", roomy).exit_code == 0


# Hostile programs run by an ordinary user (the mode of most users and CI systems): each prints what it reached.
# SECRET and HOME are filled in per test; a line "ESCAPED ..." means it got out.
_ESCAPES = {
    "double_chroot": (
        "import os\n"
        "os.makedirs('/tmp/x', exist_ok=True)\n"
        "os.chroot('/tmp/x')\n"
        "for _ in range(64):\n"
        "    os.chdir('..')\n"
        "os.chroot('.')\n"
        "print('ESCAPED', open(SECRET).read())\n"
    ),
    "write_home": "open(HOME + '/pwned', 'w').write('x')\nprint('ESCAPED wrote')\n",
    "read_secret": "print('ESCAPED', open(SECRET).read())\n",
    "mount_proc": (
        "import ctypes, os\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "os.makedirs('/tmp/p', exist_ok=True)\n"
        "if libc.mount(b'proc', b'/tmp/p', b'proc', 0, None) == 0:\n"
        "    print('ESCAPED mounted proc', os.listdir('/tmp/p'))\n"
        "if libc.mount(b'/', b'/tmp/p', None, 4096, None) == 0:\n"
        "    print('ESCAPED bound /')\n"
        "print(os.listdir('/proc'))\n"
    ),
    "proc_root": "print('ESCAPED', open('/proc/1/root' + SECRET).read())\n",
    "ptrace": (
        "import ctypes\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "for pid in range(0, 400):\n"
        "    if libc.ptrace(16, pid, None, None) == 0:\n"  # PTRACE_ATTACH
        "        print('ESCAPED attached', pid)\n"
    ),
    "capabilities": (
        "import ctypes, os\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "header, data = (ctypes.c_uint32 * 2)(0x20080522, 0), (ctypes.c_uint32 * 6)()\n"
        "libc.capget(header, data)\n"
        "if any(data):\n"
        "    print('ESCAPED capabilities', list(data))\n"
        "for call in (lambda: os.setuid(0), lambda: os.setgid(0), lambda: os.chroot('/tmp')):\n"
        "    try:\n"
        "        call()\n"
        "        if os.getuid() != 0:\n"
        "            print('ESCAPED privileged call')\n"
        "    except PermissionError:\n"
        "        pass\n"
    ),
    "symlink": (
        "import os\n"
        "os.symlink(SECRET, '/work/link')\n"
        "os.symlink(HOME, '/tmp/home')\n"
        "print('ESCAPED', open('/work/link').read())\n"
    ),
    "forge_status": (
        "import os\n"
        "for fd in range(3, 64):\n"
        "    try:\n"
        "        os.write(fd, b'{\"status\": 0} GARBAGE')\n"
        "        print('ESCAPED wrote to descriptor', fd)\n"
        "    except OSError:\n"
        "        pass\n"
        "raise SystemExit(3)\n"
    ),
    "signal_parents": (
        "import os, signal\n"
        "for target in (os.getppid(), 0, -1):\n"
        "    try:\n"
        "        os.kill(target, signal.SIGKILL) if target != 0 else None\n"
        "    except OSError:\n"
        "        pass\n"
        "os.kill(0, signal.SIGKILL)\n"
        "print('alive')\n"
    ),
}

_DRIVER = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import sandbox
programs, secret, home = json.loads(open(sys.argv[2]).read())
limits = sandbox.Limits(wall_seconds=6, cpu_seconds=4, memory_mb=512, processes=32, file_mb=8)
results = {"isolation": sandbox.isolation()}
for name, body in programs.items():
    source = f"SECRET = {secret!r}\nHOME = {home!r}\n" + body
    outcome = sandbox.run(source, "", limits)
    results[name] = [outcome.exit_code, outcome.signal, outcome.stdout.decode(errors="replace"),
                     outcome.stderr.decode(errors="replace")]
results["after"] = sandbox.run("print('still here')", "", limits).stdout.decode()
print(json.dumps(results))
"""


def _ordinary_user() -> tuple[int, int] | None:
    """The (uid, gid) of an unprivileged account to run as, when this process is root; None when it is not root
    (it runs the driver as itself then). ``RAC_SANDBOX_TEST_USER`` names the account, ``nobody`` by default."""
    import pwd

    if os.geteuid() != 0:
        return None
    account = pwd.getpwnam(os.environ.get("RAC_SANDBOX_TEST_USER", "nobody"))
    return account.pw_uid, account.pw_gid


def _interpreter_for(user: tuple[int, int] | None) -> str | None:
    """A Python 3 the ordinary user may execute: this one, or the system's."""
    import subprocess
    import sys

    for candidate in (os.path.realpath(sys.executable), "/usr/bin/python3", "/usr/local/bin/python3"):
        if not os.path.exists(candidate):
            continue
        kwargs = {} if user is None else {"user": user[0], "group": user[1], "extra_groups": []}
        try:
            done = subprocess.run([candidate, "-I", "-c", "pass"], check=False, capture_output=True, **kwargs)
        except PermissionError:  # a directory on its path is closed to that user
            continue
        if done.returncode == 0:
            return candidate
    return None


def test_hostile_programs_of_an_ordinary_user_stay_in_the_jail() -> None:
    """As an ordinary user (user namespaces): the double-chroot escape, /proc and ptrace tricks, capabilities,
    symlinks, a forged status and signals to the parents reach nothing outside the jail, and the grader goes on."""
    import shutil
    import subprocess

    user = _ordinary_user()
    python = _interpreter_for(user)
    if python is None:
        # CI must exercise this mode: there, a missing interpreter is a failure, not a skip.
        (pytest.fail if os.environ.get("CI") else pytest.skip)("no Python here that an unprivileged user may execute")
    base = Path(tempfile.mkdtemp(prefix="rac-hostile-"))
    try:
        base.chmod(0o755)
        shutil.copyfile(Path(sandbox.__file__), base / "sandbox.py")
        home = base / "home"
        home.mkdir(mode=0o700)
        secret = home / "secret.txt"
        secret.write_text("TOP SECRET")
        secret.chmod(0o600)
        if user is not None:
            for path in (home, secret):
                os.chown(path, *user)
        (base / "programs.json").write_text(json.dumps([_ESCAPES, str(secret), str(home)]))
        (base / "driver.py").write_text(_DRIVER)
        kwargs = {} if user is None else {"user": user[0], "group": user[1], "extra_groups": []}
        done = subprocess.run(
            [python, "-I", str(base / "driver.py"), str(base), str(base / "programs.json")],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=base,
            check=False,
            **kwargs,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        results = json.loads(done.stdout)
        if results["isolation"] == "none":
            pytest.skip("the kernel refuses user namespaces to an ordinary user here")
        assert results["isolation"] == ("user-namespaces" if user is not None or os.geteuid() != 0 else "namespaces")
        for name in _ESCAPES:
            _, _, stdout, stderr = results[name]
            assert "ESCAPED" not in stdout and "TOP SECRET" not in stdout + stderr, (name, stdout, stderr)
        assert sorted(p.name for p in home.iterdir()) == ["secret.txt"]
        assert secret.read_text() == "TOP SECRET"
        assert results["forge_status"][0] == 3  # its own exit status, not the forged one
        # The namespace's PID 1 ignores even SIGKILL from inside: it reached no process but itself, and ran on.
        assert results["signal_parents"][:3] == [0, None, "alive\n"]
        assert results["after"] == "still here\n"
    finally:
        shutil.rmtree(base)
