"""Benchmark: the controller's own CPU per Proxmox API read, by HTTP client (issue 16).

Not part of the test run. One fakepve process (time scale 0 unless --latency) with 200 owned
containers; R config reads (`GET /nodes/{node}/lxc/{vmid}/config`), `--concurrency` in flight,
through each way the controller could carry a read:

    proxmoxer (threads)     what every call did before: proxmoxer's call in a worker thread
                            (`ProxmoxProvider.call`, anyio.to_thread, requests, urllib3)
    requests (threads)      a bare pooled requests.Session in worker threads: proxmoxer's
                            own cost taken out
    httpx (async)           httpx.AsyncClient, pooled, in the event loop
    aiohttp (async)         `ProxmoxProvider.get` inside `reading()`: the hot read path
                            (reconciler.providers.pve_http), aiohttp's pooled session

Prints, per client: the controller's CPU per call (process_time of this process, every thread),
wall seconds, and the fake's CPU per answer (its /proc stat) as the floor of the same run.

    .venv/bin/python bench/bench_client.py                  # 2000 reads, 16 in flight
    .venv/bin/python bench/bench_client.py --reads 5000 --concurrency 32
"""

from __future__ import annotations

import argparse
import os
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import requests

from reconciler.providers.proxmox import ProxmoxProvider
from reconciler.simulators.fakepve_process import FakePveProcess

NODE = "pve-core"
GUESTS = 200
TICK = os.sysconf("SC_CLK_TCK")


def fake_cpu(fake: FakePveProcess) -> float:
    assert fake._proc is not None
    stat = Path(f"/proc/{fake._proc.pid}/stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


async def fan_out(reads: int, one: Callable[[int], Awaitable[Any]]) -> None:
    async with anyio.create_task_group() as tg:
        for i in range(reads):
            tg.start_soon(one, 1000 + i % GUESTS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reads", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--latency", type=float, default=0.0, help="seconds added to every answer")
    args = ap.parse_args()
    guests = [
        {"type": "lxc", "vmid": 1000 + i, "name": f"g{i}", "node": NODE, "tags": "reconciler"}
        for i in range(GUESTS)
    ]
    scale = 1.0 if args.latency else 0.0
    with FakePveProcess(guests=guests, time_scale=scale, latency=args.latency) as fake:
        client = fake.client()
        base = fake.url.rstrip("/") + "/api2/json"
        ticket = client._store["session"].auth.pve_auth_ticket
        cookies = {"PVEAuthCookie": ticket}
        limit = args.concurrency

        async def via_proxmoxer() -> None:
            provider = ProxmoxProvider(client=client, platform="bench", concurrency=limit)

            async def one(vmid: int) -> Any:
                config = client.nodes(NODE).lxc(vmid).config
                return await provider.call("read", lambda: config.get(), read=True)

            await fan_out(args.reads, one)

        async def via_requests() -> None:
            threads = anyio.CapacityLimiter(limit)
            session = requests.Session()
            session.mount("https://", requests.adapters.HTTPAdapter(pool_maxsize=limit))
            session.cookies.update(cookies)

            def read(vmid: int) -> Any:
                url = f"{base}/nodes/{NODE}/lxc/{vmid}/config"
                return session.get(url, verify=fake.cafile).json()["data"]

            async def one(vmid: int) -> Any:
                return await anyio.to_thread.run_sync(read, vmid, limiter=threads)

            await fan_out(args.reads, one)

        async def via_httpx() -> None:
            slots = anyio.CapacityLimiter(limit)
            tls = ssl.create_default_context(cafile=fake.cafile)
            pool = httpx.Limits(max_connections=limit, max_keepalive_connections=limit)
            async with httpx.AsyncClient(verify=tls, cookies=cookies, limits=pool) as http:

                async def one(vmid: int) -> Any:
                    async with slots:
                        answer = await http.get(f"{base}/nodes/{NODE}/lxc/{vmid}/config")
                        return answer.json()["data"]

                await fan_out(args.reads, one)

        async def via_aiohttp() -> None:
            provider = ProxmoxProvider(client=client, platform="bench", concurrency=limit)
            async with provider.reading():

                async def one(vmid: int) -> Any:
                    config = client.nodes(NODE).lxc(vmid).config
                    return await provider.get("read", config)

                await fan_out(args.reads, one)

        print(f"{args.reads} config reads, {limit} in flight, latency {args.latency * 1000:.0f} ms")
        print(f"{'client':22} {'ctl ms/call':>11} {'wall s':>7} {'fake ms/answer':>14}")
        for name, run in (
            ("proxmoxer (threads)", via_proxmoxer),
            ("requests (threads)", via_requests),
            ("httpx (async)", via_httpx),
            ("aiohttp (async)", via_aiohttp),
        ):
            cpu, wall, fake_before = time.process_time(), time.perf_counter(), fake_cpu(fake)
            anyio.run(run)
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            answered = (fake_cpu(fake) - fake_before) / args.reads * 1000
            print(f"{name:22} {cpu / args.reads * 1000:11.3f} {wall:7.2f} {answered:14.3f}")


if __name__ == "__main__":
    main()
