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


def test_jobs_on_the_same_extra_model_run_together_when_fairness_allows() -> None:
    # Five members, one job each, in line in this order; Kontext (K) is on the GPU after the last job,
    # so Fill (F) jobs would swap it out. A job is passed over once at most: Fill 11 goes second.
    fill = {11, 33}
    fair = queue_of((1, 11), (2, 22), (3, 33), (4, 44), (5, 55))
    kontext_on_gpu = fill.__contains__

    order = [fair.pop(avoid=kontext_on_gpu) for _ in range(5)]

    assert [job for _, job in order if job] == [22, 11, 44, 33, 55]


def test_a_passed_over_job_is_not_starved_by_members_who_keep_arriving() -> None:
    fair = queue_of((1, 11))
    kontext = set()
    for n in range(50):  # before each pop a new member arrives with a job on the model on the GPU
        fair.push(100 + n, 1000 + n)
        kontext.add(1000 + n)
        popped = fair.pop(avoid=lambda job: job not in kontext)
        if popped == (1, 11):
            break
    assert n <= 1, f"the Fill job waited {n + 1} pops"


def test_a_member_passed_over_is_not_passed_over_again_by_the_same_member() -> None:
    # Member 2's Kontext jobs go first once; member 1's Fill job is next in line after that, even
    # though it still swaps: 2's pass is now a whole job above 1's.
    fair = queue_of((1, 11), (2, 21), (2, 22), (2, 23))
    avoid_fill = {11}.__contains__

    assert [fair.pop(avoid=avoid_fill) for _ in range(4)] == [(2, 21), (1, 11), (2, 22), (2, 23)]


def test_avoidance_never_crosses_a_gap_of_a_whole_job() -> None:
    fair = queue_of((1, 11), (1, 12), (2, 21))
    assert fair.pop() == (1, 11)  # member 1 served once: a whole job ahead of member 2

    # Member 2 is next; its job swaps, but member 1 is a whole job ahead: no skip.
    assert fair.pop(avoid={21}.__contains__) == (2, 21)
