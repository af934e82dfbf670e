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
