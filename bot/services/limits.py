"""Per-user rate limits: a sliding window per user, built on asyncio-throttle's Throttler."""

from __future__ import annotations

import asyncio

from asyncio_throttle import Throttler

# A Throttler that can admit a job admits it at once; one that cannot sleeps in 10 ms steps.
# Waiting this long tells the two apart without ever holding a user's request.
_PROBE_S = 0.005


class RateLimiter:
    """At most `jobs` starts per `window_s` seconds per user; a refusal never consumes a slot."""

    def __init__(self, jobs: int, window_s: float) -> None:
        self.jobs = jobs
        self.window_s = window_s
        self._throttlers: dict[int, Throttler] = {}

    def configure(self, jobs: int, window_s: float) -> None:
        """New limits (admin change); running windows restart under them."""
        self.jobs, self.window_s = jobs, window_s
        self._throttlers.clear()

    async def try_acquire(self, user_id: int) -> bool:
        throttler = self._throttlers.get(user_id)
        if throttler is None:
            throttler = self._throttlers[user_id] = Throttler(rate_limit=self.jobs, period=self.window_s)
        try:
            await asyncio.wait_for(throttler.acquire(), timeout=_PROBE_S)
        except TimeoutError:
            return False
        return True
