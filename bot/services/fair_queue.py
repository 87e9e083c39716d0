"""Weighted fair order: servers share the GPU by their weights, and within a server its members by
theirs (a role's fair-share weight), so one user's ten jobs, or one busy server, cannot starve the rest.

Stride scheduling on GPU time, two levels: each server and each member has a "pass" that grows by a
job's cost (steps x megapixels x images: what the GPU spends on it) divided by their weight when one
of their jobs is handed out; the lowest pass goes next (ties: who waited first). Someone who starts
waiting again joins at the lowest pass of those waiting, so time spent idle is not saved up. With
equal weights and equal jobs this is the old round robin.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class _Lane:
    jobs: deque[tuple[int, float]] = field(default_factory=deque)  # (job id, cost), oldest first
    weight: float = 1.0
    pass_: float = 0.0
    since: int = 0  # when it last started waiting (ties)


@dataclass
class _Group:
    users: dict[int, _Lane] = field(default_factory=dict)
    weight: float = 1.0
    pass_: float = 0.0
    since: int = 0
    clock: float = 0.0  # the pass of the member served last: where a member who starts waiting joins


class FairQueue:
    """Job ids per member per server; `pop` serves the lowest pass. The database stays the record, this
    is the order."""

    def __init__(self) -> None:
        self._groups: dict[int | None, _Group] = {}
        self._front: deque[tuple[int | None, int, int, float]] = deque()  # put back: (group, user, job, cost)
        self._ticks = 0
        self._passed_over: set[int] = set()  # jobs another went before once (avoid): never again
        self._clock = 0.0  # the pass of the server served last: where a server that starts waiting joins

    def push(
        self,
        user_id: int,
        job_id: int,
        cost: float = 1.0,
        weight: float = 1.0,
        group: int | None = None,
        group_weight: float = 1.0,
    ) -> None:
        """A job joins the line of `user_id` in `group` (a server; None: DMs)."""
        self._ticks += 1
        found = self._groups.get(group)
        if found is None or not found.users:
            # Joins where the line is now: neither credit for time spent idle nor debt from before.
            start = min((g.pass_ for g in self._groups.values() if g.users), default=self._clock)
            found = found or _Group()
            found.pass_, found.since = start, self._ticks
            self._groups[group] = found
        found.weight = group_weight
        lane = found.users.get(user_id)
        if lane is None:
            start = min((u.pass_ for u in found.users.values()), default=found.clock)
            lane = _Lane(pass_=start, since=self._ticks)
            found.users[user_id] = lane
        lane.weight = weight
        lane.jobs.append((job_id, max(cost, 1e-9)))

    def push_front(self, user_id: int, job_id: int, cost: float = 1.0, group: int | None = None) -> None:
        """Back to the head of the line (its engine stopped under it): it goes next, and was charged."""
        self._front.appendleft((group, user_id, job_id, cost))

    def pop(
        self, runnable: Callable[[int], bool] | None = None, avoid: Callable[[int], bool] | None = None
    ) -> tuple[int, int] | None:
        """The next (user, job): the lowest pass among servers, then among that server's members.

        With `runnable`, only jobs that pass it (scale-out: a job whose model family no free worker
        serves waits without blocking the others). With `avoid` (a job that would make the engine
        swap its extra transformer), a member whose pass lies less than that job's cost above the
        next member's may go first with a job that is not avoided: a job is passed over once at most
        (it goes next after that), and jobs that need the same model run together."""
        for index, (_, user_id, job_id, _) in enumerate(self._front):
            if runnable is None or runnable(job_id):
                del self._front[index]
                return user_id, job_id
        candidates: list[tuple[float, int, int | None, _Group]] = []
        for key, group in self._groups.items():
            if any(self._first(lane, runnable) is not None for lane in group.users.values()):
                candidates.append((group.pass_, group.since, key, group))
        if not candidates:
            return None
        _, _, key, group = min(candidates, key=lambda c: (c[0], c[1]))
        lanes = [(lane.pass_, lane.since, user, lane) for user, lane in group.users.items()]
        ready = [
            (user_id, lane, first)
            for _, _, user_id, lane in sorted(lanes, key=lambda c: (c[0], c[1]))
            if (first := self._first(lane, runnable)) is not None
        ]
        if not ready:
            return None
        user_id, lane, first = ready[0]
        if avoid is not None and first[0] not in self._passed_over and avoid(first[0]):
            within = lane.pass_ + first[1] / lane.weight
            user_id, lane, first = next(
                (r for r in ready if r[1].pass_ < within and not avoid(r[2][0])), ready[0]
            )
            if first is not ready[0][2]:
                self._passed_over.add(ready[0][2][0])  # it goes next, whatever it needs
        job_id, cost = first
        self._passed_over.discard(job_id)
        lane.jobs.remove(first)
        self._clock, group.clock = group.pass_, lane.pass_
        lane.pass_ += cost / lane.weight
        group.pass_ += cost / group.weight
        if not lane.jobs:
            del group.users[user_id]
        return user_id, job_id

    @staticmethod
    def _first(lane: _Lane, runnable: Callable[[int], bool] | None) -> tuple[int, float] | None:
        return next((j for j in lane.jobs if runnable is None or runnable(j[0])), None)

    def remove(self, job_id: int) -> bool:
        self._passed_over.discard(job_id)
        for index, (_, _, queued, _) in enumerate(self._front):
            if queued == job_id:
                del self._front[index]
                return True
        for group in self._groups.values():
            for user_id, lane in group.users.items():
                for entry in lane.jobs:
                    if entry[0] == job_id:
                        lane.jobs.remove(entry)
                        if not lane.jobs:
                            del group.users[user_id]
                        return True
        return False

    def order(self) -> list[int]:
        """The order jobs will run in: the pops to come, simulated with heaps (it runs on every new
        job, for places in line: O(n log n), not a scan of every member per job)."""
        out = [job for _, _, job, _ in self._front]
        groups: list[tuple[float, int, int, int | None]] = []  # (pass, since, tiebreak, key)
        lanes: dict[
            int | None, list[tuple[float, int, int, int]]
        ] = {}  # per group: (pass, since, tiebreak, user)
        queued: dict[tuple[int | None, int], deque[tuple[int, float]]] = {}
        weights: dict[tuple[int | None, int], float] = {}
        for index, (key, group) in enumerate(self._groups.items()):
            if not group.users:
                continue
            heapq.heappush(groups, (group.pass_, group.since, index, key))
            lanes[key] = []
            for order, (user, lane) in enumerate(group.users.items()):
                heapq.heappush(lanes[key], (lane.pass_, lane.since, order, user))
                queued[(key, user)] = deque(lane.jobs)
                weights[(key, user)] = lane.weight
        while groups:
            group_pass, since, tiebreak, key = heapq.heappop(groups)
            lane_pass, lane_since, lane_tiebreak, user = heapq.heappop(lanes[key])
            job_id, cost = queued[(key, user)].popleft()
            out.append(job_id)
            if queued[(key, user)]:
                heapq.heappush(
                    lanes[key], (lane_pass + cost / weights[(key, user)], lane_since, lane_tiebreak, user)
                )
            if lanes[key]:
                heapq.heappush(groups, (group_pass + cost / self._groups[key].weight, since, tiebreak, key))
        return out

    def __len__(self) -> int:
        return len(self._front) + sum(
            len(lane.jobs) for g in self._groups.values() for lane in g.users.values()
        )

    def __bool__(self) -> bool:
        return len(self) > 0
