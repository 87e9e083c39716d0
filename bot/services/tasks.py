"""A set of background tasks that are kept alive until they end, and cancelled together on stop."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger(__name__)


class TaskSet:
    """asyncio keeps only weak references to tasks: one nobody holds can vanish mid-flight. This holds
    each until it ends (and forgets it then), and `cancel_all` stops what is left."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, work: Coroutine[Any, Any, Any], name: str | None = None) -> asyncio.Task[Any]:
        task = asyncio.create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def __len__(self) -> int:
        return len(self._tasks)

    def __iter__(self) -> Any:
        return iter(list(self._tasks))

    async def cancel_all(self, timeout: float | None = None) -> None:
        """Cancel every task and wait for them (at most `timeout`: a task that ignores cancellation,
        say a stuck network call, must not hold up a shutdown)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if not tasks:
            return
        _, stuck = await asyncio.wait(tasks, timeout=timeout)
        for task in stuck:
            log.warning("%s did not stop within %s s", task.get_name(), timeout)
