"""GroupAdmission: requests that arrive while an admission transaction is open wait for the next one and
are admitted together (group commit); so do the message ids of answered jobs.

Admission is serialized on purpose (the limits must hold), so under a burst, and with the engine's
thread competing for the CPU, a request used to wait for every earlier request's own commit. One
transaction for all the requests that queued up behind the last one keeps the acknowledgement within
Discord's patience while the limits are still checked and taken request by request, in arrival order.
Each answered job then records which message shows it: as its own write, 200 answers in a burst were
200 more transactions queueing for the same write lock as the admissions behind them (what the
event loop waited on; bench/bot.py). They ride in the next admission transaction instead.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from bot.store.jobs import Admission, JobStore, NewJob, Quota

# Requests one transaction takes at most; more wait for the next (one transaction stays short).
MAX_GROUP = 64


def _future() -> asyncio.Future[Admission]:
    return asyncio.get_running_loop().create_future()


@dataclass
class _Ask:
    new: NewJob
    quota: Quota
    answer: asyncio.Future[Admission] = field(default_factory=_future)


@dataclass
class _Message:
    job_id: int
    message_id: int
    done: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class GroupAdmission:
    def __init__(self, jobs: JobStore, max_group: int = MAX_GROUP) -> None:
        self.jobs = jobs
        self.max_group = max_group
        self._asks: list[_Ask] = []
        self._messages: list[_Message] = []
        self._admitting: asyncio.Task[None] | None = None

    async def admit(self, new: NewJob, quota: Quota) -> Admission:
        """The job stored (committed) or refused; raises what the store raised for its group."""
        ask = _Ask(new, quota)
        self._asks.append(ask)
        self._wake()
        return await ask.answer

    async def remember_message(self, job_id: int, message_id: int) -> None:
        """Which message shows a job, committed with the next group (raises what the store raised)."""
        message = _Message(job_id, message_id)
        self._messages.append(message)
        self._wake()
        await message.done

    def _wake(self) -> None:
        if self._admitting is None or self._admitting.done():
            self._admitting = asyncio.create_task(self._admit_waiting(), name="fluxbot-admission")

    async def _admit_waiting(self) -> None:
        while self._asks or self._messages:
            group, self._asks = self._asks[: self.max_group], self._asks[self.max_group :]
            group = [ask for ask in group if not ask.answer.done()]  # the asker gave up (cancelled)
            messages, self._messages = self._messages, []
            waiting: list[asyncio.Future[Any]] = [ask.answer for ask in group] + [m.done for m in messages]
            if not waiting:
                continue
            try:
                admissions = await self.jobs.admit_many(
                    [(ask.new, ask.quota) for ask in group], [(m.job_id, m.message_id) for m in messages]
                )
            except Exception as exc:  # everyone of the group sees the store's error
                for future in waiting:
                    if not future.done():
                        future.set_exception(exc)
                continue
            except BaseException:  # cancelled (shutdown): nobody waits forever
                for future in waiting + [ask.answer for ask in self._asks] + [m.done for m in self._messages]:
                    future.cancel()
                raise
            for ask, admission in zip(group, admissions, strict=True):
                if not ask.answer.done():
                    ask.answer.set_result(admission)
            for message in messages:
                if not message.done.done():
                    message.done.set_result(None)
