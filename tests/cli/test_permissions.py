"""Least-privilege API tokens against fakepve (which checks PVE's privileges once one is
granted): a permanent error ends a command with one line, naming the call, the status and the
privilege missing, and the service reports the same line in /status; `reconciler check` says
what a token lacks before a first apply, and what it asks for is enough to apply."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from reconciler.cli.main import main
from reconciler.controller.sources import DirectorySource
from reconciler.loading.loader import load_directory
from reconciler.model.spec import PlatformSpec, ProxmoxApi, SecretRef
from reconciler.providers.proxmox_access import Need, needed_privileges
from tests.conftest import SPECS
from tests.controller.test_service import Running, run_service
from tests.fakepve_fixtures import mutating_calls

USER, TOKEN, SECRET_ENV = "reconciler@pve", "controller", "RECONCILER_TEST_TOKEN"
TOKEN_ID = f"{USER}!{TOKEN}"
NO_SYS_AUDIT = "403 Permission check failed (/, Sys.Audit): the token needs Sys.Audit on /"


def example() -> PlatformSpec:
    loaded = load_directory(SPECS)
    assert loaded.spec is not None
    return loaded.spec


def make_token(
    pve: Any,
    monkeypatch: pytest.MonkeyPatch,
    needs: Iterable[Need],
    leave_out: Iterable[tuple[str, str]] = (),
) -> None:
    """The token `reconciler@pve!controller`, granted the first privilege of each need on its
    path, less the (path, privilege) pairs left out. SDN.Use on a VLAN's path is granted on
    its bridge, as the README says: PVE checks the VLAN's path, which inherits the bridge's;
    fakepve checks the bridge's."""
    pve.apitokens[TOKEN_ID] = "0f4d-token-secret"
    monkeypatch.setenv(SECRET_ENV, "0f4d-token-secret")
    skip = set(leave_out)
    for need in needs:
        if need.privileges and (need.path, need.privileges[0]) not in skip:
            path = need.path
            if path.startswith("/sdn/zones/"):
                path = "/".join(path.split("/")[:5])
            pve.grant(TOKEN_ID, path, need.privileges[0])


def token_flags(api: ProxmoxApi) -> list[str]:
    assert api.ca_file is not None
    return [
        *("--proxmox-url", api.url, "--proxmox-user", USER, "--proxmox-token-id", TOKEN),
        *("--proxmox-token-env", SECRET_ENV, "--ca-file", api.ca_file, "--no-edge"),
    ]


def root_flags(api: ProxmoxApi) -> list[str]:
    assert api.ca_file is not None
    return [
        *("--proxmox-url", api.url, "--proxmox-user", "root@pam"),
        *("--proxmox-password-env", "FAKEPVE_PASSWORD"),
        *("--ca-file", api.ca_file, "--no-edge"),
    ]


def test_plan_with_a_token_without_sys_audit_ends_with_one_line(
    pve_api: ProxmoxApi, pve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_token(pve, monkeypatch, needed_privileges(example()), [("/", "Sys.Audit")])
    # A process of its own, as an operator runs it: its exit code and all it prints.
    done = subprocess.run(
        [sys.executable, "-m", "reconciler.cli.main", "plan", str(SPECS), *token_flags(pve_api)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stderr
    printed = done.stdout + done.stderr
    assert "Traceback" not in printed and "ExceptionGroup" not in printed
    lines = printed.strip().splitlines()
    assert len(lines) == 1, printed
    # The call (a read of the cluster firewall, or the HA resources' list: all refused alike
    # for want of Sys.Audit on /), the status, the need.
    assert lines[0].startswith(("error: read ", "error: list HA resources")), lines
    assert lines[0].endswith(NO_SYS_AUDIT), lines
    assert mutating_calls(pve) == []


def test_the_service_reports_the_same_line_in_status(
    pve_api: ProxmoxApi, pve: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    make_token(pve, monkeypatch, needed_privileges(example()), [("/", "Sys.Audit")])
    api = ProxmoxApi(
        url=pve_api.url,
        user=USER,
        token_id=TOKEN,
        token_secret=SecretRef(env=SECRET_ENV),
        ca_file=pve_api.ca_file,
    )

    async def body(svc: Running) -> None:
        status = await svc.until(lambda s: (s["last_cycle"] or {}).get("kind") == "full")
        assert status["last_cycle"]["outcome"] == "errored"
        for error in (status["last_cycle"]["error"], status["observe"]["error"]):
            assert error.startswith(("read ", "list HA resources")), error
            assert error.endswith(NO_SYS_AUDIT), error
        assert not status["ready"]["ready"]

    run_service(DirectorySource(SPECS), api, tmp_path, body)
    assert mutating_calls(pve) == []


def test_check_lists_what_a_limited_token_lacks(
    pve_api: ProxmoxApi, pve: Any, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    # Guests whose vmid is still to be allocated need it on /vms (which mc-lobby inherits).
    lacking = [("/", "Sys.Audit"), ("/vms", "VM.Migrate"), ("/vms/1000", "VM.Migrate")]
    make_token(pve, monkeypatch, needed_privileges(example()), lacking)
    assert main(["check", str(SPECS), *token_flags(pve_api)]) == 1
    out = capsys.readouterr().out
    assert out.splitlines()[1:] == [
        "  guests: guest/dev-alice: feature flags keyctl: only root@pam may set them "
        "(no role grants it)",
        "  guests: guest/dev-bob: feature flags keyctl: only root@pam may set them "
        "(no role grants it)",
        "  firewall: Sys.Audit on /: read the cluster firewall (always observed)",
        "  migration: VM.Migrate on /vms, /vms/1000: move a guest whose host changes",
        "  backups: Sys.Audit on /: read backup jobs",
        "Grant them (the README's role for the controller lists them), then check again.",
    ]
    assert out.startswith(f"{TOKEN_ID} at {pve_api.url} lacks 6 of the ")
    assert mutating_calls(pve) == []


def test_check_passes_for_root(
    pve_api: ProxmoxApi, pve: Any, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    make_token(pve, monkeypatch, [Need("guests", "/vms", ("VM.Audit",), "")])  # ACLs in force
    assert main(["check", str(SPECS), *root_flags(pve_api)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"root@pam at {pve_api.url} holds every privilege the spec needs")
    assert mutating_calls(pve) == []


def test_what_check_asks_for_is_enough_to_apply(
    pve_api: ProxmoxApi,
    pve: Any,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: Any,
) -> None:
    # Without the flag only root@pam may set, so that a token can hold all the spec needs.
    specs = tmp_path / "specs"
    specs.mkdir()
    for src in SPECS.glob("*.yaml"):
        text = src.read_text(encoding="utf-8")
        (specs / src.name).write_text(text.replace("keyctl: true", "keyctl: false"))
    loaded = load_directory(specs)
    assert loaded.spec is not None
    make_token(pve, monkeypatch, needed_privileges(loaded.spec))
    assert main(["check", str(specs), *token_flags(pve_api)]) == 0
    assert "holds every privilege the spec needs" in capsys.readouterr().out
    apply = ["apply", str(specs), "--auto-approve", "--color", "never", *token_flags(pve_api)]
    assert main(apply) == 0
    assert "Apply: 53 done, 0 failed, 0 skipped." in capsys.readouterr().out
    assert main(["plan", str(specs), "--detailed-exitcode", *token_flags(pve_api)]) == 0


def test_check_asks_for_what_clones_cloud_init_the_agent_pools_and_ha_need() -> None:
    """Each as the PVE 9 schema checks its call: clone (`VM.Clone` on the template), cloud-init,
    the agent's reads, a pool's members, HA resources."""
    from tests.providers.vm_provisioning import GUESTS, TEMPLATE_VMID, load

    spec, _ = load(
        "pools: {mgmt: {comment: management}}\n" + GUESTS,
        ("    agent: true\n", "    agent: true\n    pool: mgmt\n    ha: {state: started}\n"),
    )
    needs = {(n.feature, n.path, n.privileges) for n in needed_privileges(spec)}
    assert ("guests", f"/vms/{TEMPLATE_VMID}", ("VM.Clone",)) in needs
    assert ("guests", "/vms", ("VM.Config.Cloudinit",)) in needs  # its vmid is allocated
    assert ("guests", "/vms", ("VM.GuestAgent.Audit", "VM.Monitor")) in needs
    assert ("pools", "/pool/mgmt", ("Pool.Allocate",)) in needs
    assert ("pools", "/pool/mgmt", ("Pool.Audit",)) in needs  # else GET /pools hides it
    assert ("HA", "/", ("Sys.Console",)) in needs
