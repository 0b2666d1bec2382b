"""`reconciler run` as real processes: two replicas on one real redis-server and one fakepve
(in its own process, with latency so an apply takes seconds), killed with SIGKILL and stopped
with SIGTERM in the middle of an apply.

What each replica did is read from its own JSON log (one `change` event per change it applied;
every mutating Proxmox call belongs to one), so "only one acts" and "no duplicate action" are
checked per process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from reconciler.demo.lab import CLOUD_TEMPLATE_NAME, CLOUD_TEMPLATE_VMID
from reconciler.simulators.fakepve_process import FakePveProcess
from reconciler.simulators.processes import free_port
from tests.conftest import SPECS
from tests.fakepve_fixtures import TEMPLATE

LEASE_TTL = 2.0
GUESTS = 21  # 20 containers and the bastion VM


@pytest.fixture(scope="module")
def slow_pve() -> Iterator[FakePveProcess]:
    """fakepve answering every request after 30 ms: the example's first apply takes seconds.
    It has the container template and the VM template the bastion is cloned from."""
    with FakePveProcess(time_scale=0.1, latency=0.3) as pve:
        pve.seed_template(TEMPLATE)
        pve.seed_vm_template(CLOUD_TEMPLATE_VMID, CLOUD_TEMPLATE_NAME, "pve-core")
        yield pve


@dataclass
class Replica:
    name: str
    proc: subprocess.Popen[str]
    port: int
    events: list[dict[str, Any]] = field(default_factory=list)
    reader: threading.Thread | None = None

    def read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            try:
                event = json.loads(line)
            except ValueError:
                event = {"event": "unparsed", "line": line.rstrip()}
            event["_at"] = time.monotonic()
            self.events.append(event)

    def status(self) -> dict[str, Any] | None:
        try:
            with httpx.Client(trust_env=False, timeout=2) as client:
                result: dict[str, Any] = client.get(f"http://127.0.0.1:{self.port}/status").json()
                return result
        except (httpx.TransportError, ValueError):
            return None

    def changes(self, outcome: str | None = "done") -> list[dict[str, Any]]:
        return [
            e
            for e in self.events
            if e.get("event") == "change" and (outcome is None or e.get("outcome") == outcome)
        ]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        if self.reader is not None:
            self.reader.join(5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


class Replicas:
    def __init__(self, pve: FakePveProcess, redis_port: int | None, tmp: Path) -> None:
        self.pve, self.redis_port, self.tmp = pve, redis_port, tmp
        self.started: list[Replica] = []

    def start(self, name: str, *extra: str) -> Replica:
        port = free_port()
        args = [
            sys.executable,
            "-m",
            "reconciler.cli.main",
            "run",
            str(SPECS),
            "--no-edge",
            "--holder",
            name,
            "--listen",
            f"127.0.0.1:{port}",
            "--state-dir",
            str(self.tmp / name),
            "--lease-ttl",
            str(LEASE_TTL),
            "--interval",
            "2",
            "--inventory-interval",
            "1",
            "--source-interval",
            "30",
            "--shutdown-grace",
            "20",
            "--proxmox-url",
            self.pve.url,
            "--proxmox-user",
            "root@pam",
            "--proxmox-password-env",
            "FAKEPVE_PASSWORD",
            "--ca-file",
            self.pve.cafile,
            *(["--redis-url", f"redis://127.0.0.1:{self.redis_port}/0"] if self.redis_port else []),
            *extra,
        ]
        env = {**os.environ, "FAKEPVE_PASSWORD": self.pve.password, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen(
            args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        replica = Replica(name, proc, port)
        replica.reader = threading.Thread(target=replica.read, daemon=True)
        replica.reader.start()
        self.started.append(replica)
        return replica

    def close(self) -> None:
        for r in self.started:
            r.stop()


def wait_for(what: Callable[[], Any], timeout: float, message: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = what()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s: {message}")


def leader_of(*replicas: Replica) -> Replica | None:
    for r in replicas:
        status = r.status()
        if status and status["lease"]["is_leader"]:
            return r
    return None


def converged(replica: Replica) -> bool:
    status = replica.status()
    if not status or not status["last_cycle"]:
        return False
    cycle = status["last_cycle"]
    return cycle["kind"] == "full" and cycle["outcome"] == "converged"


def guests_of(pve: FakePveProcess) -> list[tuple[int, str]]:
    """The guests, the VM template left out (it stays)."""
    resources = pve.client().cluster.resources.get(type="vm")
    return sorted((int(r["vmid"]), r["name"]) for r in resources if not r.get("template"))


@pytest.fixture
def replicas(slow_pve: FakePveProcess, redis_port: int, tmp_path: Path) -> Iterator[Replicas]:
    group = Replicas(slow_pve, redis_port, tmp_path)
    yield group
    group.close()
    # Leave fakepve empty for the next test, but for the VM template.
    client = slow_pve.client()
    for r in client.cluster.resources.get(type="vm"):
        if r.get("template"):
            continue
        node, vmid = r["node"], int(r["vmid"])
        kind = "qemu" if r["type"] == "qemu" else "lxc"
        guest = client.nodes(node)(kind)(vmid)
        if r.get("status") == "running":
            guest.status.stop.post()
        wait_for(
            lambda g=guest: g.status.current.get()["status"] == "stopped",
            30,
            f"{vmid} stopped",
        )
        guest.delete()
    wait_for(lambda: not guests_of(slow_pve), 30, "fakepve empty")


def test_two_replicas_one_acts_and_a_standby_takes_over_a_killed_leader(
    replicas: Replicas, slow_pve: FakePveProcess
) -> None:
    a, b = replicas.start("ctl-a"), replicas.start("ctl-b")
    leader = wait_for(lambda: leader_of(a, b), 20, "a leader")
    standby = b if leader is a else a
    # Kill the leader in the middle of its first apply.
    wait_for(lambda: len(leader.changes()) >= 3, 60, "the leader applying")
    os.kill(leader.proc.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    leader.stop()
    assert standby.changes(None) == [], "the standby acted while the leader lived"

    wait_for(lambda: standby.status()["lease"]["is_leader"], 10, "the standby taking over")
    took_over = time.monotonic() - killed_at
    print(f"took over {took_over:.2f} s after the kill (lease ttl {LEASE_TTL} s)")
    assert took_over <= LEASE_TTL + 1.0

    wait_for(lambda: converged(standby), 120, "the new leader converging")
    done_by = {
        name: [(e["address"], e["action"]) for e in r.changes()]
        for name, r in (("leader", leader), ("standby", standby))
    }
    # No change was applied twice, neither by one replica nor across the handover.
    every = done_by["leader"] + done_by["standby"]
    assert len(every) == len(set(every)), every
    creates = [a for a, action in every if action == "create" and a.startswith("guest/")]
    assert len(creates) == len(set(creates))
    # Exactly the spec's guests exist, each once.
    guests = guests_of(slow_pve)
    assert len(guests) == GUESTS and len({name for _, name in guests}) == GUESTS
    # What the killed leader left half-done, the new one finished without redoing what was done.
    assert done_by["leader"] and done_by["standby"]


def test_sigterm_during_an_apply_then_a_restart_converges_without_duplicates(
    replicas: Replicas, slow_pve: FakePveProcess
) -> None:
    first = replicas.start("ctl-a")
    wait_for(lambda: len(first.changes()) >= 3, 60, "applying")
    first.proc.send_signal(signal.SIGTERM)
    assert first.proc.wait(30) == 0
    first.stop()
    events = [e.get("event") for e in first.events]
    assert "shutting down" in events and events[-1] == "stopped"
    # The lease is handed back on the way out: said, and not warned about as a lost one.
    assert "lease released" in events
    warned = [e.get("event") for e in first.events if e.get("level") == "warning"]
    assert "not the leader" not in warned, warned
    # In-flight changes finished; none was cut in half (a failure), the rest were not started.
    outcomes = {e["outcome"] for e in first.changes(None)}
    assert outcomes <= {"done", "skipped"}, first.changes(None)
    assert any(e.get("error") == "not started: shutting down" for e in first.changes("skipped"))

    second = replicas.start("ctl-a2", "--once")
    assert second.proc.wait(120) == 0
    second.stop()
    every = [(e["address"], e["action"]) for r in (first, second) for e in r.changes()]
    assert len(every) == len(set(every)), every
    assert len(guests_of(slow_pve)) == GUESTS
