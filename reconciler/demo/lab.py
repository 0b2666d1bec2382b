"""The demo's lab: every outside part the example platform talks to, started on loopback, and the
`Endpoints` that point the controller at them. Called by `reconciler.demo.script`.

    fakepve          a fake Proxmox VE (subprocess, own TLS cert) with the spec's nodes, the
                     container template, and the cloud-init VM template the spec's VMs are
                     cloned from (`CLOUD_TEMPLATE_*`, made as an operator makes it)
    Velocity         the bridge plugin simulator, its secret in the variable the spec names
    agents           one simulated agent per guest of an agent layer, ready
    Traefik          the real binary, one per instance of the spec: a file feed through its
                     file provider (a file in the state dir), a Redis feed through a real Redis
                     when `redis-server` is installed, else through the file provider too

Everything lives under a state directory: `logs/` (the Traefik logs, fakepve's output, the
demo's JSON-lines event log) and what the demo writes there (plans, the final snapshot).
`Lab.stop` stops everything started, in reverse order, and puts back the environment variables
it set; `pids` names every process started, so a test can check that none is left.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from reconciler.applying.connecting import Endpoints, agent_health_provider
from reconciler.model.spec import FileFeed, PlatformSpec, ProxmoxApi, SecretRef
from reconciler.simulators.agent import AgentFleet, SimulatedAgent
from reconciler.simulators.fakepve_process import FakePveProcess
from reconciler.simulators.processes import (
    RedisProcess,
    TraefikProcess,
    redis_exe,
    start_redis,
    start_traefik,
)
from reconciler.simulators.velocity_bridge import VelocityBridgeSimulator

TEMPLATE = "debian-12-standard_12.7-1_amd64.tar.zst"
# The cloud-init VM template of the example platform (specs/control.yaml says how an operator
# makes it): the lab makes it on the node of the first guest that clones it.
CLOUD_TEMPLATE_VMID = 200
CLOUD_TEMPLATE_NAME = "debian-12-cloudinit"
PVE_PASSWORD_ENV = "RECONCILER_DEMO_PVE_PASSWORD"
_DEFAULT_BRIDGE_SECRET_ENV = "ZPACK_BRIDGE_SECRET"


class EventLog:
    """The demo's own log: one JSON object a line, with the seconds since the demo began."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.started = time.monotonic()
        self._file: TextIO = path.open("a", encoding="utf-8")

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def write(self, event: str, **data: Any) -> None:
        now = datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")
        record = {"at": now, "elapsed": round(self.elapsed(), 3), "event": event, **data}
        self._file.write(json.dumps(record, default=str) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


@dataclass(frozen=True)
class VmTemplate:
    """A VM template the lab makes in fakepve before anything runs: a foreign guest the spec's
    VMs are cloned from."""

    vmid: int
    name: str
    node: str


def cloud_templates(spec: PlatformSpec) -> tuple[VmTemplate, ...]:
    """The cloud-init template (`CLOUD_TEMPLATE_*`) on the node of the first guest, by name,
    that clones it by its name or vmid; none when no guest does (another spec's templates are
    not guessed: its plan says which one is missing)."""
    for _name, guest in sorted(spec.guests.items()):
        if guest.clone is not None and guest.clone.source in (
            CLOUD_TEMPLATE_NAME,
            CLOUD_TEMPLATE_VMID,
        ):
            node = spec.node_of(guest.host)
            return (VmTemplate(CLOUD_TEMPLATE_VMID, CLOUD_TEMPLATE_NAME, node),)
    return ()


@dataclass
class Part:
    """One started part, for the lab's description."""

    name: str
    where: str
    what: str


@dataclass
class Lab:
    spec: PlatformSpec
    state_dir: Path
    events: EventLog
    fake: FakePveProcess
    bridge: VelocityBridgeSimulator
    fleet: AgentFleet
    agents: dict[str, SimulatedAgent]  # by guest name
    traefiks: dict[str, TraefikProcess]  # by instance
    redis: RedisProcess | None
    endpoints: Endpoints
    parts: list[Part] = field(default_factory=list)
    pids: dict[str, int] = field(default_factory=dict)  # every process started: name -> pid
    _stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    @property
    def logs(self) -> Path:
        return self.state_dir / "logs"

    def pve(self) -> Any:
        """A proxmoxer client on fakepve, for breaking things by hand."""
        return self.fake.client()

    def stop(self) -> None:
        self._stack.close()


def _set_env(stack: contextlib.ExitStack, name: str, value: str) -> None:
    old = os.environ.get(name)
    os.environ[name] = value

    def restore() -> None:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old

    stack.callback(restore)


def _stop_fakepve(fake: FakePveProcess, log: Path) -> None:
    """Stop fakepve, keeping what it printed. FakePveProcess only pipes its output, so it is
    read here (after the process ended, so reading cannot block) before the pipes are closed."""
    proc = fake._proc
    lines = [f"fakepve at {fake.url}, time scale {fake.time_scale}"]
    if proc is not None:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None and proc.poll() is not None:
                lines.append(stream.read().rstrip())
        lines.append(f"exit status {proc.returncode}")
    log.write_text("\n".join(line for line in lines if line) + "\n", encoding="utf-8")
    fake.stop()


def clear_state(state_dir: Path) -> None:
    """Remove what an earlier demo left in `state_dir` (only the demo's own entries): an old
    feed file would hand the new Traefik the old routes, and the platform would not start
    empty."""
    for path in state_dir.iterdir():
        if path.name in ("logs", "plans") or path.name.startswith("traefik-"):
            shutil.rmtree(path, ignore_errors=True)
        elif path.name == "observed.json":
            path.unlink()


def _bridge_secret_env(spec: PlatformSpec) -> str | None:
    """The variable the spec reads the bridge secret from (None: a file, or no Velocity)."""
    if spec.velocity is None:
        return None
    return spec.velocity.bridge.secret.env


def start_lab(
    spec: PlatformSpec,
    state_dir: Path,
    *,
    time_scale: float = 0.0,
    use_redis: bool | None = None,
) -> Lab:
    """Start every part; on a failure, stop what was started and raise. `use_redis` None means
    "when redis-server is installed"."""
    state_dir.mkdir(parents=True, exist_ok=True)
    clear_state(state_dir)
    logs = state_dir / "logs"
    logs.mkdir(exist_ok=True)
    stack = contextlib.ExitStack()
    try:
        events = EventLog(logs / "events.jsonl")
        stack.callback(events.close)
        run = _Starting(stack, events, state_dir)
        fake = _start_fakepve(run, spec, time_scale)
        bridge = _start_bridge(run, spec)
        fleet, agents, agent_endpoints = _start_agents(run, spec)
        if use_redis is None:
            use_redis = redis_exe() is not None
        traefiks, redis, files = _start_traefiks(run, spec, use_redis)
        endpoints = Endpoints(
            proxmox=ProxmoxApi(
                url=fake.url,
                user=fake.user,
                password=SecretRef(env=PVE_PASSWORD_ENV),
                ca_file=fake.cafile,
            ),
            velocity_url=bridge.url,
            agents=agent_endpoints,
            traefik_files=files,
            traefik_apis={name: t.api_url for name, t in traefiks.items()},
            redis_url=redis.url if redis is not None else None,
        )
    except BaseException:
        stack.close()
        raise
    return Lab(
        spec=spec,
        state_dir=state_dir,
        events=events,
        fake=fake,
        bridge=bridge,
        fleet=fleet,
        agents=agents,
        traefiks=traefiks,
        redis=redis,
        endpoints=endpoints,
        parts=run.parts,
        pids=run.pids,
        _stack=stack,
    )


@dataclass
class _Starting:
    """What `start_lab` gathers while it starts the parts: how to stop each (`stack`, closed in
    reverse order), what to say about it (`parts`, the event log) and its process (`pids`)."""

    stack: contextlib.ExitStack
    events: EventLog
    state_dir: Path
    parts: list[Part] = field(default_factory=list)
    pids: dict[str, int] = field(default_factory=dict)

    @property
    def logs(self) -> Path:
        return self.state_dir / "logs"

    def started(self, part: Part, event: str, **data: Any) -> None:
        """`part` is up: listed for the reader, and logged as event `started` of `event`."""
        self.parts.append(part)
        self.events.write("started", part=event, **data)


def start_fakepve(
    nodes: Sequence[str],
    *,
    templates: Sequence[str] = (TEMPLATE,),
    vm_templates: Sequence[VmTemplate] = (),
    time_scale: float = 0.0,
    port: int = 0,
    password: str = "secret",
    backup_storages: Sequence[str] = ("backup",),
) -> FakePveProcess:
    """fakepve (PlatformPve, own TLS certificate, on 127.0.0.1) with `nodes`, the backup
    storages, each container template in `local` storage and each VM template (`qm create`,
    `qm template`, its disks on `local-lvm`); stopped again when seeding fails.
    Once one template is in storage, fakepve checks that a create names one that exists. Used
    by the demo's lab and by `reconciler lab` (reconciler/cli/lab.py)."""
    fake = FakePveProcess(
        nodes=tuple(nodes),
        time_scale=time_scale,
        port=port,
        password=password,
        backup_storages=tuple(backup_storages),
    )
    fake.start()
    try:
        for template in templates:
            fake.seed_template(template)
        for vm in vm_templates:
            fake.seed_vm_template(vm.vmid, vm.name, vm.node)
    except BaseException:
        fake.stop()
        raise
    return fake


def _start_fakepve(run: _Starting, spec: PlatformSpec, time_scale: float) -> FakePveProcess:
    """fakepve with the spec's nodes, the demo's container template and the VM template its
    VMs clone, its password in the variable the lab's `Endpoints` name."""
    nodes = tuple(sorted(h.node or name for name, h in spec.hosts.items()))
    vm_templates = cloud_templates(spec)
    fake = start_fakepve(nodes, vm_templates=vm_templates, time_scale=time_scale)
    run.stack.callback(_stop_fakepve, fake, run.logs / "fakepve.log")
    if fake._proc is not None:
        run.pids["fakepve"] = fake._proc.pid
    _set_env(run.stack, PVE_PASSWORD_ENV, fake.password)
    speed = "tasks finish at once (time scale 0)" if not time_scale else f"time x{time_scale}"
    made = "".join(
        f"; VM template {t.vmid} {t.name!r} on {t.node} (cloud-init)" for t in vm_templates
    )
    run.started(
        Part("fakepve", fake.url, f"fake Proxmox VE, nodes {', '.join(nodes)}{made}; {speed}"),
        "fakepve",
        url=fake.url,
        nodes=nodes,
        vm_templates=[t.vmid for t in vm_templates],
        time_scale=time_scale,
    )
    return fake


def _start_bridge(run: _Starting, spec: PlatformSpec) -> VelocityBridgeSimulator:
    """The Velocity bridge simulator, its secret in the variable the spec reads it from."""
    secret = secrets.token_hex(16)
    secret_env = _bridge_secret_env(spec) or _DEFAULT_BRIDGE_SECRET_ENV
    _set_env(run.stack, secret_env, secret)
    bridge = VelocityBridgeSimulator(secret).start()
    run.stack.callback(bridge.stop)
    run.started(
        Part("Velocity", bridge.url, f"bridge plugin simulator, secret in ${secret_env}"),
        "velocity-bridge",
        url=bridge.url,
    )
    return bridge


def _start_agents(
    run: _Starting, spec: PlatformSpec
) -> tuple[AgentFleet, dict[str, SimulatedAgent], dict[str, tuple[str, int]]]:
    """One ready agent per guest the controller watches: the fleet, the agents by guest name,
    and where each answers."""
    fleet = AgentFleet(control=False).start()
    run.stack.callback(fleet.stop)
    agents: dict[str, SimulatedAgent] = {}
    endpoints: dict[str, tuple[str, int]] = {}
    for i, address in enumerate(sorted(agent_health_provider(spec).endpoints), start=1):
        name = address.removeprefix("guest/")
        # The fleet keys agents by vmid; an index will do: the observer is told where each
        # guest's agent answers, and some guests get their vmid only when planned.
        agents[name] = fleet.add(i, name=name)
        endpoints[name] = fleet.endpoint(i)
    what = f"{len(agents)} simulated agents, one per runtime guest, all ready"
    run.started(Part("agents", fleet.host, what), "agents", guests=sorted(agents))
    return fleet, agents, endpoints


def _start_traefiks(
    run: _Starting, spec: PlatformSpec, use_redis: bool
) -> tuple[dict[str, TraefikProcess], RedisProcess | None, dict[str, Path]]:
    """One Traefik per instance of the spec: a file feed stays a file (in the state dir), a
    Redis feed gets a real Redis (started once, for all) when `use_redis`, else a file too.
    The Traefiks by instance, the Redis, and the feed files by instance."""
    redis: RedisProcess | None = None
    traefiks: dict[str, TraefikProcess] = {}
    files: dict[str, Path] = {}
    for name, inst in sorted(spec.traefik.items()):
        if isinstance(inst.feed, FileFeed) or not use_redis:
            feed_dir = run.state_dir / f"traefik-{name}"
            feed_dir.mkdir(exist_ok=True)
            files[name] = feed_dir / (
                Path(inst.feed.path).name if isinstance(inst.feed, FileFeed) else f"{name}.yml"
            )
            args = [f"--providers.file.directory={feed_dir}", "--providers.file.watch=true"]
            feed = f"file provider: {files[name]}"
            if not isinstance(inst.feed, FileFeed):
                feed += " (the spec says Redis; this lab runs none)"
        else:
            if redis is None:
                redis = start_redis()
                run.stack.callback(redis.stop)
                run.pids["redis"] = redis.proc.pid
            args = [
                f"--providers.redis.endpoints=127.0.0.1:{redis.port}",
                f"--providers.redis.rootkey={inst.feed.root_key}",
            ]
            feed = f"Redis provider: {redis.url}, root key {inst.feed.root_key}"
        traefik = start_traefik(args, run.logs, name=name)
        run.stack.callback(traefik.stop)
        traefiks[name] = traefik
        run.pids[f"traefik-{name}"] = traefik.proc.pid
        run.started(
            Part(f"Traefik {name}", traefik.api_url, f"real Traefik, {feed}"),
            f"traefik-{name}",
            api=traefik.api_url,
            feed=feed,
        )
    return traefiks, redis, files


@contextlib.contextmanager
def running_lab(
    spec: PlatformSpec, state_dir: Path, *, time_scale: float = 0.0, use_redis: bool | None = None
) -> Iterator[Lab]:
    lab = start_lab(spec, state_dir, time_scale=time_scale, use_redis=use_redis)
    try:
        yield lab
    finally:
        lab.stop()
