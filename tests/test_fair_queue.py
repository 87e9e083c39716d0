"""FairQueue: round robin across users; with a filter, a job no free worker can run does not block others."""

from __future__ import annotations

from bot.services.fair_queue import FairQueue


def queue_of(*jobs: tuple[int, int]) -> FairQueue:
    fair = FairQueue()
    for user, job in jobs:
        fair.push(user, job)
    return fair


def test_users_take_turns_whatever_order_they_queued_in() -> None:
    fair = queue_of((1, 10), (1, 11), (1, 12), (2, 20), (2, 21))

    assert fair.order() == [10, 20, 11, 21, 12]
    assert [fair.pop() for _ in range(6)] == [(1, 10), (2, 20), (1, 11), (2, 21), (1, 12), None]


def test_a_job_nobody_can_run_now_waits_without_blocking_the_rotation() -> None:
    fair = queue_of((1, 10), (1, 11), (2, 20), (3, 30))
    flux2_jobs = {10, 30}

    first = fair.pop(lambda job: job not in flux2_jobs)
    second = fair.pop(lambda job: job not in flux2_jobs)

    assert (first, second) == ((1, 11), (2, 20))  # user 1's runnable job, then the next user
    assert fair.pop(lambda job: job not in flux2_jobs) is None
    assert fair.order() == [30, 10]  # user 1 went to the back after its turn
