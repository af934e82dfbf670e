"""Re-run the hostile probe of issue 22, as a user would: every class it found, run against the real `rac` CLI (or
the sandbox, for program cases) in a temporary project, each classified and counted.

    PYTHONPATH=$PWD PATH=/work/main/.venv/bin:$PATH python benchmarks/hostile_probe.py [--workers 2] [--timeout 180]

Classes: ``one-line`` (exit 2, exactly one stderr line starting ``rac: error:`` and naming what the case expects, no
traceback, nothing at --out), ``correct`` (the expected verdict or behaviour), ``escape`` (a program read or wrote
outside its jail, or a process of its outlived the run), ``silent-wrong`` (exit 0, or a verdict, that is wrong),
``traceback``, ``hang`` (over the timeout), ``other`` (anything else: a one-line error that names something else).
Sandbox cases run as ``nobody`` with /usr/bin/python3 and a copy of stages/sandbox.py when this runs as root (user
namespaces), and as root (namespaces, the no-namespace fallback, the per-run cgroup) with the project's Python.
"""

import argparse
import base64
import json
import os
import pickle
import pwd
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from safetensors.torch import load_file, save_file

from stages.schemas import CALIBRATION, write_parquet

ROOT = Path(__file__).resolve().parents[1]
RAC = str(Path(sys.executable).parent / "rac")
CLASSES = ("one-line", "correct", "escape", "silent-wrong", "traceback", "hang", "other")


@dataclass
class Case:
    """One probe: ``argv`` run in a fresh project made by ``setup``; the one-line error must name ``needle``."""

    name: str
    argv: list[str]
    needle: str
    overrides: dict[str, Any] = field(default_factory=dict)
    setup: Callable[[Path], None] | None = None
    out: str = "out"
    fsize: int | None = None  # RLIMIT_FSIZE in bytes: the kernel refuses writes past it, as a full disk does
    vllm_options: str | None = None  # raw YAML for vllm.options (aliases survive no dump)


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in overrides.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _project(where: Path, overrides: dict[str, Any], vllm_options: str | None) -> None:
    """A project at ``where``: the embedded model, a small calibration table and params.yaml with ``overrides``."""
    shutil.copytree(ROOT / "data" / "embedded", where / "data" / "embedded")
    rows = [
        {"seq_id": i, "token_ids": [1, *range(4, 40)], "segment": [0] * 9 + [1] * 28, "source": "rac"} for i in range(4)
    ]
    write_parquet(rows, CALIBRATION, where / "calib.parquet", {"source": "rac"})
    small = {"evaluate": {"n_problems": 2, "max_new_tokens": 32, "backend": "hf"}}
    raw = _merge(_merge(yaml.safe_load((ROOT / "params.yaml").read_text()), small), overrides)
    text = yaml.safe_dump(raw, sort_keys=False)
    if vllm_options is not None:
        text = text.replace("  options: {}\n", f"  options: {vllm_options}\n")
    (where / "params.yaml").write_text(text)


def _edit_weights(where: Path, change: Callable[[dict], None]) -> None:
    """``where``/broken: the embedded model with ``change`` applied to its weights."""
    model = where / "broken"
    shutil.copytree(where / "data" / "embedded", model)
    weights = load_file(model / "model.safetensors")
    change(weights)
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})


def _missing_weight(where: Path) -> None:
    _edit_weights(where, lambda w: w.pop("model.layers.1.mlp.down_proj.weight"))


def _nan_weight(where: Path) -> None:
    _edit_weights(where, lambda w: w["model.layers.2.self_attn.q_proj.weight"].view(-1).__setitem__(5, float("nan")))


def _bench(row: Any | None = None, raw: bytes | None = None) -> Callable[[Path], None]:
    """Writes bench.jsonl: ``row`` as one JSON line, or ``raw`` bytes, or (neither given) a folder of that name."""

    def write(where: Path) -> None:
        path = where / "bench.jsonl"
        if raw is None and row is None:
            path.mkdir()
        else:
            path.write_bytes(raw if raw is not None else (json.dumps(row) + "\n").encode())

    return write


def _corrupt_parquet(where: Path) -> None:
    path = where / "bench.parquet"
    pq.write_table(pa.table({"problem": ["1+1?"] * 50, "answer": ["2"] * 50}), path)
    data = path.read_bytes()
    path.write_bytes(data[:60] + b"\0" * 200 + data[260:])


def _spec(kind: str, path: str, extractor: str | None = None, pattern: str | None = None) -> dict[str, Any]:
    default = "last_code_block" if kind == "code" else "boxed"
    return {
        "benchmarks": {
            "bad": {
                "kind": kind,
                "path": path,
                "split": "test",
                "instruction": "",
                "extractor": extractor or default,
                "pattern": pattern,
            }
        },
        "task": "bad",
    }


_CODE_ROW = json.loads((ROOT / "tests" / "fixtures" / "code_easy.jsonl").read_text().splitlines()[0])


def _pickled(raw: bytes) -> str:
    """A pickle as LiveCodeBench stores private tests: zlib, then base64 (the payloads are never loaded here)."""
    return base64.b64encode(zlib.compress(raw)).decode()


def _repeated_tests() -> str:
    return _pickled(pickle.dumps([{"input": "x" * 2**20, "output": ""}] * 1100))


EVAL = ["evaluate", "--params", "params.yaml", "--dense", "--out", "out"]
HESS = ["hessians", "--params", "params.yaml", "--calib", "calib.parquet", "--out", "h.zarr"]
PRUNE = ["prune", "--params", "params.yaml", "--hessians", "h.zarr", "--out", "out"]
ROLLOUT = ["rollout", "--params", "params.yaml", "--out", "out.parquet"]
BOMB = "\n" + "\n".join(f"    l{i}: &l{i} [" + ", ".join([f"*l{i - 1}" if i else '"lol"'] * 9) + "]" for i in range(9))


def rac_cases() -> list[Case]:
    """Every class of issue 22 that the CLI meets (items 3 to 6), with what its one-line error must name."""
    code_easy = {
        "task": "code_easy",
        "benchmarks": {"code_easy": {"path": str(ROOT / "tests" / "fixtures" / "code_easy.jsonl")}},
        "evaluate": {"backend": "vllm", "max_new_tokens": 256, "n_problems": 8},
    }
    return [
        # 3. silent wrong results
        Case("missing weight: evaluate --model", [*EVAL[:3], "--model", "broken", "--out", "out"],
             "model.layers.1.mlp.down_proj.weight", setup=_missing_weight),
        Case("missing weight: evaluate --model (vLLM)", [*EVAL[:3], "--model", "broken", "--out", "out"],
             "model.layers.1.mlp.down_proj.weight", {"evaluate": {"backend": "vllm"}}, _missing_weight),
        Case("missing weight: hessians", HESS, "model.layers.1.mlp.down_proj.weight", {"model": "broken"},
             _missing_weight, "h.zarr"),
        Case("NaN weight: hessians", HESS, "model.layers.2.self_attn.q_proj.weight", {"model": "broken"},
             _nan_weight, "h.zarr"),
        Case("NaN weight: evaluate --model", [*EVAL[:3], "--model", "broken", "--out", "out"],
             "model.layers.2.self_attn.q_proj.weight", setup=_nan_weight),
        Case("problem: null row", EVAL, "problem=None", _spec("math", "bench.jsonl"),
             _bench({"problem": None, "answer": "1"})),
        Case("sandbox.memory_mb: 10**30", PRUNE, "sandbox.memory_mb=1000000000000000000000000000000",
             {"sandbox": {"memory_mb": 10**30}}),
        Case("sandbox.memory_mb: 16", PRUNE, "sandbox.memory_mb=16", {"sandbox": {"memory_mb": 16}}),
        # 4. tracebacks
        Case("code_easy on the embedded model (context)", EVAL, "beyond the 512-token context", code_easy),
        Case("full disk during model (RLIMIT_FSIZE 64 B)", ["model", "--params", "params.yaml", "--out",
             "data/model/identity.json"], "File too large", out="data/model/identity.json", fsize=64),
        Case("full disk during hessians (RLIMIT_FSIZE 4 KB)", HESS, "File too large", out="h.zarr", fsize=4096),
        Case("benchmark not UTF-8", EVAL, "is not UTF-8", _spec("math", "bench.jsonl"),
             _bench(raw=b'{"problem": "caf\xe9", "answer": "1"}\n')),
        Case("benchmark corrupt Parquet", EVAL, "is not readable Parquet", _spec("math", "bench.parquet"),
             _corrupt_parquet),
        Case("benchmark path is a folder", EVAL, "is a folder", _spec("math", "bench.jsonl"), _bench()),
        Case("pickle raising AttributeError", EVAL, "AttributeError", _spec("code", "bench.jsonl"),
             _bench({**_CODE_ROW, "private_test_cases": _pickled(b"\x80\x04K\x01K\x02a.")})),
        Case("pickle raising TypeError", EVAL, "TypeError", _spec("code", "bench.jsonl"),
             _bench({**_CODE_ROW, "private_test_cases": _pickled(b"\x80\x04]]R.")})),
        Case("pickle raising MemoryError", EVAL, "MemoryError", _spec("code", "bench.jsonl"),
             _bench({**_CODE_ROW, "private_test_cases": _pickled(b"\x80\x04Nr\xff\xff\xff\xff.")})),
        Case("huge row (tests past 1 GB by reference)", EVAL, "over 1024 MB", _spec("code", "bench.jsonl"),
             _bench({**_CODE_ROW, "private_test_cases": _repeated_tests()})),
        Case("JSON nested 200,000 deep", EVAL, "RecursionError", _spec("math", "bench.jsonl"),
             _bench(raw=b"[" * 200_000 + b"]" * 200_000 + b"\n")),
        Case("5000-digit JSON number", EVAL, "JSON rac cannot read", _spec("math", "bench.jsonl"),
             _bench(raw=b'{"problem": "x", "answer": ' + b"9" * 5000 + b"}\n")),
        # 5. hangs
        Case("evaluate.n_problems: 10**12", EVAL, "evaluate.n_problems=", {"evaluate": {"n_problems": 10**12}}),
        Case("rollout.n_prompts: 10**6, 4096 tokens", ROLLOUT, "over the 2**31",
             {"rollout": {"n_prompts": 10**6, "max_new_tokens": 4096}}, out="out.parquet"),
        Case("hessians.chunk: 1", HESS, "hessians.chunk=1 is below 16", {"hessians": {"chunk": 1}}, out="h.zarr"),
        Case("backtracking regex extractor", EVAL, "ran over 2.0 s",
             _spec("arithmetic", None, "regex", r"(?s)^(\d|\D|.)+\Z(?<=\x00)")),
        # 6. params DVC cannot read
        Case("YAML alias bomb in vllm.options", PRUNE, "uses the YAML alias", vllm_options=BOMB),
        Case("recursive alias in vllm.options", PRUNE, "alias *r", vllm_options="&r {self: *r}"),
    ]  # fmt: skip


def run_rac(case: Case, timeout: float) -> tuple[str, float, str]:
    """(class, seconds, detail) of ``case``."""
    with tempfile.TemporaryDirectory(prefix="rac-probe-") as tmp:
        where = Path(tmp)
        _project(where, case.overrides, case.vllm_options)
        if case.setup is not None:
            case.setup(where)
        limit = case.fsize

        def small_files() -> None:
            if limit is not None:
                resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

        env = {**os.environ, "PYTHONPATH": str(ROOT), "PATH": f"{Path(RAC).parent}{os.pathsep}{os.environ['PATH']}"}
        start = time.perf_counter()
        try:
            done = subprocess.run(
                [RAC, *case.argv],
                cwd=where,
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout,
                preexec_fn=small_files,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return "hang", time.perf_counter() - start, f"over {timeout:.0f} s"
        seconds = time.perf_counter() - start
        errors = [line for line in done.stderr.splitlines() if line.startswith("rac: error:")]
        detail = (errors or done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
        if "Traceback" in done.stderr or "Traceback" in done.stdout:
            return "traceback", seconds, detail
        if done.returncode == 0:
            return "silent-wrong", seconds, f"exit 0: {done.stdout.strip()[-160:]}"
        written = (where / case.out).exists()
        if done.returncode == 2 and len(errors) == 1 and case.needle in errors[0] and not written:
            return "one-line", seconds, detail
        return "other", seconds, f"exit {done.returncode}, written={written}: {detail}"


# ---------------------------------------------------------------- programs in the sandbox (items 1, 2 and 7)

ESCAPES = {
    "double chroot": (
        "import os\nos.makedirs('/tmp/x', exist_ok=True)\nos.chroot('/tmp/x')\n"
        "for _ in range(64):\n    os.chdir('..')\nos.chroot('.')\nprint('ESCAPED', open(SECRET).read())\n"
    ),
    "write the user's home": "open(HOME + '/pwned', 'w').write('x')\nprint('ESCAPED wrote')\n",
    "read a 0600 file": "print('ESCAPED', open(SECRET).read())\n",
    "mount /proc, bind /": (
        "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\nos.makedirs('/tmp/p', exist_ok=True)\n"
        "if libc.mount(b'proc', b'/tmp/p', b'proc', 0, None) == 0:\n    print('ESCAPED proc', os.listdir('/tmp/p'))\n"
        "if libc.mount(b'/', b'/tmp/p', None, 4096, None) == 0:\n    print('ESCAPED bound /')\n"
    ),
    "/proc/1/root": "print('ESCAPED', open('/proc/1/root' + SECRET).read())\n",
    "ptrace": (
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nfor pid in range(400):\n"
        "    if libc.ptrace(16, pid, None, None) == 0:\n        print('ESCAPED attached', pid)\n"
    ),
    "capabilities, setuid(0)": (
        "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "header, data = (ctypes.c_uint32 * 2)(0x20080522, 0), (ctypes.c_uint32 * 6)()\nlibc.capget(header, data)\n"
        "if any(data):\n    print('ESCAPED capabilities', list(data))\n"
        "for call in (lambda: os.setuid(0), lambda: os.chroot('/tmp')):\n    try:\n        call()\n"
        "        if os.getuid() != 0:\n            print('ESCAPED privileged call')\n    except PermissionError:\n"
        "        pass\n"
    ),
    "symlinks out": (
        "import os\nos.symlink(SECRET, '/work/link')\nos.symlink(HOME, '/tmp/home')\n"
        "print('ESCAPED', open('/work/link').read())\n"
    ),
    "forged status descriptor": (
        "import os\nfor fd in range(3, 64):\n    try:\n        os.write(fd, b'{\"status\": 0} GARBAGE')\n"
        "        print('ESCAPED wrote to descriptor', fd)\n    except OSError:\n        pass\nraise SystemExit(3)\n"
    ),
    "signals to the parents": (
        "import os, signal\nfor target in (os.getppid(), -1):\n    try:\n        os.kill(target, signal.SIGKILL)\n"
        "    except OSError:\n        pass\nos.kill(0, signal.SIGKILL)\nprint('alive')\n"
    ),
}

# Run by the probe's driver; prints one JSON object: isolation, and per program [exit, signal, stdout, stderr, s].
DRIVER = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import sandbox
programs, secret, home = json.loads(open(sys.argv[2]).read())
limits = sandbox.Limits(wall_seconds=6, cpu_seconds=4, memory_mb=512, processes=32, file_mb=8)
results = {"isolation": sandbox.isolation()}
for name, body in programs.items():
    start = time.perf_counter()
    out = sandbox.run(f"SECRET = {secret!r}\nHOME = {home!r}\n" + body, "", limits)
    results[name] = [out.exit_code, out.signal, out.stdout.decode(errors="replace"),
                     out.stderr.decode(errors="replace"), time.perf_counter() - start]
results["after"] = sandbox.run("print('still here')", "", limits).stdout.decode()
print(json.dumps(results))
"""

EXPECTED = {"forged status descriptor": (3, None, ""), "signals to the parents": (0, None, "alive\n")}


def _python_for(user: tuple[int, int] | None) -> str | None:
    for candidate in (os.path.realpath(sys.executable), "/usr/bin/python3", "/usr/local/bin/python3"):
        kwargs = {} if user is None else {"user": user[0], "group": user[1], "extra_groups": []}
        try:
            if subprocess.run([candidate, "-I", "-c", "pass"], check=False, capture_output=True, **kwargs).returncode:
                continue
        except (PermissionError, FileNotFoundError):
            continue
        return candidate
    return None


def sandbox_escapes(as_user: bool, timeout: float) -> list[tuple[str, str, float, str]]:
    """The hostile programs of ESCAPES, run by the driver as ``nobody`` (as_user, when root) or as this user."""
    user = None
    if as_user and os.geteuid() == 0:
        account = pwd.getpwnam("nobody")
        user = (account.pw_uid, account.pw_gid)
    mode = "ordinary user" if user is not None or os.geteuid() != 0 else "root"
    python = _python_for(user)
    if python is None:
        return [(f"sandbox ({mode}): driver", "other", 0.0, "no Python this user may run")]
    base = Path(tempfile.mkdtemp(prefix="rac-hostile-"))
    try:
        base.chmod(0o755)
        shutil.copyfile(ROOT / "stages" / "sandbox.py", base / "sandbox.py")
        home = base / "home"
        home.mkdir(mode=0o700)
        secret = home / "secret.txt"
        secret.write_text("TOP SECRET")
        secret.chmod(0o600)
        if user is not None:
            for path in (home, secret):
                os.chown(path, *user)
        (base / "programs.json").write_text(json.dumps([ESCAPES, str(secret), str(home)]))
        (base / "driver.py").write_text(DRIVER)
        kwargs = {} if user is None else {"user": user[0], "group": user[1], "extra_groups": []}
        start = time.perf_counter()
        try:
            done = subprocess.run(
                [python, "-I", str(base / "driver.py"), str(base), str(base / "programs.json")],
                capture_output=True, text=True, timeout=timeout, cwd=base, check=False, **kwargs,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            return [(f"sandbox ({mode}): driver", "hang", time.perf_counter() - start, "")]
        if done.returncode != 0:
            kind = "traceback" if "Traceback" in done.stderr else "other"
            return [(f"sandbox ({mode}): driver", kind, time.perf_counter() - start, done.stderr[-300:])]
        results = json.loads(done.stdout)
        mode = f"{mode}, {results['isolation']}"
        touched = sorted(p.name for p in home.iterdir()) != ["secret.txt"] or secret.read_text() != "TOP SECRET"
        rows = []
        for name in ESCAPES:
            code, sig, stdout, stderr, seconds = results[name]
            if "ESCAPED" in stdout or "TOP SECRET" in stdout + stderr:
                kind, detail = "escape", stdout.strip()[:160]
            elif name in EXPECTED and (code, sig, stdout) != EXPECTED[name]:
                kind, detail = "silent-wrong", f"exit {code}, signal {sig}, stdout {stdout!r}"
            else:
                kind, detail = "correct", f"exit {code}, signal {sig}: nothing reached outside"
            rows.append((f"sandbox ({mode}): {name}", kind, seconds, detail))
        if touched:
            rows.append((f"sandbox ({mode}): the user's home after all", "escape", 0.0, "a file was added or changed"))
        if results["after"] != "still here\n":
            rows.append((f"sandbox ({mode}): grader after all", "silent-wrong", 0.0, results["after"]))
        return rows
    finally:
        shutil.rmtree(base)


# Root's own checks through the project's modules: the grader on a forged status, memory adding up, orphans.
ROOT_DRIVER = r"""
import json, os, sys, time
from pathlib import Path
from stages import sandbox
from stages.sandbox import Limits
from stages.tasks.code import judge
rows = []
limits = Limits(wall_seconds=10, cpu_seconds=8, memory_mb=512, processes=32, file_mb=8)
tests = json.dumps({"fn_name": None, "tests": [["2 3\n", "5\n", False]]})
forge = ("import os\nfor fd in range(3, 64):\n    try:\n        os.write(fd, b'{\"status\": 0} GARBAGE')\n"
         "    except OSError:\n        pass\nprint(5)\nraise SystemExit(3)\n")
start = time.perf_counter()
verdict = judge(forge, tests, limits).verdict
rows.append(["forged status through judge", verdict != "passed", time.perf_counter() - start, f"verdict {verdict}"])
hog = ("import os, time\nkids = []\nfor _ in range(4):\n    pid = os.fork()\n    if pid == 0:\n"
       "        block = bytearray(200 << 20)\n        for i in range(0, len(block), 4096):\n            block[i] = 1\n"
       "        time.sleep(1)\n        os._exit(0)\n    kids.append(pid)\n"
       "codes = [os.waitstatus_to_exitcode(os.waitpid(k, 0)[1]) for k in kids]\n"
       "raise SystemExit(0 if codes == [0, 0, 0, 0] else 1)\n")
start = time.perf_counter()
scope = sandbox.limit_scope()
out = sandbox.run(hog, "", limits)
rows.append([f"4 x 200 MB under a 512 MB run ({scope})", out.limit == "memory", time.perf_counter() - start,
             f"limit {out.limit}, exit {out.exit_code}"])
orphans = ("import os, sys, time\nfor _ in range(3):\n    if os.fork() == 0:\n        os.setsid()\n"
           "        if os.fork() == 0:\n            print(os.getpid(), flush=True)\n            time.sleep(600)\n"
           "        os._exit(0)\ntime.sleep(0.5)\n")
sandbox._FLAGS[:] = [None]
for forever in (False, True):
    start = time.perf_counter()
    out = sandbox.run(orphans + ("time.sleep(600)\n" if forever else ""), "", limits)
    pids = [int(p) for p in out.stdout.split()]
    time.sleep(0.5)
    alive = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            continue
        if state != "Z":
            alive.append(pid)
    how = "looping until the wall limit" if forever else "ending by itself"
    rows.append([f"detached grandchildren, no namespaces, {how}", len(pids) == 3 and not alive,
                 time.perf_counter() - start, f"{len(pids)} detached, alive after the run: {alive}"])
print(json.dumps(rows))
"""


def root_checks(timeout: float) -> list[tuple[str, str, float, str]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, "-c", ROOT_DRIVER], capture_output=True, text=True, timeout=timeout, env=env, check=False
        )
    except subprocess.TimeoutExpired:
        return [("sandbox (root): checks", "hang", time.perf_counter() - start, "")]
    if done.returncode != 0:
        kind = "traceback" if "Traceback" in done.stderr else "other"
        return [("sandbox (root): checks", kind, time.perf_counter() - start, done.stderr[-300:])]
    rows = []
    for name, good, seconds, detail in json.loads(done.stdout):
        bad = "escape" if name.startswith("detached") else "silent-wrong"
        rows.append((f"sandbox: {name}", "correct" if good else bad, seconds, detail))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2, help="cases run at once (each `rac` imports for ~7 s)")
    parser.add_argument("--timeout", type=float, default=180, help="seconds before a case counts as a hang")
    parser.add_argument("--only", default="", help="run only the cases whose name contains this text")
    parser.add_argument("--details", action="store_true", help="print each case's error line or verdict")
    args = parser.parse_args()
    start = time.perf_counter()
    cases = [c for c in rac_cases() if args.only in c.name]
    jobs: list[Callable[[], list[tuple[str, str, float, str]]]] = [
        (lambda c=c: [(c.name, *run_rac(c, args.timeout))]) for c in cases
    ]
    if args.only in "sandbox":
        jobs = [
            lambda: sandbox_escapes(True, args.timeout),
            lambda: sandbox_escapes(False, args.timeout),
            lambda: root_checks(args.timeout),
            *jobs,
        ]
    with ThreadPoolExecutor(args.workers) as pool:
        rows = [row for rows in pool.map(lambda job: job(), jobs) for row in rows]
    width = max(len(r[0]) for r in rows)
    print(f"| {'case':<{width}} | class        | seconds |")
    print(f"| {'-' * width} | ------------ | ------- |")
    for name, kind, seconds, detail in rows:
        print(f"| {name:<{width}} | {kind:<12} | {seconds:7.1f} |")
        if args.details or kind not in ("one-line", "correct"):
            print(f"|   {detail}")
    counts = Counter(r[1] for r in rows)
    print()
    print(
        f"{len(rows)} cases in {time.perf_counter() - start:.0f} s: " + ", ".join(f"{counts[k]} {k}" for k in CLASSES)
    )


if __name__ == "__main__":
    main()
