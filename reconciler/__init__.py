"""reconciler: a declarative reconciliation controller for Proxmox VE hosting platforms.

Data flows one way (see README): specs are loaded and checked into a desired graph,
outside systems are observed into an observed state, the two are paired by address
and diffed into a Plan, and the Plan is applied in dependency waves.

`__version__` is the installed package's version, which setuptools-scm takes from the git tag
at build time (README, "Install"). It is read on first use, not at import: importlib.metadata
costs tens of milliseconds, and most commands never ask for it.
"""

from __future__ import annotations

# What a source tree that was never installed reports (the same as pyproject's
# tool.setuptools_scm.fallback_version, for a build without git).
FALLBACK_VERSION = "0.0.0+unknown"


def installed_version() -> str:
    """The version pip recorded for the installed `reconciler`, or FALLBACK_VERSION."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("reconciler")
    except PackageNotFoundError:
        return FALLBACK_VERSION


def __getattr__(name: str) -> str:
    if name == "__version__":
        value = installed_version()
        globals()["__version__"] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
