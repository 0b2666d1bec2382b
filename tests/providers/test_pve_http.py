"""The hot read path (reconciler.providers.pve_http) against fakepve: what proxmoxer answers, it
answers; PVE's refusals come back as proxmoxer's errors, so `classify` sees one kind; the
ticket is renewed when proxmoxer would renew it; outside `reading()` nothing changes."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from proxmoxer import ProxmoxAPI

from reconciler.model.errors import NotFoundError, PermanentError, TemporaryError
from reconciler.model.spec import ProxmoxApi, SecretRef
from reconciler.providers.proxmox import ProxmoxProvider, RetryPolicy, connect
from reconciler.providers.pve_http import FastReads

TOKEN = "0b5e1c1e-6b8a-4c55-9a7e-3f6f0f3b1a11"


@pytest.fixture
def guests(pve: Any, pve_api: ProxmoxApi) -> ProxmoxProvider:
    pve.add_ct(1001, name="mc-lobby", node="pve-runtime", config={"tags": "reconciler"})
    return ProxmoxProvider(
        client=connect(pve_api), platform="test", retry=RetryPolicy(initial=0.0, maximum=0.0)
    )


def read_both(pve: ProxmoxProvider, resource: Any, **params: Any) -> tuple[Any, Any, bool]:
    """The same read through proxmoxer and through the session; whether the session served it."""

    async def run() -> tuple[Any, Any, bool]:
        slow = await pve.get("read", resource, **params)
        async with pve.reading():
            served = pve._fast is not None
            fast = await pve.get("read", resource, **params)
        return slow, fast, served

    return anyio.run(run)


def test_a_read_answers_as_proxmoxer_does(guests: ProxmoxProvider) -> None:
    client = guests.client
    for resource, params in (
        (client.cluster.resources, {}),
        (client.cluster.resources, {"type": "vm"}),
        (client.nodes("pve-runtime").lxc(1001).config, {}),
        (client.nodes("pve-core").storage("local").content, {"content": "vztmpl"}),
    ):
        slow, fast, served = read_both(guests, resource, **params)
        assert served
        assert fast == slow
    assert guests._fast is None  # closed with the last reader


def test_refusals_are_proxmoxers_errors_classified_alike(guests: ProxmoxProvider, pve: Any) -> None:
    async def read(resource: Any) -> Exception:
        async with guests.reading():
            with pytest.raises(Exception) as caught:
                await guests.get("read", resource)
            return caught.value

    error = anyio.run(read, guests.client.nodes("pve-runtime").lxc(4242).config)
    assert isinstance(error, NotFoundError)
    assert "4242" in str(error)

    # One unknown 500 on a read: temporary, retried within the policy, then answered.
    pve.fail("GET", "/cluster/resources", status=500, message="pmxcfs not ready", times=1)
    items = anyio.run(read_once, guests)
    assert any(i.get("vmid") == 1001 for i in items)
    assert guests.retries == 1

    denied = "Permission check failed (/, Sys.Audit)"
    pve.fail("GET", "/cluster/resources", status=403, message=denied, times=1)
    error = anyio.run(read, guests.client.cluster.resources)
    assert type(error) is PermanentError
    assert "the token needs Sys.Audit on /" in str(error)


async def read_once(pve: ProxmoxProvider) -> Any:
    async with pve.reading():
        return await pve.get("read inventory", pve.client.cluster.resources)


def test_an_old_ticket_is_renewed_before_the_read(guests: ProxmoxProvider, pve: Any) -> None:
    auth = guests.client._store["session"].auth
    auth.birth_time -= auth.renew_age + 1  # as old as proxmoxer renews at
    old = auth.birth_time

    def logins() -> int:
        return sum(1 for _, path, _ in pve.requests if path.endswith("/access/ticket"))

    before = logins()
    items = anyio.run(read_once, guests)
    assert any(i.get("vmid") == 1001 for i in items)
    assert logins() == before + 1  # renewed once, then read with the new ticket
    assert auth.birth_time > old + auth.renew_age


def test_a_token_reads_with_its_header(
    pve: Any, pve_api: ProxmoxApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    pve.apitokens["root@pam!reconciler"] = TOKEN
    monkeypatch.setenv("PVE_TOKEN_SECRET", TOKEN)
    api = pve_api.model_copy(
        update={
            "password": None,
            "token_id": "reconciler",
            "token_secret": SecretRef(env="PVE_TOKEN_SECRET"),
        }
    )
    pve.add_ct(1001, name="mc-lobby", node="pve-runtime")
    items = anyio.run(read_once, ProxmoxProvider(client=connect(api), platform="test"))
    assert [i["vmid"] for i in items if i.get("type") == "lxc"] == [1001]


def test_a_stand_in_client_keeps_proxmoxers_path() -> None:
    """A test's stand-in (or proxmoxer's ssh backend) has no HTTPS session to share."""
    assert FastReads.of(object(), 16) is None


def test_nothing_listening_is_a_temporary_error_naming_the_host() -> None:
    client = ProxmoxAPI(
        "127.0.0.1", port=1, user="root@pam", token_name="t", token_value="x", verify_ssl=False
    )
    guests = ProxmoxProvider(client=client, platform="test", retry=RetryPolicy(attempts=1))

    async def run() -> Exception:
        async with guests.reading():
            assert guests._fast is not None
            with pytest.raises(TemporaryError) as caught:
                await guests.get("read inventory", client.cluster.resources)
            return caught.value

    error = anyio.run(run)
    assert "127.0.0.1:1" in str(error)
    assert "connection refused" in str(error)


def test_reads_take_the_proxy_requests_would_take(
    guests: ProxmoxProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HTTPS_PROXY and NO_PROXY apply to reads as requests applies them to writes."""
    for name in ("https_proxy", "HTTPS_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:1")  # nothing listens there
    guests.retry = RetryPolicy(attempts=1)
    with pytest.raises(TemporaryError, match="connection refused"):
        anyio.run(read_once, guests)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    assert any(i.get("vmid") == 1001 for i in anyio.run(read_once, guests))
