"""Placeholder: replaced by the policy checks module."""

from collections.abc import Iterator

from reconciler.loading.sources import Source
from reconciler.model.diagnostics import Diagnostic
from reconciler.model.spec import PlatformSpec


def run_all(spec: PlatformSpec, source: Source) -> Iterator[Diagnostic]:
    return iter(())
