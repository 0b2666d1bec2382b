"""Design-rule policies against the example platform: it passes every one, and each mistake a
person can make against a policy is caught with its code, at the file and line to change.

Each variant copies specs/ to a temporary directory and edits its YAML as text, so positions are
those a person sees in an editor. Expected lines are found by searching the edited file for a
marker, which keeps the assertion exact while surviving unrelated edits to the example.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from reconciler.loading.loader import load_directory
from reconciler.model.diagnostics import Diagnostic, Severity

SPECS = Path(__file__).resolve().parents[2] / "specs"

Edit = tuple[str, str, str]  # (file, old text, new text): old must occur exactly once


@dataclass(frozen=True)
class Expect:
    code: str
    file: str
    marker: str  # a text on exactly one line of `file`: the line the diagnostic points at
    phrase: str  # a part of the message


def make_variant(tmp_path: Path, *edits: Edit) -> Path:
    directory = tmp_path / "specs"
    shutil.copytree(SPECS, directory)
    for file, old, new in edits:
        path = directory / file
        text = path.read_text(encoding="utf-8")
        assert text.count(old) == 1, f"{file}: {old!r} must occur exactly once"
        path.write_text(text.replace(old, new), encoding="utf-8")
    return directory


def load(directory: Path) -> list[Diagnostic]:
    return load_directory(directory, display="specs").diagnostics


def line_of(directory: Path, file: str, marker: str) -> int:
    lines = (directory / file).read_text(encoding="utf-8").splitlines()
    found = [n for n, line in enumerate(lines, 1) if marker in line]
    assert len(found) == 1, f"{file}: marker {marker!r} is on lines {found}"
    return found[0]


def assert_found(directory: Path, diags: list[Diagnostic], expected: list[Expect]) -> None:
    """Exactly the expected diagnostics, each an error at its file:line naming its phrase."""
    got = sorted(
        (d.code, d.position.file if d.position else "", d.position.line if d.position else 0)
        for d in diags
    )
    want = sorted(
        (e.code, f"specs/{e.file}", line_of(directory, e.file, e.marker)) for e in expected
    )
    assert got == want, "\n".join(str(d) for d in diags)
    for e in expected:
        line = line_of(directory, e.file, e.marker)
        matching = [
            d
            for d in diags
            if d.code == e.code
            and d.position is not None
            and d.position.file == f"specs/{e.file}"
            and d.position.line == line
        ]
        assert any(e.phrase in d.message for d in matching), (e.phrase, [str(d) for d in matching])
        assert all(d.severity is Severity.ERROR for d in matching)


# --- the example platform ---------------------------------------------------------------------


def test_example_platform_passes_every_policy() -> None:
    assert [str(d) for d in load(SPECS)] == []


def test_example_platform_enables_every_policy() -> None:
    # Otherwise "zero diagnostics" above would prove nothing about a policy left out.
    result = load_directory(SPECS)
    assert result.spec is not None
    policies = result.spec.policies
    for name in (
        "layer_dependencies",
        "placement",
        "isolation",
        "agent_port",
        "traefik_domains",
        "velocity_host",
        "vmid_ranges",
    ):
        policy = getattr(policies, name)
        assert policy is not None and policy.enabled, name


# --- one mistake per variant ------------------------------------------------------------------

AGENT_RULE = "        - {type: in, action: ACCEPT, proto: tcp, dport: 18888, source: api}\n"
MONITOR_DISK = "    disk: {size: 32G}\n"
MONITOR_RULES = (
    "    disk: {size: 32G}\n"
    "    firewall:\n"
    "      rules:\n"
    "        - {type: group, action: from-control}\n"
    "        - {type: in, action: ACCEPT, proto: tcp, dport: 9100, source: 10.20.0.10}\n"
)
LAST_EXCEPTION = (
    "      - {to: zpack-vpn, port: 51820, reason: operators connect to WireGuard from anywhere}\n"
)


def _exception(to: str, port: str) -> Edit:
    return (
        "platform.yaml",
        LAST_EXCEPTION,
        LAST_EXCEPTION + f"      - {{to: {to}, port: {port}, reason: scraped by monitoring}}\n",
    )


CASES = [
    pytest.param(
        [
            (
                "firewall.yaml",
                AGENT_RULE,
                "        - {type: in, action: ACCEPT, proto: tcp, dport: 18888}\n",
            )
        ],
        [
            Expect(
                "policy-agent-port",
                "firewall.yaml",
                "dport: 18888}",
                "agent port 18888 on runtime guests 'dev-alice', 'dev-bob', 'mc-lobby' and 4 "
                "more is open to any source through rule `IN ACCEPT -p tcp -dport 18888` of "
                "security group 'agent'; only zpack-api (10.10.0.11) may reach it",
            )
        ],
        id="agent-port-open-to-any-source",
    ),
    pytest.param(
        [("firewall.yaml", "source: api}", "source: 0.0.0.0/0}")],
        [
            Expect(
                "policy-agent-port",
                "firewall.yaml",
                "source: 0.0.0.0/0}",
                "is open to '0.0.0.0/0' (0.0.0.0/0), wider than zpack-api (10.10.0.11)",
            )
        ],
        id="agent-port-open-to-the-world",
    ),
    pytest.param(
        [("firewall.yaml", "dport: 18888, source: api}", "dport: 18888, source: control-net}")],
        [
            Expect(
                "policy-agent-port",
                "firewall.yaml",
                "dport: 18888, source: control-net}",
                "is open to 'control-net' (10.10.0.0/24), wider than zpack-api (10.10.0.11)",
            )
        ],
        id="agent-port-open-to-a-subnet-alias",
    ),
    pytest.param(
        [("firewall.yaml", "dport: 18888, source: api}", 'dport: "80,18000:19000"}')],
        [Expect("policy-agent-port", "firewall.yaml", "18000:19000", "is open to any source")],
        id="agent-port-inside-a-port-range",
    ),
    pytest.param(
        [
            (
                "game.yaml",
                "    profile: game-vanilla\n    cores: 1\n",
                "    profile: game-vanilla\n    cores: 1\n    firewall: {enable: false}\n",
            )
        ],
        [
            Expect(
                "policy-agent-port",
                "game.yaml",
                "firewall: {enable: false}",
                "agent port 18888 on runtime guest 'mc-lobby' is open to any source: its "
                "firewall is disabled",
            )
        ],
        id="agent-port-guest-firewall-disabled",
    ),
    pytest.param(
        [
            (
                "game.yaml",
                "ip: 10.20.0.10/24, gw: 10.20.0.1, tag: 20}",
                "ip: 10.20.0.10/24, gw: 10.20.0.1, tag: 20, firewall: false}",
            )
        ],
        [
            Expect(
                "policy-agent-port",
                "game.yaml",
                "firewall: false}",
                "runtime guest 'mc-lobby' is open to any source: interface eth0 has firewall: "
                "false",
            )
        ],
        id="agent-port-nic-firewall-off",
    ),
    pytest.param(
        [
            (
                "profiles.yaml",
                "    firewall: &game-firewall\n      enable: true\n      policy_in: DROP",
                "    firewall: &game-firewall\n      enable: true\n      policy_in: ACCEPT",
            )
        ],
        [
            Expect(
                "policy-agent-port",
                "profiles.yaml",
                "policy_in: ACCEPT",
                "is open to any address except 10.10.0.11 through policy_in ACCEPT",
            )
        ],
        id="agent-port-policy-in-accept",
    ),
    pytest.param(
        [
            (
                "firewall.yaml",
                AGENT_RULE,
                AGENT_RULE
                + "        - {type: in, action: DROP}\n"
                + "        - {type: in, action: ACCEPT, proto: tcp, dport: 18888, comment: dead}\n",
            )
        ],
        [],
        id="blanket-drop-shadows-a-wide-accept",
    ),
    pytest.param(
        [
            (
                "firewall.yaml",
                AGENT_RULE,
                AGENT_RULE
                + "        - {type: in, action: DROP, proto: tcp, dport: 18888}\n"
                + "        - {type: in, action: ACCEPT, source: control-net, comment: scrape}\n",
            )
        ],
        [],
        id="agent-port-drop-shadows-a-wide-accept",
    ),
    pytest.param(
        [
            (
                "firewall.yaml",
                AGENT_RULE,
                AGENT_RULE
                + "        - {type: in, action: DROP, proto: udp}\n"
                + "        - {type: in, action: ACCEPT, proto: tcp, dport: 18888, comment: live}\n",
            )
        ],
        [Expect("policy-agent-port", "firewall.yaml", "comment: live}", "is open to any source")],
        id="narrow-drop-does-not-shadow",
    ),
    pytest.param(
        [("firewall.yaml", "  cluster:\n    enable: true", "  cluster:\n    enable: false")],
        [
            Expect(
                "policy-agent-port",
                "firewall.yaml",
                "enable: false",
                "is open to any source: the cluster firewall is disabled",
            ),
            Expect(
                "policy-isolation",
                "firewall.yaml",
                "enable: false",
                "are open to every runtime guest: the cluster firewall is disabled",
            ),
        ],
        id="cluster-firewall-disabled",
    ),
    pytest.param(
        [
            (
                "control.yaml",
                "target: {guest: zpack-vpn, port: 51821}",
                "target: {guest: mc-lobby, port: 8100}",
            )
        ],
        [
            Expect(
                "policy-traefik-domains",
                "control.yaml",
                "target: {guest: mc-lobby",
                "route core/vpn sends traffic to runtime guest 'mc-lobby', outside the domain "
                "of Traefik instance 'core' (control)",
            ),
            Expect(
                "policy-layer-dependencies",
                "control.yaml",
                "target: {guest: mc-lobby",
                "control guest 'traefik-core' depends on runtime guest 'mc-lobby' through "
                "route core/vpn",
            ),
        ],
        id="core-traefik-routes-to-game-server",
    ),
    pytest.param(
        [("edge.yaml", "    routes_to: [edge, runtime]", "    routes_to: [control]")],
        [
            Expect(
                "policy-traefik-domains",
                "edge.yaml",
                "routes_to: [control]",
                "Traefik instances 'core' and 'runtime' both serve the traffic domain control",
            ),
            *(
                Expect(
                    "policy-traefik-domains",
                    "edge.yaml",
                    f"target: {{guest: {g},",
                    f"sends traffic to runtime guest '{g}', outside the domain of Traefik "
                    "instance 'runtime'",
                )
                for g in ("dev-alice", "dev-bob", "mc-survival", "mc-creative", "mc-skyblock")
            ),
        ],
        id="two-traefik-instances-one-domain",
    ),
    pytest.param(
        [
            (
                "control.yaml",
                "    tags: [mariadb]\n",
                "    tags: [mariadb]\n    depends_on: [mc-lobby]\n",
            )
        ],
        [
            Expect(
                "policy-layer-dependencies",
                "control.yaml",
                "depends_on: [mc-lobby]",
                "control guest 'zpack-db' depends on runtime guest 'mc-lobby' through "
                "depends_on; control guests may depend only on control guests. Also reached "
                "from 'zpack-api' through zpack-db -> mc-lobby (depends_on)",
            )
        ],
        id="control-guest-depends-on-runtime-transitively",
    ),
    pytest.param(
        [
            (
                "game.yaml",
                "    vmid: 1000\n    host: pve-runtime",
                "    vmid: 1000\n    host: pve-core",
            )
        ],
        [
            Expect(
                "policy-placement",
                "game.yaml",
                "host: pve-core",
                "runtime guest 'mc-lobby' is placed on host 'pve-core', which serves only control",
            )
        ],
        id="runtime-guest-on-core-host",
    ),
    pytest.param(
        [
            (
                "edge.yaml",
                "    vmid: 302\n    host: pve-runtime",
                "    vmid: 302\n    host: pve-core",
            )
        ],
        [
            Expect(
                "policy-velocity-host",
                "edge.yaml",
                "host: pve-core",
                "Velocity guest 'velocity' is on host 'pve-core', which does not serve the "
                "runtime layer (it serves control)",
            ),
            Expect(
                "policy-placement",
                "edge.yaml",
                "host: pve-core",
                "edge guest 'velocity' is placed on host 'pve-core'",
            ),
        ],
        id="velocity-on-core-host",
    ),
    pytest.param(
        [("game.yaml", "vmid: 1000", "vmid: 1500")],
        [
            Expect(
                "policy-vmid-ranges",
                "game.yaml",
                "vmid: 1500",
                "guest 'mc-lobby' has vmid 1500, outside its role game's range 1000-1099",
            )
        ],
        id="vmid-outside-its-range",
    ),
    pytest.param(
        [("platform.yaml", "dev:        {first: 1100", "dev:        {first: 1050")],
        [
            Expect(
                "policy-vmid-ranges",
                "platform.yaml",
                "{first: 1050",
                "range 'dev' (1050-1199) overlaps range 'game' (1000-1099)",
            )
        ],
        id="overlapping-ranges",
    ),
    pytest.param(
        [
            (
                "control.yaml",
                MONITOR_DISK + "    network:\n      - {name: eth0, bridge: vmbr0, "
                "ip: 10.10.0.16/24",
                MONITOR_RULES + "    network:\n      - {name: eth0, bridge: "
                "vmbr0, ip: 10.10.0.16/24",
            )
        ],
        [
            Expect(
                "policy-isolation",
                "control.yaml",
                "source: 10.20.0.10}",
                "runtime guest 'mc-lobby' (10.20.0.10) can reach control guest 'zpack-monitor' "
                "through rule `IN ACCEPT -source 10.20.0.10 -p tcp -dport 9100` (port 9100); "
                "no isolation exception covers it",
            )
        ],
        id="isolation-control-guest-accepts-runtime-address",
    ),
    pytest.param(
        [
            (
                "control.yaml",
                MONITOR_DISK + "    network:\n      - {name: eth0, bridge: vmbr0, "
                "ip: 10.10.0.16/24",
                MONITOR_RULES + "    network:\n      - {name: eth0, bridge: "
                "vmbr0, ip: 10.10.0.16/24",
            ),
            _exception("zpack-monitor", "9100"),
        ],
        [],
        id="isolation-exception-allows-it",
    ),
    pytest.param(
        [
            (
                "control.yaml",
                MONITOR_DISK + "    network:\n      - {name: eth0, bridge: vmbr0, "
                "ip: 10.10.0.16/24",
                MONITOR_RULES + "    network:\n      - {name: eth0, bridge: "
                "vmbr0, ip: 10.10.0.16/24",
            ),
            _exception("zpack-monitor", "22"),
        ],
        [
            Expect(
                "policy-isolation",
                "control.yaml",
                "source: 10.20.0.10}",
                "can reach control guest 'zpack-monitor'",
            )
        ],
        id="isolation-exception-for-another-port",
    ),
    pytest.param(
        [("platform.yaml", LAST_EXCEPTION, "")],
        [
            Expect(
                "policy-isolation",
                "control.yaml",
                "dport: 51820",
                "7 runtime guests, e.g. 'dev-alice' (10.20.0.100), can reach control guest "
                "'zpack-vpn' through rule `IN ACCEPT -p udp -dport 51820` (port 51820)",
            )
        ],
        id="isolation-public-port-without-exception",
    ),
    pytest.param(
        [
            (
                "control.yaml",
                "    firewall:\n      rules:\n        - {type: group, action: "
                "from-control}\n        - {type: group, action: ssh-admin}\n        - {type: in, "
                "action: ACCEPT, proto: udp",
                "    firewall:\n      enable: false\n      rules:\n        - {type: group, action: "
                "from-control}\n        - {type: group, action: ssh-admin}\n        - {type: in, "
                "action: ACCEPT, proto: udp",
            )
        ],
        [
            Expect(
                "policy-isolation",
                "control.yaml",
                "enable: false",
                "control guest 'zpack-dns' is open to every runtime guest: its firewall is "
                "disabled",
            )
        ],
        id="isolation-control-guest-firewall-disabled",
    ),
]


@pytest.mark.parametrize(("edits", "expected"), CASES)
def test_policy_violation(tmp_path: Path, edits: list[Edit], expected: list[Expect]) -> None:
    directory = make_variant(tmp_path, *edits)
    assert_found(directory, load(directory), expected)


def test_transitive_dependency_is_reported_at_the_edge_that_leaves(tmp_path: Path) -> None:
    # Control may use the edge, and the edge may use the runtime, but control may not use the
    # runtime: a control guest using Velocity reaches every game server through it.
    directory = make_variant(
        tmp_path,
        (
            "platform.yaml",
            "    may_depend_on: []          # the control plane never depends on "
            "anything outside itself",
            "    may_depend_on: [edge]",
        ),
    )
    (directory / "ops.yaml").write_text(
        "guests:\n"
        "  ops-tool:\n"
        "    role: core\n"
        "    vmid: 120\n"
        "    host: pve-core\n"
        "    profile: control\n"
        "    network:\n"
        "      - {name: eth0, bridge: vmbr0, ip: 10.10.0.30/24, gw: 10.10.0.1, tag: 10}\n"
        "    depends_on: [velocity]\n",
        encoding="utf-8",
    )
    servers = ("lobby", "survival", "creative", "skyblock", "rlcraft")
    guests = {
        "lobby": "mc-lobby",
        "survival": "mc-survival",
        "creative": "mc-creative",
        "skyblock": "mc-skyblock",
        "rlcraft": "mc-rlcraft",
    }
    diags = load(directory)
    assert_found(
        directory,
        diags,
        [
            Expect(
                "policy-layer-dependencies",
                "game.yaml",
                f"    {s}:",
                f"control guest 'ops-tool' depends on runtime guest '{guests[s]}' through "
                f"velocity -> {guests[s]} (velocity server {s}); control guests may depend only "
                "on control, edge guests",
            )
            for s in servers
        ],
    )
    # The guest that made the mistake is pointed at too.
    depends_line = line_of(directory, "ops.yaml", "depends_on: [velocity]")
    assert all(
        d.related and d.related[0].file == "specs/ops.yaml" and d.related[0].line == depends_line
        for d in diags
    )


# --- policies that are off -------------------------------------------------------------------

OFF = [
    pytest.param(
        "  placement: {}\n",
        "  placement: {enabled: false}\n",
        (
            "game.yaml",
            "    vmid: 1000\n    host: pve-runtime",
            "    vmid: 1000\n    host: pve-core",
        ),
        id="placement",
    ),
    pytest.param(
        "  vmid_ranges: {}\n",
        "",
        ("game.yaml", "vmid: 1000", "vmid: 1500"),
        id="vmid-ranges-absent",
    ),
    pytest.param(
        "  vmid_ranges: {}\n",
        "  vmid_ranges: {enabled: false}\n",
        ("game.yaml", "vmid: 1000", "vmid: 1500"),
        id="vmid-ranges",
    ),
    pytest.param(
        "  agent_port:\n",
        "  agent_port:\n    enabled: false\n",
        ("firewall.yaml", "dport: 18888, source: api}", "dport: 18888}"),
        id="agent-port",
    ),
    pytest.param(
        "  isolation:\n",
        "  isolation:\n    enabled: false\n",
        ("platform.yaml", LAST_EXCEPTION, ""),
        id="isolation",
    ),
    pytest.param(
        "  velocity_host: {host_layer: runtime}\n",
        "  velocity_host: {host_layer: runtime, enabled: false}\n",
        (
            "edge.yaml",
            "  velocity:\n    role: network\n    vmid: 302\n    host: pve-runtime",
            "  velocity:\n    role: network\n    vmid: 302\n    host: pve-core",
        ),
        id="velocity-host",
    ),
    pytest.param(
        "  traefik_domains: {}\n",
        "  traefik_domains: {enabled: false}\n",
        ("edge.yaml", "    routes_to: [edge, runtime]", "    routes_to: [control]"),
        id="traefik-domains",
    ),
    pytest.param(
        "  layer_dependencies: {}\n",
        "  layer_dependencies: {enabled: false}\n",
        (
            "control.yaml",
            "    tags: [mariadb]\n",
            "    tags: [mariadb]\n    depends_on: [mc-lobby]\n",
        ),
        id="layer-dependencies",
    ),
]


@pytest.mark.parametrize(("old", "new", "violation"), OFF)
def test_disabled_policy_reports_nothing(
    tmp_path: Path, old: str, new: str, violation: Edit
) -> None:
    directory = make_variant(tmp_path, violation)
    assert any(d.code.startswith("policy-") for d in load(directory)), "the violation is caught"
    platform = directory / "platform.yaml"
    text = platform.read_text(encoding="utf-8")
    assert text.count(old) == 1
    platform.write_text(text.replace(old, new), encoding="utf-8")
    left = [str(d) for d in load(directory) if d.code.startswith("policy-")]
    # velocity on pve-core also breaks placement, which stays on: only the disabled one is gone.
    if violation[1].startswith("  velocity:"):
        assert all("policy-placement" in d for d in left), left
    else:
        assert left == []


# --- half-valid specs ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("edit", "code", "file", "marker", "phrase"),
    [
        (
            ("platform.yaml", "allowed_sources: [zpack-api]", "allowed_sources: [zpack-apx]"),
            "unknown-reference",
            "platform.yaml",
            "zpack-apx",
            "guest 'zpack-apx' is not defined",
        ),
        (
            ("platform.yaml", "{to: zpack-dns, port: 53,", "{to: zpack-dnz, port: 53,"),
            "unknown-reference",
            "platform.yaml",
            "zpack-dnz",
            "guest 'zpack-dnz' is not defined",
        ),
        (
            ("platform.yaml", "{to: zpack-dns, port: 53,", "{to: zpack-dns, port: fifty-three,"),
            "policy-isolation",
            "platform.yaml",
            "fifty-three",
            "exception port:",
        ),
        (
            (
                "platform.yaml",
                "velocity_host: {host_layer: runtime}",
                "velocity_host: {host_layer: runtim}",
            ),
            "unknown-reference",
            "platform.yaml",
            "runtim}",
            "layer 'runtim' is not defined",
        ),
    ],
)
def test_bad_policy_parameters_are_reported(
    tmp_path: Path, edit: Edit, code: str, file: str, marker: str, phrase: str
) -> None:
    directory = make_variant(tmp_path, edit)
    diags = load(directory)
    line = line_of(directory, file, marker)
    assert any(
        d.code == code
        and d.position is not None
        and d.position.line == line
        and phrase in d.message
        for d in diags
    ), [str(d) for d in diags]


@pytest.mark.parametrize(
    "edit",
    [
        (
            "control.yaml",
            "target: {guest: zpack-vpn, port: 51821}",
            "target: {guest: zpack-vpx, port: 51821}",
        ),
        ("game.yaml", "    role: game\n    vmid: 1000", "    role: gaem\n    vmid: 1000"),
        ("game.yaml", "    vmid: 1000\n    host: pve-runtime", "    vmid: 1000\n    host: pve-rt"),
        ("edge.yaml", "  guest: velocity\n", "  guest: velocityy\n"),
        (
            "profiles.yaml",
            'action: agent, comment: "agent port, API only"}\n        - {type: in,'
            " action: ACCEPT, proto: tcp, dport: 25565",
            'action: agnet, comment: "agent port, API only"}\n        - {type: in,'
            " action: ACCEPT, proto: tcp, dport: 25565",
        ),
        ("firewall.yaml", "source: api}", "source: apii}"),
        (
            "game.yaml",
            "    profile: game-vanilla\n    cores: 1\n",
            "    profile: game-vanilla\n    cores: one\n",
        ),
    ],
)
def test_unresolved_references_are_left_to_the_structural_checks(
    tmp_path: Path, edit: Edit
) -> None:
    directory = make_variant(tmp_path, edit)
    diags = load(directory)  # must not raise
    assert diags
    assert not any(d.code.startswith("policy-") for d in diags), [str(d) for d in diags]
