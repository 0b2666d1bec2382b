"""`FakePveProcess`, the fakepve the tests, the demo and `reconciler lab` start: its password
reaches fakepve through the environment, so one that starts with "-" (a made one can: the lab's
`token_urlsafe`) is a password, not a flag, and no other user's `ps` shows it."""

from __future__ import annotations

from pathlib import Path

import pytest

from reconciler.simulators.fakepve_process import FakePveProcess


@pytest.mark.parametrize("platform", [False, True], ids=["fakepve", "platform-pve"])
def test_a_password_that_looks_like_a_flag_logs_in_and_is_not_in_the_arguments(
    platform: bool,
) -> None:
    password = "-Xy9_secret-looking-like-a-flag"
    with FakePveProcess(password=password, platform=platform) as fake:
        assert fake.client().version.get()["version"]
        assert fake._proc is not None
        argv = Path(f"/proc/{fake._proc.pid}/cmdline").read_bytes().split(b"\0")
        assert password.encode() not in argv and b"--password" not in argv
