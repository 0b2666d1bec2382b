"""The whole platform through `main()`: fakepve, the Velocity bridge simulator, an agent fleet,
and two real Traefik instances (core fed by a file, runtime by a real Redis), as the README's
edge section configures them."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from redis.asyncio import Redis

from reconciler.applying.connecting import agent_health_provider
from reconciler.cli.main import main
from reconciler.controller.lease import RedisLease
from reconciler.loading.loader import LoadResult
from reconciler.model.spec import ProxmoxApi
from reconciler.simulators.agent import AgentFleet, SimulatedAgent
from reconciler.simulators.velocity_bridge import VelocityBridgeSimulator
from tests.cli.test_live import flags as proxmox_flags
from tests.conftest import SPECS
from tests.fakepve_fixtures import mutating_calls
from tests.traefik_fixtures import Traefik

SECRET = "bridge-secret-for-tests"


@dataclass
class Lab:
    flags: list[str]
    bridge: VelocityBridgeSimulator
    agents: dict[str, SimulatedAgent]  # by guest name
    core: Traefik
    runtime: Traefik
    core_file: Path

    def run(self, *args: str) -> int:
        return main([*args, str(SPECS), "--color", "never", *self.flags])

    def routers(self, traefik: Traefik) -> dict[str, dict[str, Any]]:
        out = {}
        with httpx.Client(trust_env=False, timeout=2) as client:
            for protocol in ("http", "tcp"):
                for r in client.get(f"{traefik.api_url}/api/{protocol}/routers").json():
                    out[r["name"]] = r
        return out


@pytest.fixture
def lab(
    example: LoadResult,
    pve_api: ProxmoxApi,
    redis_port: int,
    traefik_factory: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Lab]:
    assert example.spec is not None
    monkeypatch.setenv("ZPACK_BRIDGE_SECRET", SECRET)
    feeds = tmp_path / "core-dynamic"
    feeds.mkdir()
    core = traefik_factory([f"--providers.file.directory={feeds}", "--providers.file.watch=true"])
    runtime = traefik_factory(
        [
            f"--providers.redis.endpoints=127.0.0.1:{redis_port}",
            "--providers.redis.rootkey=traefik-runtime",
        ]
    )
    with VelocityBridgeSimulator(SECRET) as bridge, AgentFleet(control=False) as fleet:
        agents: dict[str, SimulatedAgent] = {}
        agent_flags: list[str] = []
        for i, address in enumerate(sorted(agent_health_provider(example.spec).endpoints), start=1):
            name = address.removeprefix("guest/")
            agents[name] = fleet.add(i, name=address)
            host, port = fleet.endpoint(i)
            agent_flags += ["--agent", f"{name}={host}:{port}"]
        yield Lab(
            [
                *proxmox_flags(pve_api, edge=True),
                "--velocity-url",
                bridge.url,
                *agent_flags,
                "--traefik-file",
                f"core={feeds / 'core.yml'}",
                "--traefik-api",
                f"core={core.api_url}",
                "--traefik-api",
                f"runtime={runtime.api_url}",
                "--redis-url",
                f"redis://127.0.0.1:{redis_port}/0",
            ],
            bridge,
            agents,
            core,
            runtime,
            feeds / "core.yml",
        )


SERVED = {
    "core": {"rc-portal@file", "rc-api@file", "rc-monitoring@file", "rc-vpn@file"},
    "runtime": {
        "rc-ide-alice@redis",
        "rc-ide-bob@redis",
        "rc-map-survival@redis",
        "rc-console-skyblock@redis",
    },
}


def until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    """Wait until `condition` holds (a deadline, not a number of tries): fails after `timeout`."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {timeout:g} s")
        time.sleep(0.05)


def converged(lab: Lab, capsys: pytest.CaptureFixture[str]) -> None:
    assert lab.run("apply", "--auto-approve") == 0
    # Gated routes and registrations follow once the new guests' agents answer ready.
    assert lab.run("apply", "--auto-approve") == 0
    capsys.readouterr()
    # Traefik loads a feed within its provider throttle: a plan made before it lists the
    # routes would warn "not served". Wait on that condition, not on time.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        core, runtime = set(lab.routers(lab.core)), set(lab.routers(lab.runtime))
        if SERVED["core"] <= core and SERVED["runtime"] <= runtime:
            return
        time.sleep(0.05)
    raise AssertionError(f"Traefik never listed every route: {sorted(core)} {sorted(runtime)}")


def plan_text(lab: Lab, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = lab.run("plan", "--detailed-exitcode", *args)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_apply_converges_guests_firewall_routes_and_velocity(
    lab: Lab, capsys: pytest.CaptureFixture[str]
) -> None:
    converged(lab, capsys)
    code, out = plan_text(lab, capsys)
    assert code == 0, out
    assert "No changes. 67 resources match the spec." in out
    # Nothing is wrong but that the new guests have no backup yet (the jobs have not run),
    # and that the spec's DNS server is not in this lab: its records alone are left out.
    warnings = [line for line in out.splitlines() if "warning" in line]
    dns = "warning: dns could not be observed, so it is left out of this plan: "
    assert warnings and all(
        "(backup-missing)" in line or line.startswith(dns) for line in warnings
    ), warnings
    assert len(lab.bridge.servers()) == 5
    core, runtime = lab.routers(lab.core), lab.routers(lab.runtime)
    assert SERVED["core"] <= set(core) and SERVED["runtime"] <= set(runtime)
    assert all(r["status"] == "enabled" for r in [*core.values(), *runtime.values()])
    assert lab.core_file.read_text().startswith("# Managed by reconciler")


def test_velocity_restart_and_an_unready_agent_heal_in_one_cycle(
    lab: Lab, capsys: pytest.CaptureFixture[str]
) -> None:
    converged(lab, capsys)
    lab.bridge.restart()  # Velocity forgot every registration
    lab.agents["dev-alice"].unready("workspace is rebuilding")
    code, out = plan_text(lab, capsys)
    assert code == 2
    assert out.count("+ velocity/") == 5
    # runtime's routes are `when_unready: withhold`: the IDE route goes while its agent is unready
    assert "- route/runtime/ide-alice" in out
    assert "workspace is rebuilding" in out
    assert lab.run("apply", "--auto-approve") == 0
    assert len(lab.bridge.servers()) == 5
    # Traefik stops serving it within its provider throttle (100 ms here)
    until(lambda: "rc-ide-alice@redis" not in lab.routers(lab.runtime))

    lab.agents["dev-alice"].ready()
    capsys.readouterr()
    assert lab.run("apply", "--auto-approve") == 0
    assert "+ route/runtime/ide-alice" in capsys.readouterr().out
    assert plan_text(lab, capsys)[0] == 0


def test_a_route_traefik_does_not_serve_shows_in_the_plan(
    lab: Lab, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """An entrypoint this Traefik does not have: the route is written, Traefik refuses it."""
    specs = tmp_path / "edited"
    specs.mkdir()
    for src in SPECS.glob("*.yaml"):
        text = src.read_text(encoding="utf-8")
        if src.name == "control.yaml":
            text = text.replace("entrypoints: [websecure]", "entrypoints: [admin]", 1)
        (specs / src.name).write_text(text, encoding="utf-8")
    assert main(["apply", str(specs), "--auto-approve", *lab.flags]) == 0
    assert main(["apply", str(specs), "--auto-approve", *lab.flags]) == 0
    capsys.readouterr()
    until(lambda: "rc-portal@file" in lab.routers(lab.core))  # Traefik reloads within its throttle
    code = main(["plan", str(specs), "--detailed-exitcode", "--color", "never", *lab.flags])
    out = capsys.readouterr()
    text = out.out + out.err
    assert code == 0, text  # nothing to change: the feed holds what the spec says
    assert "route-not-served" in text or "route-served-with-errors" in text, text
    assert "route/core/portal" in text
    assert "admin" in text


def test_an_unreachable_traefik_api_and_a_missing_redis_cost_only_the_routes(
    lab: Lab, capsys: pytest.CaptureFixture[str]
) -> None:
    converged(lab, capsys)
    lab.core.stop()
    code, out = plan_text(lab, capsys)
    assert code == 0, out
    assert "traefik-api-failed" in out and "route/core" in out
    # Without the controller's Redis the runtime instance cannot be read: routes are left out,
    # the rest is planned.
    flags = lab.flags[: lab.flags.index("--redis-url")]
    code = main(["plan", str(SPECS), "--detailed-exitcode", "--color", "never", *flags])
    out = capsys.readouterr()
    assert code == 0, out.out + out.err
    assert "no Redis is configured" in out.out + out.err


def test_a_manual_apply_shares_the_services_lease(
    lab: Lab, redis_port: int, pve: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """With the controller's Redis, `apply` is one more replica: refused while a service holds
    the lease; otherwise it holds it while it acts and lets go after."""

    async def hold(release: bool) -> bool:
        client = Redis(port=redis_port)
        try:
            lease = RedisLease(client, name="reconciler", holder="ctl-a", ttl=30)
            if release:
                await client.delete(lease.lease_key)
                return True
            return await lease.acquire()
        finally:
            await client.aclose()

    assert anyio.run(hold, False)
    pve.requests.clear()
    assert lab.run("apply", "--auto-approve") == 1
    err = capsys.readouterr().err
    assert "held by ctl-a" in err and "running controller" in err
    assert mutating_calls(pve) == []

    assert anyio.run(hold, True)
    assert lab.run("apply", "--auto-approve") == 0
    assert not anyio.run(lambda: _lease_exists(redis_port))  # released when done


async def _lease_exists(port: int) -> bool:
    client = Redis(port=port)
    try:
        return bool(await client.exists("reconciler:reconciler:lease"))
    finally:
        await client.aclose()
