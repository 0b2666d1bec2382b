"""Our exceptions. Providers wrap their clients' exceptions in these, in one place each, so the
executor decides retry or stop from the class alone (kopf `_core/actions/execution.py`).

    ReconcilerError
    ├── ConfigurationError        bad settings (missing credentials, unreadable CA file)
    ├── FencingError              this controller lost (or never held) the leader lease: it
    │                             must not act; raised before a mutating action, never retried
    ├── PlanError                 a plan that must not be applied (it carries errors); a bug
    │                             in the caller, which should have checked `plan.errored`
    └── ProviderError             an outside system said no, or did not answer
        ├── TemporaryError        retry after a jittered backoff
        │   └── LockedError       a config lock (backup, migrate, ...): wait until it clears
        └── PermanentError        retrying will not help: report it
            ├── ConflictError     what we saw changed (stale digest, a vmid taken in a race):
            │                     re-observe and re-plan, never overwrite blindly
            ├── NotFoundError     the target does not exist (a re-run destroy: done)
            ├── TaskFailedError   a Proxmox task ended with an error exit status
            └── OwnershipError    the target does not carry our mark: never touched

Work done concurrently (anyio task groups) fails with an ExceptionGroup; `first_error` says which
of ours it stands for, so a command or a cycle reports one line, not a traceback.
"""

from __future__ import annotations


class ReconcilerError(Exception):
    pass


class ConfigurationError(ReconcilerError):
    pass


class FencingError(ReconcilerError):
    pass


class PlanError(ReconcilerError):
    pass


class ProviderError(ReconcilerError):
    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status

    @property
    def temporary(self) -> bool:
        return isinstance(self, TemporaryError)


class TemporaryError(ProviderError):
    pass


class LockedError(TemporaryError):
    pass


class PermanentError(ProviderError):
    pass


class ConflictError(PermanentError):
    pass


class NotFoundError(PermanentError):
    pass


class TaskFailedError(PermanentError):
    def __init__(self, message: str, *, log_tail: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.log_tail = log_tail


class OwnershipError(PermanentError):
    pass


def first_error(exc: BaseException) -> ReconcilerError | None:
    """The ReconcilerError `exc` stands for: itself, or the first member of an exception group
    whose members (nested groups too) are all ReconcilerErrors. None for anything else: a group
    holding a bug keeps its traceback."""
    if isinstance(exc, ReconcilerError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        found = [first_error(e) for e in exc.exceptions]
        if found and all(e is not None for e in found):
            return found[0]
    return None
