"""Round-robin order across users, so one user's ten jobs cannot starve everyone else."""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable


class FairQueue:
    """Job ids per user; `pop` serves users in turn. The database stays the record, this is the order."""

    def __init__(self) -> None:
        self._by_user: OrderedDict[int, deque[int]] = OrderedDict()  # rotation order: next user first

    def push(self, user_id: int, job_id: int) -> None:
        self._by_user.setdefault(user_id, deque()).append(job_id)

    def push_front(self, user_id: int, job_id: int) -> None:
        """Back to the head of the line (its engine stopped under it): first of its user, user first."""
        self._by_user.setdefault(user_id, deque()).appendleft(job_id)
        self._by_user.move_to_end(user_id, last=False)

    def pop(self, runnable: Callable[[int], bool] | None = None) -> tuple[int, int] | None:
        """The next (user, job); that user then goes to the back of the rotation.

        With `runnable`, the first user in turn whose oldest runnable job passes it (scale-out: a job
        whose model family no free worker serves waits without blocking the others).
        """
        for user_id, jobs in self._by_user.items():
            job_id = next((j for j in jobs if runnable is None or runnable(j)), None)
            if job_id is None:
                continue
            jobs.remove(job_id)
            del self._by_user[user_id]
            if jobs:
                self._by_user[user_id] = jobs
            return user_id, job_id
        return None

    def remove(self, job_id: int) -> bool:
        for user_id, jobs in self._by_user.items():
            if job_id in jobs:
                jobs.remove(job_id)
                if not jobs:
                    del self._by_user[user_id]
                return True
        return False

    def order(self) -> list[int]:
        """The order jobs will run in, simulating the rotation."""
        lanes = [list(jobs) for jobs in self._by_user.values()]
        out: list[int] = []
        depth = 0
        while any(depth < len(lane) for lane in lanes):
            out.extend(lane[depth] for lane in lanes if depth < len(lane))
            depth += 1
        return out

    def __len__(self) -> int:
        return sum(len(jobs) for jobs in self._by_user.values())
