"""FairQueue: round robin across users; with a filter, a job no free worker can run does not block others."""

from __future__ import annotations

import random

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


def test_order_is_exactly_the_pops_to_come_whatever_happened_before() -> None:
    rng = random.Random(7)
    for _ in range(200):
        queue, next_id, live = FairQueue(), 0, []
        for _ in range(rng.randrange(1, 60)):
            action = rng.random()
            if action < 0.6:
                next_id += 1
                group = rng.choice([None, 1, 2])
                queue.push(
                    rng.randrange(5), next_id, cost=rng.choice([1.0, 2.0, 0.5]),
                    weight=rng.choice([1.0, 2.0, 3.0]), group=group, group_weight=rng.choice([1.0, 2.0]),
                )  # fmt: skip
                live.append(next_id)
            elif action < 0.8 and live:
                popped = queue.pop()
                assert popped is not None and popped[1] in live
                live.remove(popped[1])
            elif action < 0.9 and live:
                gone = rng.choice(live)
                assert queue.remove(gone)
                live.remove(gone)
            elif live:
                popped = queue.pop()
                assert popped is not None
                queue.push_front(popped[0], popped[1])
        expected = queue.order()
        assert sorted(expected) == sorted(live) and len(queue) == len(live)
        assert [p[1] for p in iter(queue.pop, None)] == expected


def test_a_server_that_was_busy_earlier_is_not_starved_when_it_comes_back() -> None:
    queue = FairQueue()
    for job in range(100):  # server 1 alone for a while
        queue.push(1, job, group=1)
        assert queue.pop() == (1, job)
    for job in range(100, 110):  # then server 2 alone
        queue.push(2, job, group=2)
    assert queue.pop() == (2, 100)
    queue.push(1, 999, group=1)  # server 1 is back: it joins where the line is, not 100 jobs behind

    assert queue.order().index(999) <= 1
