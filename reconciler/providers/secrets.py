"""A secret reference's value: `{env: VAR}` or `{file: PATH}`, read when a provider connects.

Shared by every provider that needs one (the Proxmox API's password or token, the DNS zones'
TSIG keys, the Velocity bridge's secret, notification URLs), the way `backoff` is: one reading,
one wording of its errors. The value is returned, never logged; the error names the variable or
the file, never what it holds.
"""

from __future__ import annotations

import os
from pathlib import Path

from reconciler.model.errors import ConfigurationError
from reconciler.model.spec import SecretRef


def read_secret(ref: SecretRef) -> str:
    """Resolve a secret reference. The value is returned, never logged."""
    if ref.env is not None:
        value = os.environ.get(ref.env)
        if value is None:
            raise ConfigurationError(f"environment variable {ref.env} (a secret) is not set")
        return value
    assert ref.file is not None
    try:
        return Path(ref.file).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigurationError(f"cannot read secret file {ref.file}: {exc.strerror}") from None
