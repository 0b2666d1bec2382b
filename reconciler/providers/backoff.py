"""The one backoff every provider waits by: tenacity's full-jitter exponential backoff.

Providers run their own small retry loops (they wait out locks and restart tasks as well as
retrying calls, which tenacity's decorator knows nothing of), but the delay between tries is
tenacity's, computed here, so all of them back off alike.
"""

from __future__ import annotations

from tenacity import RetryCallState, wait_random_exponential


def backoff(attempt: int, *, initial: float, maximum: float) -> float:
    """Seconds before try `attempt + 1`: uniform in [0, min(maximum, initial * 2**(attempt-1))]."""
    state = RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
    state.attempt_number = attempt
    return float(wait_random_exponential(multiplier=initial, max=maximum)(state))
