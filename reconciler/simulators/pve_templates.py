"""Template downloads in the fake PVE: `POST /nodes/{node}/storage/{storage}/download-url` that
verifies a checksum the way Proxmox does.

fakepve 0.5's download-url stores a file of its own `size` parameter and ignores `checksum`: it
never sees the file's bytes. `TemplateDownloadApi`, mixed into `PlatformPve`
(reconciler/simulators/pve.py), replaces that handler (fakepve routes the path to
`self._download_url`) with one that follows pve-storage `PVE/API2/Storage/Status.pm`
(download_url) and pve-common `PVE/Tools.pm` (download_file_from_url, get_file_hash):

- before any task (HTTP errors): the schema's parameters and permissions (Datastore.AllocateTemplate
  on the storage, and Sys.Audit with Sys.Modify on / or Sys.AccessNetwork on the node); the
  storage enabled on the node and active; a file-based storage ("can't upload to storage type
  'lvmthin', not a file based storage!"); configured for the content ("storage 'S' is not
  configured for content-type 'C'"); the file name normalized (normalize_content_filename: the
  last path segment, anything but letters, digits, `_.-` made `_`) and its extension the
  content's (a 400 `filename: wrong file extension`; for `import`, `filename: invalid
  filename or wrong extension`);
- a `download` task (its id the file name) whose log says `downloading URL to PATH`. An existing
  file is not downloaded again: with a checksum it is checked ("OK, got correct file already,
  no need to download", or the task fails "checksum mismatch: got 'X' != expect 'Y',
  aborting"); without one the task fails "refusing to override existing file 'PATH'";
- with a checksum, the fake downloads the URL for real (as PVE runs wget: a local HTTP server
  in a test), hashes what it got with `checksum-algorithm`, and fails the task "checksum
  mismatch: got 'X' != expect 'Y'" (the file is not kept) or logs "OK, checksum verified". A
  URL that cannot be fetched fails the task "download failed: ...", as wget's exit status
  does (4: network, 5: TLS verification, 8: an error response);
- without a checksum the fake keeps fakepve's behaviour: nothing is fetched, and the file holds
  `size` bytes (fakepve's own parameter, 1 MiB by default) of zeros. So the seeds that name
  `http://example.invalid/...` (the lab, the tests' fixtures) work as before;
- `compression` for anything but an ISO fails the task ("decompression not supported for
  vztmpl"); an ISO's is accepted and the file kept as downloaded.

The file then lives in fakepve's storage model (listed by the content routes, found by an LXC
create), with the digests of its bytes, so a later download with a checksum can check it.
Not modelled: PVE's content checks of an ISO or a disk image (assert_file_validity), proxies,
and time: a download takes no PVE seconds.
"""

from __future__ import annotations

import hashlib
import re
import ssl
from typing import Any

import aiohttp
from fakepve.model import TaskError
from fakepve.routing import die, param_error, split_list
from fakepve.storage import _is_file

from reconciler.model.spec import CHECKSUM_ALGORITHMS, TEMPLATE_EXTENSIONS

# Real seconds the fake waits for one URL to be fetched.
DOWNLOAD_TIMEOUT = 60.0
# The most bytes the fake reads from a URL: it hashes them and keeps nothing but the digests.
MAX_DOWNLOAD = 1 << 30


def normalize_filename(name: str) -> str:
    """pve-storage normalize_content_filename: the last path segment, leading and trailing
    line breaks gone, anything but letters, digits, `_`, `.` and `-` made `_`."""
    name = name.rstrip("\n")
    name = re.split(r"[/\\]", name)[-1]
    return re.sub(r"[^a-zA-Z0-9_.-]", "_", name)


def _hashers() -> dict[str, Any]:
    return {name: hashlib.new(name) for name in CHECKSUM_ALGORITHMS}


def _zeros_digests(size: int) -> dict[str, str]:
    """The digests of a file fakepve made up without bytes: `size` zero bytes."""
    hashers = _hashers()
    chunk = bytes(1 << 16)
    left = size
    while left > 0:
        piece = chunk[: min(left, len(chunk))]
        for h in hashers.values():
            h.update(piece)
        left -= len(piece)
    return {name: h.hexdigest() for name, h in hashers.items()}


class TemplateDownloadApi:
    """Mixin for FakePve: download-url with PVE's checks and checksum verification (see the
    module docstring)."""

    download_timeout = DOWNLOAD_TIMEOUT

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._dl_claimed: set[str] = set()  # download tasks whose body has started

    async def _download_url(self, request: Any) -> Any:
        from fakepve.server import USER, int_param, ok, params

        pve: Any = self
        node, sid = request.match_info["node"], request.match_info["storage"]
        user = request[USER]
        raw = await params(request)
        # `size` is fakepve's own parameter: how large a file that is not fetched pretends to be.
        size = int_param(raw, "size", 1024**2, minimum=0)
        info = pve.resolve(request, "/api2/json").methods[request.method]
        pve.check_permissions(user, info.get("permissions"), {"node": node, "storage": sid})
        p = pve._verify(request, raw, drop=("size",))
        store = pve._active_store(sid, node)
        if not _is_file(store):
            raise die(
                f"can't upload to storage type '{store.get('type')}', not a file based storage!"
            )
        content = str(p["content"])
        if content not in split_list(store.get("content")):
            raise die(f"storage '{sid}' is not configured for content-type '{content}'")
        filename = normalize_filename(str(p["filename"]))
        pattern, _says = TEMPLATE_EXTENSIONS[content]
        if not re.search(rf"[^/]{pattern}$", filename, re.IGNORECASE):
            why = "invalid filename or wrong extension" if content == "import" else None
            raise param_error(filename=why or "wrong file extension")
        volname = f"{content}/{filename}"
        dest = pve._volume_path(sid, volname, content)
        url = str(p["url"])
        algorithm = p.get("checksum-algorithm")
        expected = str(p.get("checksum") or "").lower() or None
        verify = bool(int(p.get("verify-certificates", 1)))
        compression = p.get("compression")

        async def body() -> str:
            log = self._dl_claim(node, filename)
            if compression and content != "iso":
                raise TaskError(f"decompression not supported for {content}")
            existing = pve._find_volume(sid, volname)
            if existing is not None:
                if algorithm is None:
                    raise TaskError(f"refusing to override existing file '{dest}'")
                got = self._digests_of(existing)[str(algorithm)]
                if got == expected:
                    log.append(
                        "calculating checksum of existing file...OK, got correct file already, "
                        "no need to download"
                    )
                    return ""
                log.append("calculating checksum of existing file...")
                raise TaskError(f"checksum mismatch: got '{got}' != expect '{expected}', aborting")
            if algorithm is None:
                pve.store_file(sid, filename, size, content)
                return f"download of '{url}' to '{dest}' finished"
            fetched, digests = await self._fetch(url, verify, dest, log)
            log.append("calculating checksum...")
            got = digests[str(algorithm)]
            if got != expected:
                raise TaskError(f"checksum mismatch: got '{got}' != expect '{expected}'")
            log[-1] += "OK, checksum verified"
            pve.store_file(sid, filename, fetched, content)
            pve.storages[sid]["volumes"][volname]["digests"] = digests
            return f"download of '{url}' to '{dest}' finished"

        log = [f"downloading {url} to {dest}"]
        return ok(await pve.task(node, "download", filename, user, body, log=log))

    def _dl_claim(self, node: str, filename: str) -> list[str]:
        """The log of the download task whose body starts now: the oldest running download of
        this file on the node not claimed yet (tasks start in the order they were made)."""
        pve: Any = self
        for record in pve.tasklog:
            if (record["type"], record["node"], record["id"], record["status"]) != (
                "download",
                node,
                filename,
                "running",
            ):
                continue
            if record["upid"] not in self._dl_claimed:
                self._dl_claimed.add(record["upid"])
                log: list[str] = record["log"]
                return log
        return []

    def _digests_of(self, volume: dict[str, Any]) -> dict[str, str]:
        """The digests of a file on the storage: those of the bytes it was downloaded with, or
        of the zeros a file fakepve made up holds."""
        digests = volume.get("digests")
        if digests is None:
            digests = _zeros_digests(int(volume.get("size") or 0))
            volume["digests"] = digests
        return dict(digests)

    async def _fetch(
        self, url: str, verify: bool, dest: str, log: list[str]
    ) -> tuple[int, dict[str, str]]:
        """GET the URL as wget would: (its size, the digests of its bytes), or the task's
        "download failed" with wget's exit status."""
        command = f"wget --progress=dot:giga -O {dest}.tmp {url}"
        if not verify:
            command += " --no-check-certificate"
        hashers = _hashers()
        size = 0
        timeout = aiohttp.ClientTimeout(total=self.download_timeout)
        ssl_mode: ssl.SSLContext | bool = ssl.create_default_context() if verify else False
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.get(url, ssl=ssl_mode) as response,
            ):
                log.append(f"HTTP request sent, awaiting response... {response.status}")
                if response.status >= 400:
                    log.append(f"ERROR {response.status}: {response.reason}.")
                    raise TaskError(f"download failed: command '{command}' failed: exit code 8")
                async for chunk in response.content.iter_chunked(1 << 16):
                    size += len(chunk)
                    if size > MAX_DOWNLOAD:
                        raise TaskError(
                            f"download failed: the fake reads at most {MAX_DOWNLOAD} bytes"
                        )
                    for h in hashers.values():
                        h.update(chunk)
        except aiohttp.ClientSSLError as exc:
            log.append(f"ERROR: cannot verify the certificate: {exc}")
            raise TaskError(f"download failed: command '{command}' failed: exit code 5") from None
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            log.append(f"failed: {exc or type(exc).__name__}.")
            raise TaskError(f"download failed: command '{command}' failed: exit code 4") from None
        log.append(f"Length: {size}")
        return size, {name: h.hexdigest() for name, h in hashers.items()}
