"""NoticeThrottle: at most one public notice per user per window.

A refused 🔁 reaction has no interaction to answer privately, so its refusal is a channel message; a
user adding and removing reactions must not turn the bot into a spammer of its own channel.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class NoticeThrottle:
    def __init__(self, window_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self._clock = clock
        self._last: dict[int, float] = {}  # user id -> when their last notice went out

    def allow(self, user_id: int) -> bool:
        """True (and the window starts) when this user got no notice within the window."""
        now = self._clock()
        self._last = {u: at for u, at in self._last.items() if now - at < self.window_s}  # forget old ones
        if user_id in self._last:
            return False
        self._last[user_id] = now
        return True
