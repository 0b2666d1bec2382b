"""The hot read path to the Proxmox API: GETs over one pooled aiohttp session (issue 16).

Called by `ProxmoxProvider.get`, and through it by every observation's reads (the inventory,
each guest's config, each guest's firewall options and rules, the IP sets and groups, the
backup listings). Everything else (writes, tasks, login) stays on proxmoxer, which this module
leans on for what it does well: the path a resource names (`client.nodes(n).lxc(v).config`),
the credentials and the ticket's renewal. Only the transport of a read changes.

Why: measured on this project's two-core machine (bench/bench_client.py, 2,000 config reads,
16 in flight, fakepve at time scale 0), the controller's own CPU per call was 1.09 ms through
proxmoxer in worker threads (requests, urllib3, a thread hand-off per call), 1.11 ms through a
bare `requests.Session` in threads, 2.03 ms through httpx's AsyncClient, and 0.23 ms through
aiohttp, whose HTTP parser is compiled. The README's Performance section has the figures.

A `FastReads` is opened per observation (`ProxmoxProvider.reading`), in the event loop that
observes, with as many keep-alive connections as the API's in-flight limit, and closed when
the observation ends, so no session outlives its loop.

Its failures are proxmoxer's, so `proxmox.classify` sees one kind of error whatever carried
the call: an HTTP error is a `ResourceException` built as proxmoxer builds it (status, reason,
PVE's `errors`); a refused or broken connection is a `ConnectionError`, no answer in time a
`TimeoutError`, a certificate that does not verify an `ssl.SSLCertVerificationError`, each
naming the URL.
"""

from __future__ import annotations

import http.client
import json
import os
import ssl
import time
import urllib.request
from collections.abc import Mapping
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import anyio
from proxmoxer import ProxmoxAPI
from proxmoxer.backends.https import ProxmoxHTTPApiTokenAuth, ProxmoxHTTPAuth
from proxmoxer.core import ResourceException


class _Headers:
    """What proxmoxer's auth writes a request's headers into (`auth(request)`)."""

    method = "GET"

    def __init__(self) -> None:
        self.headers: dict[str, str] = {}
        self.cert: Any = None


class FastReads:
    """GETs of proxmoxer resources over one aiohttp session; `async with` opens and closes it."""

    def __init__(self, auth: ProxmoxHTTPAuth | ProxmoxHTTPApiTokenAuth, connections: int) -> None:
        self.auth = auth
        self.connections = connections
        self._session: aiohttp.ClientSession | None = None
        self._renewing = anyio.Lock()
        self._proxies: dict[str, str | None] = {}  # host:port -> the proxy to it, or None

    @classmethod
    def of(cls, client: Any, connections: int) -> FastReads | None:
        """The fast path for a proxmoxer client over HTTPS; None for anything else (a test's
        stand-in, proxmoxer's ssh or local backends): those keep proxmoxer's own path."""
        if not isinstance(client, ProxmoxAPI):
            return None
        session = client._store.get("session")
        auth = getattr(session, "auth", None)
        if not isinstance(auth, ProxmoxHTTPAuth | ProxmoxHTTPApiTokenAuth):
            return None
        return cls(auth, connections)

    async def __aenter__(self) -> FastReads:
        verify = self.auth.verify_ssl
        tls: ssl.SSLContext | bool
        if verify is False:
            tls = False
        else:
            tls = ssl.create_default_context(cafile=verify if isinstance(verify, str) else None)
        connector = aiohttp.TCPConnector(
            limit=self.connections, limit_per_host=self.connections, ssl=tls
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=float(self.auth.timeout or 15)),
            headers={"Accept": "application/json"},
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    async def get(self, resource: Any, params: Mapping[str, Any]) -> Any:
        """`resource.get(**params)`, as proxmoxer answers it: the `data` of PVE's answer."""
        assert self._session is not None, "FastReads used outside `async with`"
        url = str(resource._store["base_url"])
        query = {k: _param(v) for k, v in params.items() if v is not None}
        headers = await self._credentials()
        proxy = self._proxy_for(url)
        try:
            async with self._session.get(url, params=query, headers=headers, proxy=proxy) as resp:
                body = await resp.read()
                status = resp.status
                reason = resp.reason or ""
        except aiohttp.ClientConnectorCertificateError as exc:
            raise ssl.SSLCertVerificationError(f"{url}: {exc.certificate_error}") from None
        except aiohttp.ClientConnectorError as exc:
            raise ConnectionError(f"{url}: {_why(exc.os_error)}") from None
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError) as exc:
            raise ConnectionError(f"{url}: {exc}") from None
        except TimeoutError:
            raise TimeoutError(f"{url}: no answer in {self.auth.timeout} s") from None
        if status >= 400:
            raise ResourceException(
                status, http.client.responses.get(status, ""), reason, errors=_errors(body)
            )
        return json.loads(body)["data"]

    def _proxy_for(self, url: str) -> str | None:
        """The proxy requests would use for `url` (HTTPS_PROXY, NO_PROXY), so reads and
        writes take the same way. Read from the environment once per host and session:
        aiohttp's own `trust_env` reads it (and ~/.netrc) on every request, which doubled the
        controller's CPU per call."""
        host = urlsplit(url).netloc
        if host not in self._proxies:
            proxy = urllib.request.getproxies().get("https")
            hostname = urlsplit(url).hostname or ""
            bypass = proxy is None or urllib.request.proxy_bypass(hostname)
            self._proxies[host] = None if bypass else proxy
        return self._proxies[host]

    async def _credentials(self) -> dict[str, str]:
        """The headers proxmoxer would send with a GET: the API token, or the ticket's cookie
        (renewed first, in a worker thread, when proxmoxer would renew it)."""
        auth = self.auth
        if isinstance(auth, ProxmoxHTTPApiTokenAuth):
            request = _Headers()
            auth(request)
            return request.headers
        if time.monotonic() - auth.birth_time >= auth.renew_age:
            async with self._renewing:
                if time.monotonic() - auth.birth_time >= auth.renew_age:
                    await anyio.to_thread.run_sync(auth._get_new_tokens)
        return {"Cookie": f"{auth.service}AuthCookie={auth.pve_auth_ticket}"}


def _why(error: OSError) -> str:
    """ "connection refused", not asyncio's "Connect call failed ('127.0.0.1', 8006)"."""
    if error.errno:
        return os.strerror(error.errno).lower()
    return str(error) or type(error).__name__


def _param(value: Any) -> str | int | float:
    if isinstance(value, bool):
        return int(value)
    return value if isinstance(value, int | float) else str(value)


def _errors(body: bytes) -> Any:
    """PVE's per-field `errors` of a refused request, as proxmoxer reads them."""
    try:
        return json.loads(body).get("errors")
    except (UnicodeDecodeError, ValueError, AttributeError):
        return {"errors": body}
