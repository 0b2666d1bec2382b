"""The template a guest to be created by cloning (`clone.from`) is cloned from, found in the
observed cluster, or the error that keeps the guest from being planned.

Called by `planning.planner` for each guest it would create with a `clone`. A template is a
foreign guest with Proxmox's `template` flag, named by its vmid or by its name; the planner
writes the one it found into the create's `after` (`clone.vmid`, `clone.node`), which the plan
shows (`+ guest/x (clone of 9000)`). The provider finds it again when it applies (a saved plan
is a request, never an authority), so nothing here is trusted later.

Checked only when the guests were observed live (the observed state carries the cluster, as
for `planning.placement`): an offline plan from a snapshot without it names the template as
the spec does, unchecked.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from reconciler.model.diagnostics import Diagnostic, error
from reconciler.model.observed import ObservedResource, ObservedState
from reconciler.model.resources import Kind, Resource


def _is_template(r: ObservedResource) -> bool:
    return not r.owned and r.attributes.get("template") is True


def _named(r: ObservedResource) -> str:
    return f"{r.attributes.get('name')!r} (vmid {r.id.get('vmid')} on {r.id.get('node')})"


def clone_source(
    res: Resource, desired: Mapping[str, Any], observed: ObservedState
) -> tuple[dict[str, Any] | None, Diagnostic | None]:
    """(the desired `clone` with the template's `vmid` and `node`, None) when it is found;
    (None, an error) when it is missing, not a template, ambiguous or of the other kind;
    (None, None) when nothing was observed to look in."""
    clone = desired.get("clone")
    if not clone or observed.cluster is None:
        return None, None
    if observed.kinds is not None and Kind.GUEST not in observed.kinds:
        return None, None
    source = clone["from"]
    guests = [r for r in observed.resources if r.kind is Kind.GUEST]
    if isinstance(source, int):
        found = [r for r in guests if r.id.get("vmid") == source]
        what = f"vmid {source}"
    else:
        found = [r for r in guests if r.attributes.get("name") == source]
        what = f"name {source!r}"
    templates = [r for r in found if _is_template(r)]

    def problem(code: str, message: str) -> tuple[None, Diagnostic]:
        return None, error(
            code,
            f"{res.address}: clone.from {source}: {message}; it is not created",
            position=res.position,
            address=res.address,
        )

    if not templates:
        if found:
            return problem(
                "clone-not-template",
                f"{_named(found[0])} is not a template (convert it in Proxmox: "
                "qm template VMID / pct template VMID, or name a template)",
            )
        return problem("clone-source-missing", f"no guest with {what} in the cluster")
    if len(templates) > 1:
        return problem(
            "clone-source-ambiguous",
            f"{len(templates)} templates have that name: "
            + ", ".join(_named(t) for t in templates)
            + "; name it by its vmid",
        )
    template = templates[0]
    kind = desired.get("type", "lxc")
    if template.attributes.get("type") not in (None, kind):
        return problem(
            "clone-kind",
            f"{_named(template)} is a {template.attributes.get('type')} template, and this "
            f"guest is kind {kind}",
        )
    return {**clone, "vmid": template.id.get("vmid"), "node": template.id.get("node")}, None
