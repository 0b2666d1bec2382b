"""How many calls one API has in flight: a bound that backs off when the API says it is
overloaded and comes back as it answers again (AIMD, as TCP's congestion window does).

`ProxmoxProvider.call` holds a slot of its `AdaptiveLimit` for each Proxmox API call, so the
guests, the firewall and the backup jobs (which all call through that one provider) share one
bound per Proxmox API. Proxmox's pveproxy has a few workers per node; a controller that opens
more connections than it serves gets 503s (or 429s from a proxy in front), and retrying them at
the same width only makes the queue longer.

The rules, all counted in `decreases`, `increases`, `in_flight`, `peak`, `current_limit`:

- no call starts while `current_limit` calls hold a slot, and `current_limit` never exceeds
  `limit` (the configured bound), so `in_flight` never does; calls wait in arrival order;
- `overloaded()` (a 429 or 503) halves `current_limit`, never below 1; so does a burst of
  `timed_out()` (`timeout_burst` within `timeout_window` seconds);
- after a decrease the limit holds for `hold` seconds: the other answers of the same overload,
  already on their way, do not halve it again, and successes do not climb yet;
- after that, every `current_limit` successes (a call left without an exception) climb it by
  one, up to `limit`: from 8 back to 16 takes 8 + 9 + ... + 15 = 92 calls answered, a few
  rounds of an observation of a large cluster.

A decrease does not interrupt calls already in flight: `in_flight` may exceed a lowered
`current_limit` until enough of them end; no new call starts meanwhile. Time is the injected
`clock`, so the hold is tested without sleeping.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from types import TracebackType

import anyio
import anyio.lowlevel

Clock = Callable[[], float]

DEFAULT_LIMIT = 16  # calls in flight per Proxmox API, unless the spec or --proxmox-max-concurrency
MAX_LIMIT = 256


class AdaptiveLimit:
    """At most `current_limit` (<= `limit`) holders at once; `async with limit:` holds one."""

    def __init__(
        self,
        limit: int = DEFAULT_LIMIT,
        *,
        clock: Clock = time.monotonic,
        hold: float = 5.0,
        timeout_burst: int = 3,
        timeout_window: float = 10.0,
    ) -> None:
        if not 1 <= limit <= MAX_LIMIT:
            raise ValueError(f"limit {limit} is not in 1..{MAX_LIMIT}")
        self.limit = limit
        self.current_limit = limit
        self.clock = clock
        self.hold = hold
        self.timeout_burst = timeout_burst
        self.timeout_window = timeout_window
        self.in_flight = 0
        self.peak = 0  # the most holders at once, ever
        self.decreases = 0
        self.increases = 0
        self._successes = 0  # since the last change of current_limit
        self._hold_until = float("-inf")
        self._timeouts: deque[float] = deque()
        self._waiters: deque[anyio.Event] = deque()

    def __repr__(self) -> str:
        return (
            f"AdaptiveLimit({self.current_limit}/{self.limit}, in_flight={self.in_flight}, "
            f"peak={self.peak}, decreases={self.decreases})"
        )

    @property
    def waiting(self) -> int:
        """Calls queued for a slot."""
        return len(self._waiters)

    # --- slots --------------------------------------------------------------------------------

    async def acquire(self) -> None:
        await anyio.lowlevel.checkpoint_if_cancelled()
        if not self._waiters and self.in_flight < self.current_limit:
            self._take()
            return
        granted = anyio.Event()
        self._waiters.append(granted)
        try:
            await granted.wait()
        except BaseException:
            # Cancelled: a slot granted meanwhile is handed on; otherwise leave the queue.
            if granted.is_set():
                self.release()
            else:
                self._waiters.remove(granted)
            raise

    def release(self) -> None:
        self.in_flight -= 1
        self._grant()

    async def __aenter__(self) -> AdaptiveLimit:
        await self.acquire()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
        if exc_type is None:
            self.succeeded()

    def _take(self) -> None:
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)

    def _grant(self) -> None:
        # The slot is counted for the waiter here, so no late arrival can take it first.
        while self._waiters and self.in_flight < self.current_limit:
            self._take()
            self._waiters.popleft().set()

    # --- what the API answered ------------------------------------------------------------------

    def succeeded(self) -> None:
        """A call answered: after the hold, every `current_limit` of them climb the limit by 1."""
        if self.current_limit >= self.limit or self.clock() < self._hold_until:
            return
        self._successes += 1
        if self._successes >= self.current_limit:
            self.current_limit += 1
            self.increases += 1
            self._successes = 0
            self._grant()

    def overloaded(self) -> None:
        """The API said it is overloaded (429, 503): halve the limit, unless just halved."""
        self._decrease()

    def timed_out(self) -> None:
        """A call got no answer in time: a burst of them halves the limit like an overload."""
        now = self.clock()
        self._timeouts.append(now)
        while self._timeouts and now - self._timeouts[0] > self.timeout_window:
            self._timeouts.popleft()
        if len(self._timeouts) >= self.timeout_burst:
            self._timeouts.clear()
            self._decrease()

    def _decrease(self) -> None:
        now = self.clock()
        if now < self._hold_until:
            return  # the same overload, answered to calls already under way
        if self.current_limit > 1:  # at 1 still overloaded: it holds there longer
            self.current_limit //= 2
            self.decreases += 1
        self._successes = 0
        self._hold_until = now + self.hold
