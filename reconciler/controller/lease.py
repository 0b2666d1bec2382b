"""The leader lease: of all the controllers pointed at one platform, exactly one acts.

Called by the controller service (`reconciler run`): it runs a `LeaseKeeper` in the background
to gain and keep leadership, and calls `Lease.check()` before EVERY mutating action; a controller
that is not the leader plans and reports, but never changes anything. `/status` shows
`Lease.info()`.

Two kinds of lease, one Protocol (`Lease`):

- `RedisLease`: controllers on several machines share one Redis (standalone or through Sentinel,
  see reconciler.providers.redisconn). Two keys per lease name:

      reconciler:<name>:lease   "<token>:<holder>", with a PX expiry of `ttl`
      reconciler:<name>:fence   the last fencing token handed out (INCR per new term)

  Acquire, renew, check and release are Lua scripts, so each reads and writes the key in one
  atomic step. A new term takes the next token, so tokens only grow (while Redis keeps its
  data: a Redis that restarts empty starts again at 1; `check()` compares with the key itself,
  so this never lets two holders pass). A leader that sleeps past its expiry (GC pause,
  SIGSTOP) and wakes after another took over gets False from `acquire()` and FencingError from
  `check()`: the key no longer holds its token.

  The lease is also kept on our own clock (injectable): a term counts from the moment we SENT
  the acquire or renew that succeeded, so it runs out locally no later than on the server. When
  Redis stops answering, the leader stays leader only until that local term runs out, and
  `check()` refuses after it even if the server would still say yes.

  Known limit: Sentinel replication is asynchronous, so a failover may lose the last lease
  write; `check()` then fails for the old leader (it asks the new master), but an action that
  passed `check()` just before the failover may still run next to the new leader's first one.

- `LocalLease`: no Redis, one machine. An exclusive non-blocking `flock` on a lock file (under
  the state directory): a second copy on the same machine is refused (`acquire()` is False)
  for as long as the first lives; the OS drops the lock when the holder dies. The token is the
  constant LOCAL_TOKEN. The lock file is never deleted (deleting it would let two copies lock
  two different files); `check()` also refuses if someone replaced it.

`LeaseKeeper` calls `acquire()` every `interval` (ttl/3: renews for the leader, tries for a
standby), reports each change of leadership through `on_change` and counts them (`changes`,
for metrics). A standby sleeps no longer than the current holder's remaining time, so it takes
over as soon as a dead leader's lease runs out. On shutdown it releases the lease, so a
standby takes over at once. Sleep is injectable; tests do not wait.

Errors (reconciler.model.errors):

    ReconcilerError
    ├── ConfigurationError      LocalLease: the lock file cannot be opened (no state directory)
    ├── FencingError            `check()`: we do not hold the lease (never did, lost it, it ran
    │                           out on our clock, or Redis could not confirm): do not act
    └── ProviderError           `acquire()` / `info()`: Redis failed
        ├── TemporaryError      connection refused, reset or timed out, loading, read-only
        │                       replica during a failover: the keeper tries again next round
        └── PermanentError      other Redis errors (authentication, a script error)

`release()` never raises for Redis errors: the lease runs out on its own within ttl.
"""

from __future__ import annotations

import fcntl
import logging
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import anyio
from redis.asyncio import Redis
from redis.exceptions import BusyLoadingError, ReadOnlyError, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from reconciler.model.errors import (
    ConfigurationError,
    FencingError,
    PermanentError,
    ProviderError,
    TemporaryError,
)

LOCAL_TOKEN = 1
# A standby wakes this long after the holder's lease should have run out, so that it finds the
# key gone rather than a last millisecond of it.
EXPIRY_MARGIN = 0.005

log = logging.getLogger(__name__)

# KEYS: lease, fence. ARGV: holder, our token ("" when we have none), ttl in ms.
# Returns {token, ttl_ms} when we hold the lease (renewed, or a new term), {0, pttl} when
# someone else does (pttl -1: a key without expiry, not ours to judge).
_ACQUIRE = """
local current = redis.call('GET', KEYS[1])
if current then
  if ARGV[2] ~= '' and current == ARGV[2] .. ':' .. ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[3])
    return {tonumber(ARGV[2]), tonumber(ARGV[3])}
  end
  return {0, redis.call('PTTL', KEYS[1])}
end
local token = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], token .. ':' .. ARGV[1], 'PX', ARGV[3])
return {token, tonumber(ARGV[3])}
"""

# KEYS: lease. ARGV: "<token>:<holder>". 1 when the key holds exactly that, else 0.
_CHECK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return 1 end
return 0
"""

# KEYS: lease. ARGV: "<token>:<holder>". Deletes the key only if it is still ours.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: lease. {value or nil, pttl}, read together.
_INFO = """
return {redis.call('GET', KEYS[1]), redis.call('PTTL', KEYS[1])}
"""


@dataclass(frozen=True)
class LeaseInfo:
    """Who holds a lease, for /status. `ttl` is the seconds left, None for a lease that does
    not expire (LocalLease: it lasts as long as its holder's process)."""

    holder: str
    token: int
    ttl: float | None


class Lease(Protocol):
    """One controller's view of the leader lease. One task (the keeper) acquires and
    releases; any number of tasks may check at the same time."""

    @property
    def holder(self) -> str:
        """Who we are, unique per process."""
        ...

    @property
    def token(self) -> int | None:
        """The fencing token of our current term, None when we are not the leader."""
        ...

    @property
    def expires_in(self) -> float | None:
        """As of the last `acquire()`: seconds until the current term runs out (ours if we
        hold the lease, the holder's if not); None when unknown or never."""
        ...

    async def acquire(self) -> bool:
        """Try once to become or stay the leader (renews if we are); True if we are."""
        ...

    async def release(self) -> None:
        """Give the lease up now, if we hold it."""
        ...

    async def check(self) -> int:
        """Our token if we still hold the lease (confirmed by its store), else FencingError."""
        ...

    async def info(self) -> LeaseInfo | None:
        """The current holder, None when nobody holds the lease."""
        ...


def default_holder() -> str:
    """host:pid:random, so that two processes (or one restarted with the same pid) never
    share a name."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


class RedisLease:
    """The lease in Redis, for controllers on several machines (see the module docstring)."""

    def __init__(
        self,
        redis: Redis,
        *,
        name: str,
        holder: str | None = None,
        ttl: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl < 0.01:
            raise ConfigurationError(f"lease {name}: ttl {ttl} s is too short")
        self.name = name
        self.holder = holder or default_holder()
        self.ttl = ttl
        self.lease_key = f"reconciler:{name}:lease"
        self.fence_key = f"reconciler:{name}:fence"
        self.expires_in: float | None = None
        self._clock = clock
        self._token: int | None = None  # of our last term, even once it ran out on our clock
        self._valid_until = 0.0
        self._acquire = redis.register_script(_ACQUIRE)
        self._check = redis.register_script(_CHECK)
        self._release = redis.register_script(_RELEASE)
        self._info = redis.register_script(_INFO)

    @property
    def token(self) -> int | None:
        if self._token is None or self._clock() >= self._valid_until:
            return None
        return self._token

    async def acquire(self) -> bool:
        started = self._clock()
        ttl_ms = max(1, int(self.ttl * 1000))
        args: list[str | int] = [
            self.holder,
            "" if self._token is None else str(self._token),
            ttl_ms,
        ]
        try:
            token, pttl = await self._acquire(keys=[self.lease_key, self.fence_key], args=args)
        except RedisError as exc:
            # The script may or may not have run; if it started a term for us we do not know
            # its token, so we wait that term out like any other holder's.
            self.expires_in = self._remaining()
            raise _wrap(exc, f"lease {self.name}: acquire") from exc
        if int(token) == 0:
            self._token = None
            self.expires_in = int(pttl) / 1000 if int(pttl) >= 0 else None
            return False
        self._token = int(token)
        self._valid_until = started + self.ttl
        self.expires_in = self._remaining()
        return True

    async def release(self) -> None:
        token, self._token = self._token, None
        self.expires_in = None
        if token is None:
            return
        try:
            await self._release(keys=[self.lease_key], args=[f"{token}:{self.holder}"])
        except RedisError as exc:
            log.warning("lease %s: release failed, it runs out within ttl: %s", self.name, exc)

    async def check(self) -> int:
        token = self.token
        if token is None:
            raise FencingError(f"lease {self.name}: {self.holder} is not the leader")
        try:
            held = await self._check(keys=[self.lease_key], args=[f"{token}:{self.holder}"])
        except RedisError as exc:
            raise FencingError(f"lease {self.name}: cannot confirm leadership: {exc}") from exc
        if int(held) != 1:
            self._token = None
            raise FencingError(f"lease {self.name}: {self.holder} lost the lease (term {token})")
        # A slow answer may arrive after our term ran out on our clock: too late to act on.
        if self.token is None:
            raise FencingError(f"lease {self.name}: term {token} ran out while checking")
        return token

    async def info(self) -> LeaseInfo | None:
        try:
            value, pttl = await self._info(keys=[self.lease_key])
        except RedisError as exc:
            raise _wrap(exc, f"lease {self.name}: info") from exc
        if value is None:
            return None
        text = value.decode() if isinstance(value, bytes) else str(value)
        token, _, holder = text.partition(":")
        ttl = int(pttl) / 1000 if int(pttl) >= 0 else None
        return LeaseInfo(holder=holder, token=int(token) if token.isdigit() else 0, ttl=ttl)

    def _remaining(self) -> float | None:
        if self.token is None:
            return None
        return max(0.0, self._valid_until - self._clock())


class LocalLease:
    """The lease as a lock file, for one controller alone on its machine."""

    def __init__(self, path: Path, *, holder: str | None = None) -> None:
        self.path = path
        self.holder = holder or default_holder()
        self.expires_in: float | None = None  # a lock file never runs out
        self._fd: int | None = None

    @property
    def token(self) -> int | None:
        return LOCAL_TOKEN if self._fd is not None else None

    async def acquire(self) -> bool:
        if self._fd is not None:
            if self._still_ours(self._fd):
                return True
            self._close()
        try:
            # os.open's descriptors are not inherited: a child process never keeps the lock.
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise ConfigurationError(f"lock file {self.path}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except OSError as exc:
            os.close(fd)
            raise ConfigurationError(f"lock file {self.path}: {exc.strerror}") from exc
        # Only the lock holder writes, so a reader never sees a name half replaced.
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{self.holder}\n".encode(), 0)
        self._fd = fd
        return True

    async def release(self) -> None:
        self._close()

    async def check(self) -> int:
        if self._fd is None:
            raise FencingError(f"lock file {self.path}: {self.holder} does not hold it")
        if not self._still_ours(self._fd):
            raise FencingError(f"lock file {self.path} was replaced: another copy may run")
        return LOCAL_TOKEN

    async def info(self) -> LeaseInfo | None:
        if self._fd is not None:
            return LeaseInfo(holder=self.holder, token=LOCAL_TOKEN, ttl=None)
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ConfigurationError(f"lock file {self.path}: {exc.strerror}") from exc
        try:
            # A shared lock we can take means nobody holds the exclusive one.
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip()
            return LeaseInfo(holder=holder or "unknown", token=LOCAL_TOKEN, ttl=None)
        finally:
            os.close(fd)
        return None

    def _still_ours(self, fd: int) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def _close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the last descriptor drops the flock


class LeaseKeeper:
    """Gains and keeps leadership in the background: `await keeper.run()` in a task group.

    `interval` should be a third of the lease's ttl, so that two renewals may fail before the
    lease runs out. `on_change(is_leader)` is called on every change of leadership, from the
    keeper's task; it must not block (set an event, cancel a scope)."""

    def __init__(
        self,
        lease: Lease,
        *,
        interval: float,
        on_change: Callable[[bool], None] | None = None,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
    ) -> None:
        if interval <= 0:
            raise ConfigurationError(f"lease keeper: interval {interval} s must be positive")
        self.lease = lease
        self.interval = interval
        self.changes = 0
        self.last_error: ProviderError | None = None
        self._on_change = on_change
        self._sleep = sleep
        self._leader = False

    @property
    def is_leader(self) -> bool:
        """As of the last round; `Lease.check()` is the authority before acting."""
        return self._leader

    async def step(self) -> bool:
        """One round: acquire (or renew), then note whether we lead. Redis failing is logged
        and kept in `last_error`: we stay leader only while our term has not run out."""
        try:
            await self.lease.acquire()
        except ProviderError as exc:
            self.last_error = exc
            log.warning("leader lease: %s", exc)
        else:
            self.last_error = None
        self._set(self.lease.token is not None)
        return self._leader

    async def run(self) -> None:
        """Rounds until cancelled, then release the lease."""
        try:
            while True:
                await self.step()
                await self._sleep(self._next_delay())
        finally:
            # Shielded, so that a cancelled service still hands over at once; bounded, so
            # that a dead Redis does not hold the shutdown up.
            with anyio.move_on_after(max(self.interval, 1.0), shield=True):
                await self.lease.release()
            self._set(False)

    def _next_delay(self) -> float:
        # Wake when the current term runs out if that comes first: a standby takes over a
        # dead leader's lease at once, a leader whose renewals fail steps down on time.
        expires_in = self.lease.expires_in
        if expires_in is None:
            return self.interval
        return min(self.interval, expires_in + EXPIRY_MARGIN)

    def _set(self, leader: bool) -> None:
        if leader == self._leader:
            return
        self._leader = leader
        self.changes += 1
        log.info("leader lease: %s", "leader now" if leader else "no longer leader")
        if self._on_change is not None:
            self._on_change(leader)


def _wrap(exc: RedisError, what: str) -> ProviderError:
    temporary = (RedisConnectionError, RedisTimeoutError, BusyLoadingError, ReadOnlyError)
    cls = TemporaryError if isinstance(exc, temporary) else PermanentError
    return cls(f"{what}: {type(exc).__name__}: {exc}")
