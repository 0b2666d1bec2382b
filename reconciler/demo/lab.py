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
    named            a real BIND serving the spec's DNS zones, when `named` is installed (else
                     the demo leaves DNS out and says so): the spec's TSIG key, its secret made
                     here and put in the variable the spec reads it from
    notifications    an HTTP endpoint taking Apprise's `json://` posts: each notification
                     target of the spec is pointed here (`Lab.aimed`), its secret reference kept
                     (the lab sets the variable; the receiver checks the password it brings)

Everything lives under a state directory: `logs/` (the Traefik logs, fakepve's output, the
demo's JSON-lines event log), `named/` (its configuration, zones and log) and what the demo
writes there (plans, the final snapshot).
`Lab.stop` stops everything started, in reverse order, and puts back the environment variables
it set; `pids` names every process started, so a test can check that none is left.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import json
import os
import secrets
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TextIO

from reconciler.applying.connecting import Endpoints, agent_health_provider
from reconciler.model.spec import (
    FileFeed,
    PlatformSpec,
    ProxmoxApi,
    SecretRef,
    url_references,
)
from reconciler.simulators.agent import AgentFleet, SimulatedAgent
from reconciler.simulators.fakepve_process import FakePveProcess
from reconciler.simulators.named import NamedMissing, NamedServer, start_named
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
NAMED_MISSING = "named not installed: DNS records skipped (apt-get install bind9)"
DNS_OFF = "DNS records skipped (--no-dns)"


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


@dataclass(frozen=True)
class Received:
    """One notification as the receiver got it: the path (the target's name), whether it
    brought the password the lab set, and Apprise's JSON (title, message, type)."""

    path: str
    authorized: bool
    body: dict[str, Any]

    @property
    def title(self) -> str:
        return str(self.body.get("title", ""))

    @property
    def type(self) -> str:
        return str(self.body.get("type", ""))


class NotificationReceiver:
    """Takes Apprise's `json://` posts on loopback (a thread of its own), as a team's ntfy or
    webhook endpoint would; answers 200. `passwords`: path -> the password a post there must
    bring (HTTP basic auth), for the targets whose URL holds a secret reference."""

    def __init__(self) -> None:
        self.got: list[Received] = []
        self.passwords: dict[str, str] = {}
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                try:
                    body = json.loads(self.rfile.read(length) or b"{}")
                except ValueError:
                    body = {}
                ok = receiver.authorized(self.path, self.headers.get("Authorization"))
                receiver.got.append(Received(self.path, ok, body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def authorized(self, path: str, authorization: str | None) -> bool:
        """Whether a post to `path` brought the password the lab set for it (if any)."""
        wanted = self.passwords.get(path)
        if wanted is None:
            return True
        auth = authorization or ""
        try:
            sent = base64.b64decode(auth.removeprefix("Basic ")).decode()
        except ValueError:
            return False
        return auth.startswith("Basic ") and sent.partition(":")[2] == wanted

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


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
    named: NamedServer | None = None  # None: DNS left out (`dns_skipped` says why)
    dns_skipped: str = ""
    receiver: NotificationReceiver | None = None
    target_urls: dict[str, str] = field(default_factory=dict)  # target -> its URL in the lab
    parts: list[Part] = field(default_factory=list)
    pids: dict[str, int] = field(default_factory=dict)  # every process started: name -> pid
    _stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    @property
    def logs(self) -> Path:
        return self.state_dir / "logs"

    def pve(self) -> Any:
        """A proxmoxer client on fakepve, for breaking things by hand."""
        return self.fake.client()

    def scoped(self, spec: PlatformSpec) -> PlatformSpec:
        """`spec` as this lab can serve it: without its `dns` section when no named runs (the
        spec's own server is not here: the DNS provider would wait on it)."""
        if self.named is None and spec.dns is not None:
            return spec.model_copy(update={"dns": None})
        return spec

    def aimed(self, spec: PlatformSpec) -> PlatformSpec:
        """`spec` with each notification target's URL pointed at the lab's receiver (its
        events, severity and limits as the spec says)."""
        targets = {
            name: target.model_copy(update={"url": self.target_urls[name]})
            for name, target in spec.notifications.targets.items()
            if name in self.target_urls
        }
        notifications = spec.notifications.model_copy(update={"targets": targets})
        return spec.model_copy(update={"notifications": notifications})

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
        if path.name in ("logs", "plans", "named") or path.name.startswith("traefik-"):
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
    use_named: bool = True,
) -> Lab:
    """Start every part; on a failure, stop what was started and raise. `use_redis` None means
    "when redis-server is installed"; `use_named` False leaves DNS out even where named is
    installed."""
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
        named, dns_skipped = _start_named(run, spec) if use_named else (None, DNS_OFF)
        receiver, target_urls = _start_receiver(run, spec)
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
            dns_servers={z: named.server for z in named.zones} if named is not None else {},
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
        named=named,
        dns_skipped=dns_skipped if spec.dns is not None else "",
        receiver=receiver,
        target_urls=target_urls,
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


def _start_named(run: _Starting, spec: PlatformSpec) -> tuple[NamedServer | None, str]:
    """A real named serving the spec's zones under the spec's TSIG keys, each key's secret in
    the variable the spec reads it from; (None, why) when there is no `dns`, no named, a
    secret read from a file (the lab sets variables only), or named does not start."""
    if spec.dns is None or not spec.dns.zones:
        return None, ""
    zones = spec.dns.zones
    keys = {z.provider.tsig.name: z.provider.tsig.algorithm for z in zones.values()}
    files = sorted(name for name, z in zones.items() if z.provider.tsig.secret.env is None)
    if files:
        return None, (
            f"DNS records skipped: zone {files[0]}'s TSIG secret is read from a file, and the "
            "demo sets environment variables only"
        )
    workdir = run.state_dir / "named"
    try:
        named = start_named(workdir, sorted(zones), seed=(), keys=keys)
    except NamedMissing:
        return None, NAMED_MISSING
    except (RuntimeError, OSError) as exc:
        first = str(exc).splitlines()[0]
        return None, f"{first}: DNS records skipped (its log: {workdir})"
    run.stack.callback(named.stop)
    run.pids["named"] = named.proc.pid
    for zone in zones.values():
        key = zone.provider.tsig
        assert key.secret.env is not None
        _set_env(run.stack, key.secret.env, named.secrets[key.name])
    variables = sorted({z.provider.tsig.secret.env or "" for z in zones.values()})
    run.started(
        Part(
            "named",
            named.server,
            f"real BIND, zones {', '.join(sorted(zones))}; key {', '.join(sorted(keys))}, "
            f"secret in ${', $'.join(variables)}",
        ),
        "named",
        server=named.server,
        zones=sorted(zones),
    )
    return named, ""


def _start_receiver(
    run: _Starting, spec: PlatformSpec
) -> tuple[NotificationReceiver | None, dict[str, str]]:
    """The receiver of the spec's notification targets (none without targets), and each
    target's URL in the lab: `json://` to the receiver at /<target>. A target whose URL holds
    a secret reference keeps it, as the password (the lab sets the variable to a fresh value,
    which the receiver wants to see)."""
    targets = spec.notifications.targets
    if not targets:
        return None, {}
    receiver = NotificationReceiver()
    run.stack.callback(receiver.stop)
    urls: dict[str, str] = {}
    tokens: dict[str, str] = {}  # variable -> the value the lab set (targets may share one)
    for name in sorted(targets):
        env = next((r.env for r in url_references(targets[name].url) if r.env), None)
        where = f"127.0.0.1:{receiver.port}/{name}"
        if env is None:
            urls[name] = f"json://{where}"
            continue
        if env not in tokens:
            tokens[env] = secrets.token_hex(16)
            _set_env(run.stack, env, tokens[env])
        receiver.passwords[f"/{name}"] = tokens[env]
        urls[name] = f"json://{name}:{{env:{env}}}@{where}"
    schemes = ", ".join(f"{n} ({targets[n].url.split('://')[0]}://...)" for n in sorted(targets))
    run.started(
        Part(
            "notifications",
            receiver.url,
            f"a JSON receiver (Apprise json://) for the spec's targets {schemes}",
        ),
        "notifications",
        url=receiver.url,
        targets=sorted(targets),
    )
    return receiver, urls


@contextlib.contextmanager
def running_lab(
    spec: PlatformSpec, state_dir: Path, *, time_scale: float = 0.0, use_redis: bool | None = None
) -> Iterator[Lab]:
    lab = start_lab(spec, state_dir, time_scale=time_scale, use_redis=use_redis)
    try:
        yield lab
    finally:
        lab.stop()
