"""Grading throughput of the code sandbox, with every limit on, measured side by side in one run.

Grades the eight problems of ``tests/fixtures/code_easy.jsonl`` with a correct solution each (every test runs, in a
fresh jail) and with a wrong one (grading stops at the first test), at 1 and 2 workers, and prints programs and
test runs per second; then the cost of one jail against a bare ``python -I`` of the same program, and how long
the hostile programs take to be stopped (their limits, not the grader, set that).

    python benchmarks/sandbox_throughput.py
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from stages import sandbox
from stages.sandbox import Limits
from stages.tasks import get_task
from stages.tasks.base import BenchmarkSpec
from stages.tasks.code import PRELUDE, judge

ROOT = Path(__file__).resolve().parents[1]
EASY = ROOT / "tests" / "fixtures" / "code_easy.jsonl"
LIMITS = Limits(wall_seconds=6, cpu_seconds=6, memory_mb=2048, processes=64, file_mb=32)
HOSTILE = {
    "infinite loop": "while True:\n    pass\n",
    "fork bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
    "memory hog": "x = bytearray(10 ** 10)\n",
    "10 GB file": "f = open('big', 'wb')\nwhile True:\n    f.write(b'0' * (1 << 20))\n",
}


def grade(programs: list[str], answers: list[str], workers: int, repeats: int) -> tuple[float, int, list[str]]:
    """Seconds to grade ``programs`` ``repeats`` times with ``workers``, the test runs made, and the verdicts."""
    jobs = list(zip(programs, answers, strict=True)) * repeats
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        judged = list(pool.map(lambda job: judge(job[0], job[1], LIMITS), jobs))
    seconds = time.perf_counter() - start
    runs = sum(j.passed + (j.verdict != "passed") for j in judged)
    return seconds, runs, [j.verdict for j in judged]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=4, help="times each program set is graded per row")
    args = parser.parse_args()
    print(f"isolation {sandbox.isolation()}, {os.cpu_count()} CPUs, load {os.getloadavg()}")
    spec = BenchmarkSpec("code", str(EASY), "test", "", "last_code_block", None)
    task = get_task("easy", {"easy": spec})
    rows = [json.loads(line) for line in EASY.read_text().splitlines()]
    by_text = {r["question_content"]: r["question_title"] for r in rows}
    problems = task.problems(task.size, 0)
    titles = [next(t for q, t in by_text.items() if q in p.text) for p in problems]
    answers = [p.answer for p in problems]
    solutions = {r["question_title"]: r["reference_solution"] for r in rows}
    correct = [solutions[t] for t in titles]
    wrong = correct[1:] + correct[:1]  # each problem graded with another's program
    print("| programs | workers | programs | test runs | seconds | programs/s | test runs/s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for label, programs in (("correct (every test runs)", correct), ("wrong (stops at the first)", wrong)):
        for workers in (1, 2):
            seconds, runs, verdicts = grade(programs, answers, workers, args.repeats)
            assert (set(verdicts) == {"passed"}) == (programs is correct), verdicts
            n = len(programs) * args.repeats
            print(f"| {label} | {workers} | {n} | {runs} | {seconds:.1f} | {n / seconds:.2f} | {runs / seconds:.2f} |")
    with tempfile.TemporaryDirectory() as tmp:
        main_py = Path(tmp) / "main.py"
        main_py.write_text(PRELUDE + solutions["Sum of two"])
        n = 20
        start = time.perf_counter()
        for _ in range(n):
            subprocess.run([sys.executable, "-I", str(main_py)], input=b"2 3\n", capture_output=True, check=True)
        bare = (time.perf_counter() - start) / n
    start = time.perf_counter()
    for _ in range(n):
        sandbox.run(PRELUDE + solutions["Sum of two"], "2 3\n", LIMITS)
    jailed = (time.perf_counter() - start) / n
    print(f"\none run: bare python -I {bare * 1000:.0f} ms, in the jail {jailed * 1000:.0f} ms ({jailed / bare:.2f}x)")
    for name, program in HOSTILE.items():
        outcome = sandbox.run(program, "", LIMITS)
        print(f"{name:>14}: stopped after {outcome.seconds:.1f} s ({outcome.limit or outcome.exit_code})")
    print(f"load at the end {os.getloadavg()}")


if __name__ == "__main__":
    main()
