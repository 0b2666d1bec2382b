"""Connecting: API token or password, TLS verified by default, secrets never echoed."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from reconciler.cli.main import main
from reconciler.model.errors import ConfigurationError, PermanentError
from reconciler.model.spec import ProxmoxApi, SecretRef
from reconciler.providers.proxmox import ProxmoxProvider, connect
from tests.conftest import SPECS

TOKEN = "3f1c2d4a-0000-4000-8000-00000000abcd"


def test_api_token_auth_observes(
    pve: Any, fakepve_cafile: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    pve.apitokens["root@pam!reconciler"] = TOKEN
    monkeypatch.setenv("PVE_TOKEN_SECRET", TOKEN)
    api = ProxmoxApi(
        url=pve.url,
        user="root@pam",
        token_id="reconciler",
        token_secret=SecretRef(env="PVE_TOKEN_SECRET"),
        ca_file=fakepve_cafile,
    )
    pve.add_ct(1050, name="someone", node="pve-runtime")
    provider = ProxmoxProvider(client=connect(api), platform="zpack")
    seen = anyio.run(provider.observe)
    assert [(r.id["vmid"], r.owned) for r in seen] == [(1050, False)]


def test_wrong_token_is_a_permanent_error_without_the_secret(
    pve: Any, fakepve_cafile: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    pve.apitokens["root@pam!reconciler"] = TOKEN
    monkeypatch.setenv("PVE_TOKEN_SECRET", "not-the-token-value")
    api = ProxmoxApi(
        url=pve.url,
        user="root@pam",
        token_id="reconciler",
        token_secret=SecretRef(env="PVE_TOKEN_SECRET"),
        ca_file=fakepve_cafile,
    )
    provider = ProxmoxProvider(client=connect(api), platform="zpack")
    with pytest.raises(PermanentError) as info:
        anyio.run(provider.observe)
    assert "401" in str(info.value)
    assert "not-the-token-value" not in str(info.value)


def test_tls_is_verified_by_default(pve: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PW", "secret")
    api = ProxmoxApi(url=pve.url, user="root@pam", password=SecretRef(env="PW"))
    with pytest.raises(PermanentError, match=r"TLS verification failed .* ca_file"):
        connect(api)  # fakepve's certificate is self-signed: refused without its CA file


def test_missing_secret_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOPE_SECRET", raising=False)
    api = ProxmoxApi(
        url="https://127.0.0.1:1", user="root@pam", password=SecretRef(env="NOPE_SECRET")
    )
    with pytest.raises(ConfigurationError, match="NOPE_SECRET"):
        connect(api)


def test_insecure_prints_a_warning(
    pve: Any,
    pve_api: ProxmoxApi,  # the template in storage: a create without it is a plan error
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("FAKEPVE_PASSWORD", "secret")
    with pytest.warns(Warning):  # urllib3's InsecureRequestWarning, on top of ours
        code = main(
            [
                "plan",
                str(SPECS),
                "--proxmox-url",
                pve.url,
                "--proxmox-user",
                "root@pam",
                "--proxmox-password-env",
                "FAKEPVE_PASSWORD",
                "--insecure",
            ]
        )
    assert code == 0
    assert "TLS verification of the Proxmox API is OFF" in capsys.readouterr().err
