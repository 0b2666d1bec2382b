"""Benchmark: what Proxmox API latency costs a plan, a check and a full cycle (issue 16).

Not part of the test run. For each N, ONE fakepve process (PlatformPve, as `FakePveProcess`
serves it) with N owned guests, each with a firewall (the platform of bench_proxmox.py),
converged once by the service's first FULL at time scale 0; then, for each latency L, the fake
is retuned in place to time scale 1 and L seconds added to every answer, and each scenario runs
against that converged estate:

    CLI plan             `reconciler plan --no-edge` as a whole process (guests and firewall)
    guests no-op plan    in-process: observe_all with the guests provider, then make_plan
    inventory check      in-process: `ProxmoxProvider.inventory()` once
    service FULL no-op   the service's full cycle (guests and firewall), as bench_service.py
    guests 1% drift      as the guests no-op plan, after 1% of the guests' memory was changed
                         by hand (run last, once the no-op scenarios are done at every L)

fakepve cannot change its latency once running, so this script serves it itself: the same
`python -m reconciler.simulators.pve` server, started through `FakePveProcess` (its ports, TLS,
nodes and storages), but with a small control channel on its stdin: `tune SCALE LATENCY`
retunes it, `count` answers the number of requests it has answered (the login included).
That keeps one converge per N instead of one per (N, L).

Per row: wall seconds; Proxmox API calls (counted at the fake); controller CPU seconds
(`process_time()` of this process for the in-process scenarios, the child's rusage for the
CLI); the fake's CPU seconds (/proc/<pid>/stat utime + stime); the controller's peak RSS (the
CLI child's own; for in-process scenarios this process's VmHWM, reset before each); and the
floor = max(fake CPU, ceil(calls / limit) x latency) with wall / floor, where limit is the
provider's calls in flight (16 by default).

    .venv/bin/python bench/bench_latency.py                       # N 100 1000, L 0 5 20 50 ms
    .venv/bin/python bench/bench_latency.py --sizes 100 --latencies 0 20
    .venv/bin/python bench/bench_latency.py --skip-largest        # not N=1000 x 50 ms

Targets (issue 16), checked at 20 ms: the CLI plan within 1.5x of its floor; the in-process
guests-only no-op plan under 2 s; the service's full cycle within 1.5x of its floor; RSS under
150 MiB.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import anyio

# The platform of bench_proxmox.py and the service of bench_service.py (run as a script,
# bench/ is on the import path).
from bench_proxmox import TEMPLATE, platform
from bench_service import PASSWORD_ENV, leading_service
from compiled import compile_package

from reconciler.applying.observing import observe_all
from reconciler.controller.status import CycleOutcome
from reconciler.planning.planner import make_plan
from reconciler.providers.pacing import DEFAULT_LIMIT
from reconciler.providers.proxmox import ProxmoxProvider
from reconciler.simulators.fakepve_process import FakePveProcess

SERVE = "--serve-fake"  # argv[1] of this script when it runs as the fake
TICK = os.sysconf("SC_CLK_TCK")
TARGET_N = 1000  # the targets are for N = 1000 at 20 ms
TARGET_L = 20  # ms: the latency the targets are stated at


# ---------------------------------------------------------------------- the fake's side


def serve(argv: list[str]) -> None:
    """Run `python -m reconciler.simulators.pve ARGV` with the control channel on stdin."""
    from reconciler.simulators import pve

    served: list[Any] = []
    answered = [0]

    class Counted(pve.PlatformPve):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            served.append(self)

        def _record(self, request: Any, body: Any) -> None:
            answered[0] += 1
            super()._record(request, body)

    def control() -> None:
        # Plain attribute writes from this thread: the server's loop reads them per request.
        for line in sys.stdin:
            word, *args = line.split()
            if word == "tune":
                served[0].time_scale = float(args[0])
                served[0].slow_network(float(args[1]))
                print("ok", flush=True)
            elif word == "count":
                print(answered[0], flush=True)

    threading.Thread(target=control, daemon=True).start()
    with mock.patch.object(pve, "PlatformPve", Counted):  # pve.main subclasses it by name
        pve.main(argv)


@dataclass
class TunableFake(FakePveProcess):
    """A `FakePveProcess` whose server is this script in SERVE mode: retunable and counting."""

    def start(self) -> TunableFake:
        popen = subprocess.Popen

        def ours(argv: list[str], **kwargs: Any) -> subprocess.Popen[str]:
            # argv is [python, -m, reconciler.simulators.pve, *options]: serve the same here.
            return popen(
                [sys.executable, __file__, SERVE, *argv[3:]], stdin=subprocess.PIPE, **kwargs
            )

        # FakePveProcess.start is the only caller while this patch lasts.
        with mock.patch.object(subprocess, "Popen", ours):
            super().start()
        return self

    def __enter__(self) -> TunableFake:
        return self.start()

    def _ask(self, line: str) -> str:
        assert self._proc is not None and self._proc.stdin and self._proc.stdout
        self._proc.stdin.write(line + "\n")
        self._proc.stdin.flush()
        return self._proc.stdout.readline().strip()

    def tune(self, time_scale: float, latency: float) -> None:
        assert self._ask(f"tune {time_scale} {latency}") == "ok"

    def answered(self) -> int:
        return int(self._ask("count"))

    def cpu(self) -> float:
        assert self._proc is not None
        fields = Path(f"/proc/{self._proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime (fields 14, 15)


# ---------------------------------------------------------------- the controller's side


@dataclass
class Row:
    scenario: str
    n: int
    latency_ms: int
    wall: float
    calls: int
    ctl_cpu: float
    fake_cpu: float
    rss_mib: float

    @property
    def floor(self) -> float:
        # At best the calls go in rounds of `limit` in flight, each round one latency (a lone
        # call still waits a whole latency, however many slots are free).
        rounds = math.ceil(self.calls / DEFAULT_LIMIT)
        return max(self.fake_cpu, rounds * self.latency_ms / 1000)

    @property
    def ratio(self) -> float:
        return self.wall / self.floor if self.floor > 0 else float("inf")

    def __str__(self) -> str:
        return (
            f"{self.scenario:<20} {self.n:>5} {self.latency_ms:>4} {self.wall:>8.2f} "
            f"{self.calls:>6} {self.ctl_cpu:>8.2f} {self.fake_cpu:>8.2f} {self.rss_mib:>7.1f} "
            f"{self.floor:>7.2f} {self.ratio:>6.2f}"
        )


HEAD = (
    f"{'scenario':<20} {'N':>5} {'L ms':>4} {'wall s':>8} {'calls':>6} {'ctl CPU':>8} "
    f"{'fake CPU':>8} {'RSS MiB':>7} {'floor s':>7} {'wall/fl':>6}"
)


def reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := VmRSS


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def in_process(
    name: str, n: int, ms: int, fake: TunableFake, fn: Callable[[], Awaitable[None]]
) -> Row:
    reset_peak_rss()
    calls, fake_cpu, cpu = fake.answered(), fake.cpu(), time.process_time()
    started = time.perf_counter()
    await fn()
    wall = time.perf_counter() - started
    cpu, fake_cpu = time.process_time() - cpu, fake.cpu() - fake_cpu
    return Row(name, n, ms, wall, fake.answered() - calls, cpu, fake_cpu, peak_rss_mib())


def cli_plan(n: int, ms: int, fake: TunableFake, specs: Path, *, changes: bool) -> Row:
    argv = [str(Path(sys.executable).parent / "reconciler"), "plan", str(specs)]
    argv += ["--detailed-exitcode", "--color", "never", "--no-edge"]
    argv += ["--proxmox-url", fake.url, "--proxmox-password-env", PASSWORD_ENV]
    argv += ["--ca-file", fake.cafile]
    calls, fake_cpu = fake.answered(), fake.cpu()
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    proc.stderr.close()
    assert proc.returncode == (2 if changes else 0), (proc.returncode, err[-2000:])
    return Row(
        "CLI plan",
        n,
        ms,
        wall,
        fake.answered() - calls,
        usage.ru_utime + usage.ru_stime,
        fake.cpu() - fake_cpu,
        usage.ru_maxrss / 1024,
    )


async def bench(n: int, latencies: list[int], fake: TunableFake, tmp: Path) -> list[Row]:
    specs = tmp / "specs"  # where leading_service writes them
    async with leading_service(n, fake, tmp) as service:
        await service._source()
        await service._full()  # the converge, at time scale 0
        assert service.cycles[-1][1] is CycleOutcome.CHANGED, service.cycles
        graph = platform(n)
        client = fake.client()  # logged in once, at no latency
        guests = ProxmoxProvider(client=client, platform="bench", source=fake.url)

        async def plan_guests(drifted: int = 0) -> None:
            observed = await observe_all([guests], "bench")
            plan = make_plan(graph, observed)
            assert len(plan.actions) == drifted, (len(plan.actions), drifted)

        async def inventory() -> None:
            assert len((await guests.inventory()).guests) == n

        async def full() -> None:
            before = len(service.cycles)
            await service._full()
            assert [o for _, o in service.cycles[before:]] == [CycleOutcome.CONVERGED]

        rows: list[Row] = []

        def add(row: Row) -> None:
            print(row, flush=True)  # as it comes: a long sweep shows what it has
            rows.append(row)

        for ms in latencies:
            fake.tune(1, ms / 1000)
            add(cli_plan(n, ms, fake, specs, changes=False))
            add(await in_process("guests no-op plan", n, ms, fake, plan_guests))
            add(await in_process("inventory check", n, ms, fake, inventory))
            add(await in_process("service FULL no-op", n, ms, fake, full))
        fake.tune(0, 0)
        drifted = max(1, n // 100)
        owned = sorted((await guests.inventory()).guests, key=lambda i: int(i["vmid"]))
        for item in owned[:drifted]:
            client.nodes(item["node"]).lxc(item["vmid"]).config.put(memory=1024)
        for ms in latencies:
            fake.tune(1, ms / 1000)
            name = f"guests 1% drift ({drifted})"
            add(await in_process(name, n, ms, fake, lambda: plan_guests(drifted)))
        return rows


def summary(rows: list[Row], n: int) -> str:
    at = {r.scenario: r for r in rows if r.n == n and r.latency_ms == TARGET_L}
    if not {"CLI plan", "guests no-op plan", "service FULL no-op"} <= at.keys():
        return f"N={n}: no {TARGET_L} ms rows, no summary"
    cli, plan, full = at["CLI plan"], at["guests no-op plan"], at["service FULL no-op"]
    rss = max(r.rss_mib for r in rows if r.n == n)

    def mark(ok: bool) -> str:
        if n != TARGET_N:  # the targets are set at 1000 guests; a small N is all start cost
            return f"target set at N={TARGET_N} only"
        return "ok" if ok else "MISSED"

    return (
        f"N={n} at {TARGET_L} ms: CLI plan {cli.ratio:.2f}x floor (<= 1.5: "
        f"{mark(cli.ratio <= 1.5)}); guests no-op plan {plan.wall:.2f} s (< 2 s: "
        f"{mark(plan.wall < 2)}); service FULL {full.ratio:.2f}x floor (<= 1.5: "
        f"{mark(full.ratio <= 1.5)}); peak RSS {rss:.0f} MiB at any L (< 150: {mark(rss < 150)})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=[100, 1000])
    parser.add_argument("--latencies", nargs="+", type=int, default=[0, 5, 20, 50], help="ms")
    parser.add_argument(
        "--skip-largest", action="store_true", help="leave out the largest N at the largest L"
    )
    args = parser.parse_args()
    logging.disable(logging.INFO)  # the service logs every change of the converge
    compile_package()  # the CLI starts as installed, not compiling its sources (bench/compiled.py)
    print(HEAD, flush=True)
    rows: list[Row] = []
    for n in args.sizes:
        latencies = list(args.latencies)
        if args.skip_largest and n == max(args.sizes):
            latencies.remove(max(latencies))
        with TunableFake() as fake, tempfile.TemporaryDirectory() as tmp:
            fake.seed_template(TEMPLATE)
            these = anyio.run(bench, n, latencies, fake, Path(tmp))
        rows += these
    for n in args.sizes:
        print(summary(rows, n))


if __name__ == "__main__":
    if sys.argv[1:2] == [SERVE]:
        serve(sys.argv[2:])
    else:
        main()
