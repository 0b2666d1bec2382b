"""Benchmark: the cost of converging, planning and checking N guests on fakepve.

Not part of the test run. Prints, for each N, wall time, peak memory of this process (fakepve
runs in its own) and the number of Proxmox API calls, for:
  converge from empty | no-op plan (full observation) | inventory-only check | plan with 1% drift

    .venv/bin/python bench/bench_proxmox.py            # N = 100, 500, 1000
    .venv/bin/python bench/bench_proxmox.py --sizes 100

Targets (issue 3): a no-op plan of 1000 guests under 3 s; API calls of a no-op plan at most
N + 10 with full config reads, and at most 5 for the inventory-only check.
"""

from __future__ import annotations

import argparse
import resource
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import anyio

from reconciler.applying.converging import converge
from reconciler.applying.observing import observe_all
from reconciler.loading.graph import build_graph
from reconciler.loading.loader import load_texts
from reconciler.model.resources import DesiredGraph
from reconciler.planning.planner import make_plan
from reconciler.providers.proxmox import ProxmoxProvider
from reconciler.providers.proxmox_inventory import inventory_drift
from reconciler.simulators.fakepve_process import FakePveProcess

TEMPLATE = "debian-12-standard_12.7-1_amd64.tar.zst"


def spec_text(n: int) -> str:
    """N game guests on two nodes, each with a NIC firewall flag, as one spec file's text."""
    lines = [
        "platform: {name: bench}",
        "layers: {runtime: {}}",
        "hosts:",
        "  pve-core: {layers: [runtime], capacity: {cores: 100000, memory: 100T}}",
        "  pve-runtime: {layers: [runtime], capacity: {cores: 100000, memory: 100T}}",
        "ranges: {game: {first: 1000, last: 9999, layer: runtime}}",
        "profiles:",
        "  game:",
        f"    template: local:vztmpl/{TEMPLATE}",
        "    cores: 2",
        "    memory: 2G",
        "    disk: {storage: local-lvm, size: 8G}",
        "    tags: [game]",
        "    network: [{name: eth0, bridge: vmbr0, ip: dhcp, firewall: true}]",
        "guests:",
    ]
    for i in range(n):
        node = "pve-core" if i % 2 else "pve-runtime"
        lines.append(f"  g{i:04d}: {{role: game, host: {node}, profile: game}}")
    return "\n".join(lines) + "\n"


def platform(n: int) -> DesiredGraph:
    result = load_texts({"bench.yaml": spec_text(n)})
    assert result.ok and result.spec is not None, [str(d) for d in result.diagnostics]
    return build_graph(result.spec)


def measure(fn: Callable[[], Any], *, twice: bool = True) -> tuple[Any, float, float]:
    """(result, seconds, peak MiB allocated by Python during fn). tracemalloc slows Python
    down, so a repeatable step runs twice: timed without it, then measured with it."""
    if not twice:
        tracemalloc.start()
    started = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - started
    if twice:
        tracemalloc.start()
        result = fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return result, seconds, peak / 2**20


def bench(n: int) -> list[tuple[str, int, float, float, int, str]]:
    rows = []
    with FakePveProcess() as fake:
        fake.seed_template(TEMPLATE)
        graph = platform(n)

        def provider() -> ProxmoxProvider:
            return ProxmoxProvider(client=fake.client(), platform="bench", source=fake.url)

        p = provider()
        conv, secs, mem = measure(lambda: anyio.run(lambda: converge(graph, [p])), twice=False)
        assert conv.ok, "converge failed"
        rows.append(("converge from empty", n, secs, mem, p.calls, ""))

        p = provider()

        def plan_once() -> Any:
            observed = anyio.run(lambda: observe_all([p], "bench"))
            return observed, make_plan(graph, observed)

        (observed, plan), secs, mem = measure(plan_once)
        assert not plan.has_changes, "no-op plan has changes"
        rows.append(("no-op plan", n, secs, mem, p.calls // 2, f"target <= {n + 10} calls, < 3 s"))

        p = provider()
        drift, secs, mem = measure(lambda: inventory_drift(observed, anyio.run(p.inventory)))
        assert drift == [], drift
        rows.append(("inventory-only check", n, secs, mem, p.calls // 2, "target <= 5 calls"))

        client = fake.client()
        changed = max(1, n // 100)
        for r in sorted(observed.resources, key=lambda r: r.id["vmid"])[:changed]:
            client.nodes(r.id["node"]).lxc(r.id["vmid"]).config.put(memory=1024)
        p = provider()
        (observed, plan), secs, mem = measure(plan_once)
        updates = sum(1 for c in plan.actions)
        assert updates == changed, (updates, changed)
        rows.append((f"plan, 1% drift ({changed})", n, secs, mem, p.calls // 2, ""))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="100,500,1000")
    args = parser.parse_args()
    print(f"{'scenario':<26} {'N':>5} {'wall s':>8} {'peak MiB':>9} {'API calls':>10}  note")
    for n in (int(x) for x in args.sizes.split(",")):
        for name, size, secs, mem, calls, note in bench(n):
            print(f"{name:<26} {size:>5} {secs:>8.2f} {mem:>9.1f} {calls:>10}  {note}")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"process peak RSS: {rss:.0f} MiB")


if __name__ == "__main__":
    main()
