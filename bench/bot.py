"""Bot benchmark against the fake Discord server on the tiny model: prints figures, asserts nothing.

1. Ack latency: with the engine saturated by running jobs, the time from INTERACTION_CREATE (sent by
   the fake server) to the bot's ack request, over >= 200 /imagine interactions from >= 20 users
   (goal p99 < 250 ms; Discord's hard limit is 3 s).
2. Per-job overhead: interaction to delivered PNG, minus the engine's own time for that job.
3. Engine duty cycle under a backlog: 30 tiny jobs queued back to back through the bot; the engine's
   busy time (its own timings) over the time from its first job's start to its last job's end (goal
   >= 0.98); also over the whole drain, the last delivery included, and the same 30 requests on the
   engine alone, side by side.

The fake Discord runs on an event loop of its own in another thread (Discord is not on the bot's
loop in production); --same-loop puts it on the bot's loop, as the figures before 2026-12-04 evening.

Run: python bench/bot.py [--interactions 200] [--users 20] [--same-loop]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import start_bot

from bot.services.studio import Requester
from fluxbot.settings import LimitSettings
from tests.discord_support import has_result

PRESETS = """
[dev]
steps = 20
steps_range = [1, 60]
guidance = 3.5
guidance_range = [1.0, 10.0]
width = 512
height = 512
megapixels_range = [0.001, 2.1]
"""


def opt(name: str, value: Any, kind: int = 3) -> dict[str, Any]:
    return {"name": name, "type": kind, "value": value}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def main(interactions: int, users: int, backlog: int, same_loop: bool) -> None:
    bench = await start_bot(
        PRESETS,
        LimitSettings(jobs_per_window=1000, window_s=60, max_queued_per_user=100, max_queue=10_000),
        fake_in_thread=not same_loop,
    )
    fake, bot, on_fake = bench.fake, bench.bot, bench.on_fake
    print(f"fake Discord {'on the bot loop' if same_loop else 'on its own loop and thread'}")
    assert bot.app is not None

    # 2. per-job overhead first, on an idle engine.
    overheads, engine_times = [], []
    for i in range(5):
        sent = time.monotonic()
        token = await on_fake(
            fake.slash("imagine", [opt("prompt", f"a lighthouse {i}")], fake.member(1, "solo"))
        )
        await on_fake(fake.wait_for(lambda t=token: has_result(fake.original(t)), timeout=120))
        total = time.monotonic() - sent
        job = (await bot.app.jobs.history(1, 1, 1))[0][0]
        engine_s = (job.timings or {})["total_s"]
        overheads.append(total - engine_s)
        engine_times.append(engine_s)

    # 1. ack latency with the engine busy: a long job runs, then a burst from many users.
    busy = await on_fake(
        fake.slash(
            "imagine",
            [opt("prompt", "keep the engine busy"), opt("steps", 60, 4), opt("size", "1024x1024")],
            fake.member(2, "busy"),
        )
    )
    await on_fake(fake.wait_for(lambda: (m := fake.original(busy)) and "steps" in m["content"], timeout=120))
    tokens = []
    for i in range(interactions):
        member = fake.member(1000 + i % users, f"user{i % users}")
        tokens.append(await on_fake(fake.slash("imagine", [opt("prompt", f"a cat number {i}")], member)))
        await asyncio.sleep(0.01)
    await on_fake(fake.wait_for(lambda: all(fake.response_to(t) for t in tokens), timeout=300))
    engine_busy = bool(bot.app.queue.running)
    acks = []
    for token in tokens:
        acks.append((fake.callbacks[token].at - fake.interaction_sent_at[token]) * 1000)

    print(f"1. ack latency, {interactions} /imagine from {users} users, engine busy: {engine_busy}")
    print(
        f"   p50 {percentile(acks, 0.5):7.1f} ms   p99 {percentile(acks, 0.99):7.1f} ms   "
        f"max {max(acks):7.1f} ms   (goal p99 < 250 ms)"
    )
    print(
        f"2. per-job overhead (interaction to PNG delivered, less engine time), {len(overheads)} jobs 512x512"
    )
    print(
        f"   engine {statistics.median(engine_times) * 1000:7.1f} ms   bot overhead "
        f"{statistics.median(overheads) * 1000:7.1f} ms (median)"
    )

    await bot.app.queue.wait_idle(600)
    duty, end_to_end, through_bot_s, alone_s = await duty_cycle(bench, backlog)
    print(f"3. engine duty cycle under a backlog of {backlog} jobs (steps 8, 256x256)")
    print(f"engine duty cycle {duty:.3f}")
    print(
        f"   busy / whole drain (first resume to last delivery) {end_to_end:.3f}   "
        f"wall through the bot {through_bot_s:6.2f} s   engine alone {alone_s:6.2f} s   "
        f"ratio {through_bot_s / alone_s:.3f}   (goal duty >= 0.98)"
    )

    await bot.app.admin.pause(Requester(user_id=0), True)
    await bench.stop()


async def duty_cycle(bench: Any, jobs: int) -> tuple[float, float, float, float]:
    """The engine's busy time (its own timings) over the time from its first job's start to its last
    job's end while the bot drains a backlog; the wall time of the whole drain, deliveries included;
    and the same requests on the engine alone, side by side."""
    app = bench.bot.app
    options = [opt("steps", 8, 4), opt("size", "256x256")]
    app.queue.pause()  # the whole backlog is stored first, so the engine never waits for admission
    fake = bench.fake
    tokens = [
        await bench.on_fake(
            fake.slash("imagine", [opt("prompt", f"backlog {i}"), *options], fake.member(3, "b"))
        )
        for i in range(jobs)
    ]
    await bench.on_fake(fake.wait_for(lambda: all(fake.response_to(t) for t in tokens), timeout=120))
    started = time.monotonic()
    app.queue.resume()
    await app.queue.wait_idle(600)
    through_bot = time.monotonic() - started
    backlog = sorted((await app.jobs.history(3, 1, jobs))[0], key=lambda job: job.id)
    busy = sum(float((job.timings or {})["total_s"]) for job in backlog)
    first, last = backlog[0], backlog[-1]
    assert first.started_at is not None and last.started_at is not None
    window = (last.started_at - first.started_at).total_seconds() + float((last.timings or {})["total_s"])

    started = time.monotonic()
    for job in backlog:
        await asyncio.to_thread(app.engine.draw, [job.spec])
    alone = time.monotonic() - started
    return busy / window, busy / through_bot, through_bot, alone


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--interactions", type=int, default=200)
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--backlog", type=int, default=30)
    parser.add_argument("--same-loop", action="store_true", help="the fake Discord on the bot's loop")
    args = parser.parse_args()
    asyncio.run(main(args.interactions, args.users, args.backlog, args.same_loop))
