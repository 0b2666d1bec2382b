"""Declared templates (`templates:`): which nodes need each one, which guests use them, and the
checks on them. `loading.graph` builds one `template/<name>/<node>` resource per node from
`template_nodes` and makes a guest depend on the copy on its own node (`guest_templates`);
`loading.checks` runs `check_templates` with the other structural checks.

A guest uses a declared template when its `template` (a container's `ostemplate` volume) is the
template's volume, `STORAGE:CONTENT/FILE`. The template is then downloaded in an earlier wave
than the guest, and a guest on a host the template is not declared for is an error here: the
file would never be put where the guest needs it.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from functools import partial

from reconciler.loading.sources import PathT, Source, spec_error
from reconciler.model.diagnostics import Diagnostic
from reconciler.model.resources import template_address
from reconciler.model.spec import GuestSpec, PlatformSpec, template_nodes

# Errors at a spec value's key, as these checks name it.
_error = partial(spec_error, key=True)


def declared_template(spec: PlatformSpec, guest: GuestSpec) -> str | None:
    """The name of the declared template a guest is created from, if any."""
    if guest.kind != "lxc" or not guest.template:
        return None
    for name, template in sorted(spec.templates.items()):
        if template.volid == guest.template:
            return name
    return None


def guest_templates(spec: PlatformSpec, guest: GuestSpec) -> tuple[str, ...]:
    """The addresses of the declared templates a guest needs first: its own node's copy."""
    name = declared_template(spec, guest)
    if name is None or guest.host not in spec.hosts:
        return ()
    node = spec.node_of(guest.host)
    if node not in template_nodes(spec, spec.templates[name]):
        return ()  # reported by check_templates
    return (template_address(name, node),)


def check_templates(spec: PlatformSpec, source: Source) -> Iterator[Diagnostic]:
    """A template's hosts exist; no two templates are the same file on one node; a guest made
    from a declared template is on a host the template is declared for. A template without a
    url (as `import` writes them, or a file uploaded by hand) is no mistake: it is checked for
    on its hosts and never downloaded, and only a host without it is a plan warning."""
    files: dict[tuple[str, str], str] = {}
    for name, template in sorted(spec.templates.items()):
        at: PathT = ("templates", name)
        if template.hosts != "all":
            for i, host in enumerate(template.hosts):
                if host not in spec.hosts:
                    yield _error(
                        source,
                        "unknown-reference",
                        f"host {host!r} is not defined{_close(host, list(spec.hosts))}",
                        (*at, "hosts", i),
                    )
        for node in template_nodes(spec, template):
            other = files.setdefault((template.volid, node), name)
            if other != name:
                yield _error(
                    source,
                    "template-duplicate",
                    f"templates {other!r} and {name!r} are both {template.volid} on node "
                    f"{node}: one file, declared once",
                    at,
                    related=("templates", other),
                )
                break
    for gname, guest in sorted(spec.guests.items()):
        tname = declared_template(spec, guest)
        if tname is None or guest.host not in spec.hosts:
            continue
        template = spec.templates[tname]
        if spec.node_of(guest.host) not in template_nodes(spec, template):
            yield _error(
                source,
                "template-host",
                f"guest {gname!r} is made from template {tname!r} ({template.volid}), which is "
                f"not declared for its host {guest.host!r}: add the host to "
                f"templates.{tname}.hosts",
                ("guests", gname, "template"),
                related=("templates", tname, "hosts"),
            )


def _close(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""
