"""`reconciler check [DIR]`: does the Proxmox token (or user) the controller connects as hold
every privilege the spec needs? Run it before a first apply, and after changing its role.

    reconciler check [DIR] [--proxmox-* flags]

It connects with the spec's credentials (or the flags'), reads what the token holds on each
path the spec's features need (`reconciler.providers.proxmox_access`) and prints what is
missing, by feature: exit 0 when nothing is, 1 otherwise or when it cannot ask. It changes
nothing. `reconciler.cli.main` registers it with `add_check_parser`; what the check runs with
(the Proxmox client, the privileges' table) is imported when it runs, not for every command.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING, TextIO

from reconciler.cli import render
from reconciler.cli.live import (
    color_arg,
    connection_override,
    on_specs,
    run_async,
    spec_dir_args,
    warn_insecure,
)
from reconciler.model.resources import DesiredGraph

if TYPE_CHECKING:
    from reconciler.model.spec import PlatformSpec, ProxmoxApi
    from reconciler.providers.proxmox_access import Need

EXIT_OK, EXIT_ERROR = 0, 1
_SHOWN_PATHS = 3


def add_check_parser(
    sub: argparse._SubParsersAction,  # type: ignore[type-arg]
    add_connection_args: Callable[[argparse.ArgumentParser], None],
) -> None:
    c = sub.add_parser(
        "check",
        help="check that the Proxmox token holds the privileges the spec needs; exit 0 when so",
    )
    spec_dir_args(c)
    color_arg(c)
    add_connection_args(c)
    c.set_defaults(func=cmd_check)


def identity(api: ProxmoxApi) -> str:
    """Who the controller connects as: `user@realm!token`, or the user."""
    return f"{api.user}!{api.token_id}" if api.token_id is not None else api.user


def render_missing(lacking: list[Need]) -> list[str]:
    """One line per feature, privilege and purpose, with the paths it is missing on."""
    groups: dict[tuple[str, tuple[str, ...], str], list[str]] = {}
    for need in lacking:
        paths = groups.setdefault((need.feature, need.privileges, need.why), [])
        if need.path not in paths:
            paths.append(need.path)
    lines = []
    for (feature, privileges, why), paths in groups.items():
        if not privileges:
            lines.append(f"  {feature}: {why}: only root@pam may set them (no role grants it)")
            continue
        shown = ", ".join(paths[:_SHOWN_PATHS])
        if len(paths) > _SHOWN_PATHS:
            shown += f" and {len(paths) - _SHOWN_PATHS} more"
        lines.append(f"  {feature}: {' or '.join(privileges)} on {shown}: {why}")
    return lines


@on_specs
def cmd_check(
    args: argparse.Namespace, spec: PlatformSpec, _: DesiredGraph, out: TextIO, err: TextIO
) -> int:
    from reconciler.applying.connecting import close_client, proxmox_endpoint, proxmox_provider
    from reconciler.providers.proxmox_access import missing, needed_privileges, read_privileges

    needs = needed_privileges(spec)
    api = proxmox_endpoint(spec, connection_override(args))
    warn_insecure(args, err)
    provider = proxmox_provider(
        spec, api, insecure=args.insecure, max_concurrency=args.proxmox_max_concurrency
    )
    try:
        held = run_async(lambda: read_privileges(provider, {n.path for n in needs}))
    finally:
        close_client(provider.client)
    who = identity(api)
    lacking = missing(needs, held, root=api.user == "root@pam" and api.token_id is None)
    if not lacking:
        out.write(
            f"{who} at {api.url} holds every privilege the spec needs "
            f"({len(needs)} on {render.plural(len(held), 'path')})\n"
        )
        return EXIT_OK
    color = render.use_color(args.color, out)
    lacks = (
        f"{who} at {api.url} lacks {len(lacking)} of the {render.plural(len(needs), 'privilege')}"
    )
    out.write(render.bold(f"{lacks} needed:", color) + "\n")
    for line in render_missing(lacking):
        out.write(line + "\n")
    out.write("Grant them (the README's role for the controller lists them), then check again.\n")
    return EXIT_ERROR
