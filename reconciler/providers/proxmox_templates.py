"""Declared templates (`templates:`): the files guests are made from (container templates, ISOs,
VM images), on each node's storage. Each is a resource per node, `template/<name>/<node>`.

A provider like the backup jobs': it composes a `ProxmoxProvider` for every call (one thread
hop, one retry loop, one error translation). Registered by `applying.connecting` when the spec
declares templates; called through the provider protocol by every run.

Ownership. A file on a storage carries no mark, so what is ours is exactly what the spec
declares: the spec's file name, on the spec's storage, on the spec's nodes. Nothing else on a
storage is looked at, and nothing is ever deleted: a template that leaves the spec is left where
it is (the planner plans no delete for this kind), because nothing says the file is ours to
delete and a guest made by hand may need it. A new image is a new file name; the file, not the
url it came from, is the identity (Proxmox keeps no record of the url or the checksum).

Observe (needs the guests' cluster facts: which nodes are online, which storages are shared):
- one content listing per node and storage the spec declares templates on,
  `GET /nodes/{node}/storage/{storage}/content` (with `content=` when every template declared
  on that storage is of one content type), and one for a shared storage, whose listing holds for
  every node. A declared template found there is observed under its address; one not found is
  not observed, so the planner creates it;
- a node that is offline is not listed: its templates are observed as `listed: false`, which
  plans nothing (nothing can be created on such a node either), and the next run looks again. A
  storage the cluster facts say is missing on a node, inactive, or not taking the content is
  not listed: its templates are missing, and the download says why it cannot be made;
- a listing that fails (after the retry policy) fails the observation of this kind only (the
  provider is `optional`): the plan warns and leaves templates out.

Apply: a create is `POST /nodes/{node}/storage/{storage}/download-url` (`url`, `content`,
`filename`, `checksum`, `checksum-algorithm`), a task, awaited (`ProxmoxProvider.run_task`).
Proxmox downloads the file and verifies the checksum itself; a mismatch fails the task and
Proxmox keeps nothing: that is a TaskFailedError naming the url, the checksum expected and the
task log's line, so the guests that need the template are skipped, not created. An update or a
delete is refused: the planner never plans one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from reconciler.model.errors import PermanentError, TaskFailedError
from reconciler.model.observed import ClusterFacts, ObservedResource
from reconciler.model.plans import Action, Change
from reconciler.model.resources import Kind, template_address
from reconciler.model.spec import PlatformSpec, template_nodes
from reconciler.providers import Observation
from reconciler.providers.proxmox import ProxmoxProvider


@dataclass(frozen=True)
class TemplateFile:
    """One declared template on one node: where its file is, and what it is."""

    address: str
    node: str
    storage: str
    content: str
    filename: str

    @property
    def volid(self) -> str:
        return f"{self.storage}:{self.content}/{self.filename}"

    def attributes(self, *, listed: bool = True) -> dict[str, Any]:
        """The observed attributes: the file's identity, as the desired resource has it."""
        out: dict[str, Any] = {
            "node": self.node,
            "storage": self.storage,
            "content": self.content,
            "filename": self.filename,
            "volid": self.volid,
        }
        if not listed:
            out["listed"] = False  # its node is offline: not looked at, nothing planned
        return out


def template_files(spec: PlatformSpec) -> tuple[TemplateFile, ...]:
    """Every template the spec declares, on every node it is declared for."""
    return tuple(
        TemplateFile(
            address=template_address(name, node),
            node=node,
            storage=template.storage,
            content=template.content,
            filename=template.file,
        )
        for name, template in sorted(spec.templates.items())
        for node in template_nodes(spec, template)
    )


def download_params(want: Mapping[str, Any]) -> dict[str, Any]:
    """A template's desired attributes -> the download-url parameters (the checksum split into
    Proxmox's two: `sha256:abc...` -> checksum `abc...`, checksum-algorithm `sha256`)."""
    algorithm, _, digest = str(want["checksum"]).partition(":")
    return {
        "url": want["url"],
        "content": want["content"],
        "filename": want["filename"],
        "checksum": digest,
        "checksum-algorithm": algorithm,
    }


@dataclass
class TemplateProvider:
    """The spec's templates on the guests' endpoint; `files`: every declared template on every
    node it is declared for."""

    pve: ProxmoxProvider
    files: tuple[TemplateFile, ...] = ()
    calls_listing: int = 0

    kinds = frozenset({Kind.TEMPLATE})
    needs = frozenset({Kind.GUEST})  # the cluster's nodes and storages, seen with the guests
    streams = frozenset[Kind]()
    optional = True  # unknown templates cost only themselves: the plan warns and goes on

    # --- observe -------------------------------------------------------------------------

    async def observe(self, seen: Observation) -> list[ObservedResource]:
        async with self.pve.reading():
            return await self._observe(seen.cluster)

    async def _observe(self, cluster: ClusterFacts | None) -> list[ObservedResource]:
        by_place: dict[tuple[str, str], list[TemplateFile]] = {}
        contents: dict[str, set[str]] = {}
        for f in self.files:
            by_place.setdefault((f.node, f.storage), []).append(f)
            contents.setdefault(f.storage, set()).add(f.content)
        out: list[ObservedResource] = []
        shared: dict[str, frozenset[str]] = {}
        for (node, storage), wanted in sorted(by_place.items()):
            facts = cluster.nodes.get(node) if cluster is not None else None
            if facts is not None and not facts.online:
                out.extend(self._found(f, listed=False) for f in wanted)
                continue
            st = (facts.storages or {}).get(storage) if facts is not None else None
            if facts is not None and facts.storages is not None:
                takes = set(st.content) if st is not None and st.active else set()
                if not {f.content for f in wanted} <= takes:
                    continue  # not there to hold them: missing, the download says why
            only = contents[storage]
            content = next(iter(only)) if len(only) == 1 else None
            if st is not None and st.shared:
                if storage not in shared:
                    shared[storage] = await self.list_files(node, storage, content)
                volids = shared[storage]
            else:
                volids = await self.list_files(node, storage, content)
            out.extend(self._found(f) for f in wanted if f.volid in volids)
        return sorted(out, key=lambda r: str(r.address))

    def _found(self, f: TemplateFile, *, listed: bool = True) -> ObservedResource:
        return ObservedResource(
            address=f.address,
            kind=Kind.TEMPLATE,
            owned=True,
            id={"node": f.node},
            attributes=f.attributes(listed=listed),
        )

    async def list_files(self, node: str, storage: str, content: str | None) -> frozenset[str]:
        """The volids on a node's storage: one `GET .../storage/{storage}/content`, under the
        retry policy; `content` narrows it to one content type."""
        resource = self.pve.client.nodes(node).storage(storage).content
        query = {"content": content} if content is not None else {}
        self.calls_listing += 1
        items = await self.pve.get(f"list files on {node}/{storage}", resource, **query)
        return frozenset(str(i["volid"]) for i in items if i.get("volid"))

    # --- apply -----------------------------------------------------------------------------

    async def apply(self, change: Change) -> None:
        if change.kind is not Kind.TEMPLATE:
            raise PermanentError(f"{change.address}: no provider for kind {change.kind.value}")
        match change.action:
            case Action.CREATE:
                await self.download(change)
            case Action.NOOP:
                return
            case _:
                raise PermanentError(
                    f"{change.address}: a template is only ever downloaded, never "
                    f"{change.action.value}d by the controller"
                )

    async def download(self, change: Change) -> None:
        """Have the node download the file, Proxmox verifying its checksum; wait for it."""
        want = change.after or {}
        if not want.get("url") or not want.get("checksum"):
            raise PermanentError(
                f"{change.address}: no url and checksum to download {want.get('volid')} from"
            )
        node = str(change.id.get("node") or want["node"])
        storage = self.pve.client.nodes(node).storage(want["storage"])
        params = download_params(want)
        try:
            await self.pve.run_task(
                f"download {change.address}",
                node,
                lambda: storage("download-url").post(**params),
            )
        except TaskFailedError as exc:
            line = _mismatch(exc.log_tail) or _mismatch([str(exc)])
            if line is None:
                raise
            raise TaskFailedError(
                f"{change.address}: {want['url']} does not match its checksum: expected "
                f"{want['checksum']}; Proxmox kept nothing (task log: {line})",
                log_tail=exc.log_tail,
            ) from None


def _mismatch(lines: Iterable[str]) -> str | None:
    """The line of a task log that says the checksum did not match, if any."""
    for line in lines:
        if "checksum mismatch" in line:
            start = line.index("checksum mismatch")
            return line[start:].removesuffix("\n")
    return None
