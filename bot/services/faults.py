"""Infrastructure faults: the database locked, read-only or away, the images folder unwritable.

They are waited out, never turned into a user's failed job: the operation is retried with backoff
until it succeeds or the process is stopping. `Faults` holds what is failing now, for /healthz and for
one log line when a fault starts and one when it ends.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Literal, TypeVar

from bot.store.database import is_store_fault

log = logging.getLogger(__name__)
T = TypeVar("T")
FaultKind = Literal["database", "images"]


class Stopping(Exception):
    """The process is shutting down: a retry loop gave up; what it held is redone after the restart."""


class Faults:
    def __init__(self) -> None:
        self._active: dict[FaultKind, str] = {}
        self.stopping = asyncio.Event()  # set when shutdown's deadline has passed: retry loops give up

    def report(self, kind: FaultKind, problem: str) -> None:
        if kind not in self._active:
            log.warning("%s: %s; holding the work and retrying until it recovers", kind, problem)
        self._active[kind] = problem

    def clear(self, kind: FaultKind) -> None:
        if self._active.pop(kind, None) is not None:
            log.info("%s: recovered", kind)

    def ok(self, kind: FaultKind) -> bool:
        return kind not in self._active

    async def persist(
        self,
        operation: Callable[[], Awaitable[T]],
        *,
        kind: FaultKind = "database",
        is_fault: Callable[[BaseException], bool] = is_store_fault,
        first_s: float = 0.1,
        max_s: float = 5.0,
    ) -> T:
        """`operation()` until it succeeds. A fault is reported and retried after a growing pause; any
        other error is raised as is; when shutdown's deadline passes, Stopping is raised instead."""
        delay = first_s
        while True:
            if self.stopping.is_set():
                raise Stopping(kind)
            try:
                result = await operation()
            except Exception as exc:
                if not is_fault(exc):
                    raise
                self.report(kind, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            else:
                self.clear(kind)
                return result
            try:
                await asyncio.wait_for(self.stopping.wait(), delay)
            except TimeoutError:
                delay = min(max_s, delay * 2)


def is_disk_fault(exc: BaseException) -> bool:
    return isinstance(exc, OSError)
