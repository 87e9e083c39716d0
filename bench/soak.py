"""Soak: N simulated users against the fake Discord server on the tiny model for a fixed time.

Prints jobs accepted, completed, refused by limits, lost (must be 0), ack latency, and the bot's
RSS over the run (goal: flat after warm-up). Run: python bench/soak.py [--users 50] [--seconds 60]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import start_bot

from bot.store.models import JobStatus
from engine.info import process_rss
from fluxbot.settings import LimitSettings
from tests.discord_support import has_result
from tests.fake_discord import FakeDiscord

PRESETS = """
[dev]
steps = 8
steps_range = [1, 20]
guidance = 3.5
guidance_range = [1.0, 10.0]
width = 128
height = 128
megapixels_range = [0.001, 2.1]
"""
SIZES = ["64x64", "128x128", "192x192", "256x256"]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else 0.0


async def user(fake: FakeDiscord, user_id: int, until: float, tokens: list[str], rng: random.Random) -> None:
    member = fake.member(user_id, f"user{user_id}")
    while time.monotonic() < until:
        await asyncio.sleep(rng.uniform(0.5, 4.0))
        options = [
            {"name": "prompt", "type": 3, "value": f"a {rng.choice(['cat', 'dog', 'fox'])} {len(tokens)}"},
            {"name": "size", "type": 3, "value": rng.choice(SIZES)},
        ]
        tokens.append(await fake.slash("imagine", options, member))


async def main(users: int, seconds: float) -> None:
    # The shipped default limits: 5 jobs/min and 3 queued per user.
    bench = await start_bot(PRESETS, LimitSettings(), keep_payloads=False)
    fake = bench.fake

    rng = random.Random(7)
    tokens: list[str] = []
    start = time.monotonic()
    rss: list[tuple[float, int]] = []

    async def sample() -> None:
        while True:
            rss.append((time.monotonic() - start, process_rss()))
            await asyncio.sleep(2)

    sampler = asyncio.create_task(sample())
    await asyncio.gather(*(user(fake, 5000 + i, start + seconds, tokens, rng) for i in range(users)))
    await fake.wait_for(lambda: all(fake.response_to(t) for t in tokens), timeout=120)
    app = bench.bot.app
    assert app is not None
    await asyncio.sleep(1)  # a refusal deletes its deferred message and follows up just after the ack
    drained = True
    try:
        await app.queue.wait_idle(300)
    except TimeoutError:
        drained = False
    sampler.cancel()
    # Counted from the database (the record of what was accepted) and from what the fake received.
    jobs = await app.jobs.since(datetime(2000, 1, 1, tzinfo=UTC))
    accepted = len(jobs)
    refused = len(tokens) - accepted
    shown = {m["id"] for m in fake.messages.values() if has_result(m)}
    completed = sum(
        1 for j in jobs if j.status == JobStatus.DONE and j.delivered and str(j.result_message_id) in shown
    )
    acks = [(fake.callbacks[t].at - fake.interaction_sent_at[t]) * 1000 for t in tokens]
    warm = [r for at, r in rss if at >= seconds * 0.2]
    print(
        f"soak: {users} users for {seconds:.0f} s on the tiny model (limits: 5 jobs/min, 3 queued per user)"
    )
    lost = f"{accepted - completed}" + ("" if drained else " (drain timed out)")
    print(
        f"   interactions {len(tokens)}   accepted {accepted}   completed {completed}   "
        f"refused by limits {refused}   lost {lost}"
    )
    print(
        f"   ack latency p50 {percentile(acks, 0.5):.1f} ms   p99 {percentile(acks, 0.99):.1f} ms   "
        f"max {max(acks, default=0):.1f} ms"
    )
    if warm:
        marks = [
            warm[min(len(warm) - 1, round(q * (len(warm) - 1)))] / 2**20 for q in (0, 0.25, 0.5, 0.75, 1)
        ]
        trend = " -> ".join(f"{m:.0f}" for m in marks)
        top = max(warm) / 2**20
        print(f"   RSS after warm-up, at each quarter: {trend} MiB (max {top:.0f} MiB, {len(rss)} samples)")
    await bench.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=60)
    args = parser.parse_args()
    asyncio.run(main(args.users, args.seconds))
