"""Benchmark: what one run of each service trigger costs at N guests on fakepve.

Not part of the test run. For each N, fakepve (time scale 0, in its own process) and a spec
directory of N guests (the guests of bench_proxmox.py), then a `Service` driven in-process
WITHOUT its timers or listener: its internal steps are called one after the other in one
anyio loop, as its worker would call them:

    keeper.step()   become the leader (a LocalLease in a temporary directory)
    _source()       load the specs and connect (guests and firewall, edge off); then again,
                    unchanged (what SOURCE costs every 60 s: hashing the directory)
    _full()         the first FULL: converge from empty (the resume)
    _full()         a no-op FULL: observe everything (guests and firewall), plan, nothing to do
    _inventory()    the INVENTORY check against the snapshot the FULL published

and prints, per step, Proxmox API calls (the guests provider's `calls`, which the firewall
provider shares; the password login that opens the connection is not counted), wall seconds
and peak Python memory (tracemalloc; steps that can repeat are timed without it, then repeated
under it). Then the steady-state Proxmox API load the default intervals imply (FULL every
300 s, INVENTORY every 30 s; a FULL pushes the INVENTORY due with it back, so an hour holds 12
FULL and 120 - 12 = 108 INVENTORY runs).

The EDGE trigger is not measured: it needs the Velocity bridge and agent simulators, and this
spec declares no edge (with the edge on, EDGE would return at once, without a call).

    .venv/bin/python bench/bench_service.py                 # N = 100, 1000
    .venv/bin/python bench/bench_service.py --sizes 100 1000
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import tempfile
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import anyio

# The same platform as bench_proxmox.py (run as a script, bench/ is on the import path).
from bench_proxmox import TEMPLATE, spec_text

from reconciler.applying.connecting import Endpoints
from reconciler.controller.lease import LocalLease
from reconciler.controller.service import Service, Settings
from reconciler.controller.sources import DirectorySource
from reconciler.controller.status import CycleOutcome
from reconciler.controller.timing import Trigger
from reconciler.model.spec import ProxmoxApi, SecretRef
from reconciler.providers.proxmox import ProxmoxProvider
from reconciler.simulators.fakepve_process import FakePveProcess

PASSWORD_ENV = "BENCH_SERVICE_PVE_PASSWORD"
FULL_EVERY, INVENTORY_EVERY = 300.0, 30.0


Row = tuple[str, int, float, float | None, int, str]


async def step(
    service: Service, name: str, n: int, fn: Callable[[], Awaitable[None]], *, memory: bool
) -> Row:
    """Run `fn` once timed; with `memory`, once more under tracemalloc (calls of the first)."""
    assert service._conn is not None
    guests = service._conn.guests
    assert isinstance(guests, ProxmoxProvider)
    before, cycles, started = guests.calls, len(service.cycles), time.perf_counter()
    await fn()
    seconds, calls = time.perf_counter() - started, guests.calls - before
    peak = None
    if memory:
        tracemalloc.start()
        await fn()
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    outcome = service.cycles[-1][1].value if len(service.cycles) > cycles else ""
    return name, n, seconds, peak, calls, outcome


@asynccontextmanager
async def leading_service(n: int, fake: FakePveProcess, tmp: Path) -> AsyncIterator[Service]:
    """A `Service` for the N guests of bench_proxmox.py against `fake`, its specs in
    `tmp / "specs"`, its lease and state in `tmp`, already the leader; closed on the way out."""
    specs = tmp / "specs"
    specs.mkdir()
    (specs / "bench.yaml").write_text(spec_text(n))
    os.environ[PASSWORD_ENV] = fake.password
    api = ProxmoxApi(
        url=fake.url, ca_file=fake.cafile, user=fake.user, password=SecretRef(env=PASSWORD_ENV)
    )
    service = Service(
        DirectorySource(specs),
        LocalLease(tmp / "reconciler.lock"),
        Endpoints(proxmox=api, edge=False),
        Settings(listen=None, state_dir=tmp / "state"),
    )
    service.settings.state_dir.mkdir()
    assert await service.keeper.step(), "not the leader"
    try:
        yield service
    finally:
        await service._conn_stack.aclose()
        await service.lease.release()


async def bench(n: int, fake: FakePveProcess, tmp: Path) -> list[Row]:
    async with leading_service(n, fake, tmp) as service:
        started = time.perf_counter()
        await service._source()
        assert service._conn is not None, "no connection"
        rows: list[Row] = [("SOURCE, new revision", n, time.perf_counter() - started, None, 0, "")]
        rows.append(await step(service, "SOURCE, unchanged", n, service._source, memory=False))
        rows.append(await step(service, "first FULL (from empty)", n, service._full, memory=False))
        assert service.cycles[-1][1] is CycleOutcome.CHANGED, service.cycles
        rows.append(await step(service, "FULL, no-op", n, service._full, memory=True))
        assert all(o is CycleOutcome.CONVERGED for t, o in service.cycles[1:]), service.cycles
        rows.append(await step(service, "INVENTORY check", n, service._inventory, memory=True))
        assert service.cycles[-1] == (Trigger.INVENTORY, CycleOutcome.CONVERGED), service.cycles
        return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=[100, 1000])
    args = parser.parse_args()
    logging.disable(logging.INFO)  # the service logs every change of the first FULL
    head = f"{'scenario':<26} {'N':>5} {'wall s':>8} {'peak MiB':>9} {'API calls':>10}  outcome"
    print(head)
    summary = []
    for n in args.sizes:
        with FakePveProcess() as fake, tempfile.TemporaryDirectory() as tmp:
            fake.seed_template(TEMPLATE)
            rows = anyio.run(bench, n, fake, Path(tmp))
        for name, size, secs, mem, calls, outcome in rows:
            peak = f"{mem:9.1f}" if mem is not None else f"{'':9}"
            print(f"{name:<26} {size:>5} {secs:>8.2f} {peak} {calls:>10}  {outcome}")
        (_, _, full_s, _, full_calls, _), (_, _, inv_s, _, inv_calls, _) = rows[3], rows[4]
        fulls = 3600 / FULL_EVERY
        inventories = 3600 / INVENTORY_EVERY - fulls  # the ones a FULL covers do not run
        hourly = fulls * full_calls + inventories * inv_calls
        summary.append(
            f"service at {n} guests: full no-op {full_calls} calls {full_s:.2f} s, "
            f"inventory check {inv_calls} call{'s' if inv_calls != 1 else ''} {inv_s:.2f} s; "
            f"steady state {fulls:.0f} x {full_calls} + {inventories:.0f} x {inv_calls} = "
            f"{hourly:.0f} Proxmox API calls per hour ({hourly / 3600:.2f}/s)"
        )
    print(*summary, sep="\n")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"process peak RSS: {rss:.0f} MiB")


if __name__ == "__main__":
    main()
