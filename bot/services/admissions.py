"""GroupAdmission: requests that arrive while an admission transaction is open wait for the next one and
are admitted together (group commit).

Admission is serialized on purpose (the limits must hold), so under a burst, and with the engine's
thread competing for the CPU, a request used to wait for every earlier request's own commit. One
transaction for all the requests that queued up behind the last one keeps the acknowledgement within
Discord's patience while the limits are still checked and taken request by request, in arrival order.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

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


class GroupAdmission:
    def __init__(self, jobs: JobStore, max_group: int = MAX_GROUP) -> None:
        self.jobs = jobs
        self.max_group = max_group
        self._asks: list[_Ask] = []
        self._admitting: asyncio.Task[None] | None = None

    async def admit(self, new: NewJob, quota: Quota) -> Admission:
        """The job stored (committed) or refused; raises what the store raised for its group."""
        ask = _Ask(new, quota)
        self._asks.append(ask)
        if self._admitting is None or self._admitting.done():
            self._admitting = asyncio.create_task(self._admit_waiting(), name="fluxbot-admission")
        return await ask.answer

    async def _admit_waiting(self) -> None:
        while self._asks:
            group, self._asks = self._asks[: self.max_group], self._asks[self.max_group :]
            group = [ask for ask in group if not ask.answer.done()]  # the asker gave up (cancelled)
            if not group:
                continue
            try:
                admissions = await self.jobs.admit_many([(ask.new, ask.quota) for ask in group])
            except Exception as exc:  # every asker of the group sees the store's error
                for ask in group:
                    if not ask.answer.done():
                        ask.answer.set_exception(exc)
                continue
            except BaseException:  # cancelled (shutdown): nobody waits forever
                for ask in group + self._asks:
                    ask.answer.cancel()
                raise
            for ask, admission in zip(group, admissions, strict=True):
                if not ask.answer.done():
                    ask.answer.set_result(admission)
