"""A secret written where it does not belong is reported, never repeated.

`validate` runs in CI, which posts its output on the pull request; the service puts the same
diagnostics in /status and its log. A malformed secret reference (`{MySecret}`, a reference with
an extra key), a literal secret, a password in a URL: each is an error at its line whose text,
in every output format, holds nothing of the secret. (The service's side is in
tests/controller/test_hostile_revisions.py.)
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from reconciler.cli.main import main
from reconciler.loading.loader import load_directory
from tests.conftest import SPECS

SECRET = "hunter2xyzzy"
REFERENCE = "token_secret: {env: PVE_TOKEN_SECRET}"
URL = "url: https://pve.zpack.lan:8006"


def replace_in(specs: Path, file: str, old: str, new: str) -> int:
    """Replace `old` by `new` in specs/<file>; the 1-based line it is on."""
    path = specs / file
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, 1))
    return text[: text.index(old)].count("\n") + 1


CASES = {
    "reference-that-is-the-secret": (REFERENCE, f"token_secret: {{{SECRET}}}"),
    "reference-with-the-value-beside": (REFERENCE, f"token_secret: {{env: X, value: {SECRET}}}"),
    "reference-with-the-value-instead": (REFERENCE, f"token_secret: {{value: {SECRET}}}"),
    "literal-secret": (REFERENCE, f"token_secret: {SECRET}"),
    "literal-secret-quoted": (REFERENCE, f'token_secret: "{SECRET}"'),
    "secret-in-a-list": (REFERENCE, f"token_secret: [{SECRET}]"),
    "secret-as-a-variable-list": (REFERENCE, f"token_secret: {{env: [{SECRET}]}}"),
    "secret-as-a-file-mapping": (REFERENCE, f"token_secret: {{file: {{{SECRET}: 1}}}}"),
    "secret-as-a-number": (REFERENCE, "token_secret: {env: X, pin: 73310571}"),
    "password-in-the-url": (URL, f"url: https://root:{SECRET}@pve.zpack.lan:8006"),
    "password-in-a-url-without-scheme": (URL, f"url: root:{SECRET}@pve.zpack.lan:8006"),
    "password-in-a-url-without-scheme-quoted": (URL, f'url: "root:{SECRET}@pve.zpack.lan"'),
}


@pytest.mark.parametrize(("old", "new"), [pytest.param(*v, id=k) for k, v in CASES.items()])
def test_a_misplaced_secret_is_reported_at_its_line_and_never_shown(
    old: str, new: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    specs = tmp_path / "specs"
    shutil.copytree(SPECS, specs)
    line = replace_in(specs, "platform.yaml", old, new)
    secrets = (SECRET, "73310571")

    outputs = {}
    for fmt in ("text", "json", "github"):
        code = main(["validate", str(specs), "--format", fmt, "--color", "never"])
        captured = capsys.readouterr()
        outputs[fmt] = captured.out + captured.err
        assert code == 1, outputs[fmt]
    result = load_directory(specs, display="specs")

    for fmt, output in outputs.items():
        for secret in secrets:
            assert secret not in output, f"{fmt} output shows the secret:\n{output}"
    assert f"platform.yaml:{line}:" in outputs["text"], outputs["text"]
    for d in result.diagnostics:
        assert all(s not in d.message and s not in d.path for s in secrets), d
        assert all(s not in str(d.to_json()) for s in secrets), d


def test_a_reference_is_still_helped_when_its_key_is_misspelled(tmp_path: Path) -> None:
    """The key is not named (it may be the secret), but the way to write it is."""
    specs = tmp_path / "specs"
    shutil.copytree(SPECS, specs)
    replace_in(specs, "platform.yaml", REFERENCE, "token_secret: {evn: PVE_TOKEN_SECRET}")
    result = load_directory(specs, display="specs")
    [d] = result.diagnostics
    assert d.code == "unknown-field"
    assert "{env: VARIABLE} or {file: /path}" in d.message
    assert d.path == "proxmox.token_secret"


def test_a_url_with_userinfo_elsewhere_is_masked_in_any_message(tmp_path: Path) -> None:
    """A check that repeats a URL (here the model's own "must start with https://")."""
    specs = tmp_path / "specs"
    shutil.copytree(SPECS, specs)
    replace_in(specs, "platform.yaml", URL, f"url: ftp://admin:{SECRET}@pve.zpack.lan")
    result = load_directory(specs, display="specs")
    text = "\n".join(str(d) for d in result.diagnostics)
    assert SECRET not in text and "admin" not in text
    assert "pve.zpack.lan" in text  # the rest of the URL still says which one
