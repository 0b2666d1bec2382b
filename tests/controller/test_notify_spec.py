"""The `notifications:` section as `reconciler validate` reads it: secrets in a target's URL
only as references (a literal one is an error at its line that never repeats it), PVE's
endpoint and matcher names in one namespace of config ids, and the README's example valid.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from reconciler.loading.graph import build_graph
from reconciler.loading.loader import load_texts
from reconciler.model.diagnostics import Diagnostic
from tests.conftest import ROOT

PLATFORM = "platform: {name: zpack}\n"


def diagnose(text: str) -> list[Diagnostic]:
    return load_texts({"platform.yaml": PLATFORM, "notify.yaml": text}).diagnostics


def target(url: str) -> str:
    return f"notifications:\n  targets:\n    ops:\n      url: '{url}'\n"


@pytest.mark.parametrize(
    ("url", "secret"),
    [
        ("mailtos://alerts:hunter2-pw@mail.zpack.dev?to=a@zpack.dev", "hunter2-pw"),
        ("ntfys://ntfy.zpack.dev/ops?token=tk_abcdef123", "tk_abcdef123"),
        ("json://hooks.zpack.dev/x?-Authorization=Bearer%20s3cr3tvalue", "s3cr3tvalue"),
        ("discord://1234567890/AbCdEf1234567890GhIjKl", "AbCdEf1234567890GhIjKl"),
        ("ntfys://tk_AbCdEf123456@ntfy.sh/ops", "tk_AbCdEf123456"),
        ("gotify://gotify.zpack.dev/AFW5wZzHKqm4CDM", "AFW5wZzHKqm4CDM"),
    ],
)
def test_a_literal_secret_in_a_url_is_an_error_at_its_line_never_repeated(
    url: str, secret: str
) -> None:
    found = diagnose(target(url))
    [d] = [d for d in found if d.code == "literal-secret"]
    assert d.position is not None and (d.position.file, d.position.line) == ("notify.yaml", 4)
    assert d.path == "notifications.targets.ops.url"
    assert all(secret not in str(x) for x in found)


@pytest.mark.parametrize(
    "url",
    [
        "mailtos://alerts:{env:SMTP_PASSWORD}@mail.zpack.dev?to=a@zpack.dev",
        "ntfys://{env:NTFY_TOKEN}@ntfy.zpack.dev/zpack-ops",
        "ntfys://ntfy.zpack.dev/ops?token={file:/run/secrets/ntfy}",
        "discord://1234567890/{env:DISCORD_TOKEN}",
        "json://hooks.zpack.dev/x?-Authorization=Bearer%20{env:HOOK}",
        "ntfys://ntfy.sh/zpack-ops-2026",
    ],
)
def test_references_and_plain_urls_are_accepted(url: str) -> None:
    assert diagnose(target(url)) == []


def test_a_malformed_reference_is_refused_without_showing_it() -> None:
    [d] = diagnose(target("ntfys://{env:9lives}@ntfy.sh/x"))
    assert "malformed" in d.message and "9lives" not in d.message
    [d] = diagnose(target("ntfy.sh/topic"))
    assert "Apprise URL" in d.message


def test_pve_names_share_one_namespace_and_a_webhook_names_its_own_secrets() -> None:
    text = """notifications:
  proxmox:
    endpoints:
      ops: {type: sendmail, mailto: [ops@zpack.dev]}
      mail-to-root: {type: sendmail, mailto_user: [root@pam]}
      hook:
        type: webhook
        url: https://hooks.zpack.dev/pve
        body: "{{ secrets.tok }} {{ secrets.missing }}"
        secrets: {tok: {env: HOOK}}
    matchers:
      ops: {targets: [hook]}
      all: {targets: [hook, all]}
"""
    said = {(d.code, d.path, d.position.line if d.position else 0) for d in diagnose(text)}
    assert said == {
        ("duplicate-name", "notifications.proxmox.matchers.ops", 12),
        ("notification-builtin", "notifications.proxmox.endpoints.mail-to-root", 5),
        ("unknown-reference", "notifications.proxmox.endpoints.hook.body", 9),
        ("unknown-reference", "notifications.proxmox.matchers.all.targets[1]", 13),
    }


def test_a_mail_endpoint_needs_a_recipient_and_a_matcher_a_target() -> None:
    text = """notifications:
  proxmox:
    endpoints:
      nobody: {type: sendmail}
    matchers:
      nowhere: {severities: [error]}
"""
    said = {(d.path, d.position.line if d.position else 0) for d in diagnose(text)}
    assert said == {
        ("notifications.proxmox.endpoints.nobody", 4),
        ("notifications.proxmox.matchers.nowhere", 6),  # missing: targets
    }


def test_the_readme_example_validates_and_builds() -> None:
    readme = (Path(ROOT) / "README.md").read_text()
    section = readme[readme.index("## Notifications") :]
    example = re.search(r"```yaml\n(notifications:.*?)```", section, re.S)
    assert example is not None
    loaded = load_texts({"platform.yaml": PLATFORM, "notify.yaml": example.group(1)})
    assert loaded.ok and loaded.spec is not None, [str(d) for d in loaded.diagnostics]
    graph = build_graph(loaded.spec, loaded.source)
    assert sorted(graph.resources) == [
        "notification/endpoint/ops-mail",
        "notification/endpoint/ops-ntfy",
        "notification/matcher/ops-errors",
    ]
