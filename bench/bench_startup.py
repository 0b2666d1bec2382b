"""Benchmark: how long the `reconciler` command takes to start (issue 16, "Fast start").

Not part of the test run. Each case is a fresh process, run N times in turns (one of each case,
then again), so that a busy machine slows every case alike; the figure is the median wall time,
and its ratio to a bare `python -c pass` measured in the same run, which is the floor no
command can go under:

    python -c pass              the interpreter alone (the floor)
    reconciler --version        argparse and the version string only
    reconciler --help           the whole parser, no command's implementation
    reconciler validate specs   loading/ and model/ (pydantic, yaml), nothing live

The command runs as the installed console script does (`from reconciler.cli.main import main`),
with the interpreter of this virtualenv, from the project's root (where `specs/` is).

    .venv/bin/python bench/bench_startup.py              # N = 15
    .venv/bin/python bench/bench_startup.py --runs 31
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

from compiled import compile_package

ROOT = Path(__file__).resolve().parent.parent
CLI = "import sys; from reconciler.cli.main import main; sys.exit(main())"
CASES: dict[str, list[str]] = {
    "python -c pass": ["-c", "pass"],
    "reconciler --version": ["-c", CLI, "--version"],
    "reconciler --help": ["-c", CLI, "--help"],
    "reconciler validate specs": ["-c", CLI, "validate", "specs"],
}


def run_once(args: list[str]) -> float:
    """One fresh interpreter, wall seconds; a failing command is an error, not a figure."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{args}: exit {done.returncode}\n{done.stderr.decode()}")
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=15, help="runs of each case (default 15)")
    opts = ap.parse_args()
    compile_package()  # as an install does (bench/compiled.py)
    for args in CASES.values():  # warm the OS's file cache
        run_once(args)
    times: dict[str, list[float]] = {name: [] for name in CASES}
    for _ in range(opts.runs):
        for name, args in CASES.items():
            times[name].append(run_once(args))
    floor = statistics.median(times["python -c pass"])
    print(f"median of {opts.runs} runs, {sys.executable}")
    print(f"{'case':28} {'median s':>9} {'min s':>7} {'max s':>7} {'x python':>9}")
    for name, samples in times.items():
        median = statistics.median(samples)
        print(
            f"{name:28} {median:9.3f} {min(samples):7.3f} {max(samples):7.3f} {median / floor:9.1f}"
        )


if __name__ == "__main__":
    main()
