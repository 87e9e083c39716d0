"""Scale-out: jobs per minute with 1, 2 and 4 `fluxbot worker` processes, and what the Redis path adds.

    .venv/bin/python bench/scale.py [--jobs 24] [--workers 1,2,4] [--latency-runs 20]

Needs Redis on 127.0.0.1 (tests/services.sh starts it). Each worker is a real process on the tiny
model with one torch thread; the bot side runs in this process with the RedisJobQueue. The latency
part runs the same small job one at a time through the local queue (engine in this process, one
thread) and through Redis with one worker, side by side in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fluxbot.logs import quiet

quiet("alembic", "bot", "engine", "arq")

import torch  # noqa: E402

from bot.app import App, build_app  # noqa: E402
from bot.services.studio import Requester  # noqa: E402
from engine.api import GenerationRequest  # noqa: E402
from engine.settings import EngineSettings  # noqa: E402
from engine.tiny import ensure_tiny_model  # noqa: E402
from fluxbot.settings import LimitSettings, Settings, WorkerSettings  # noqa: E402
from tests.bot_support import RecordingEvents  # noqa: E402
from tests.conftest import FAST_PRESETS  # noqa: E402
from tests.scaleout_support import DEAD_AFTER_S, HEARTBEAT_S, WorkerProcess, worker_env  # noqa: E402
from tests.services import REDIS_URL, flush_redis, require_redis  # noqa: E402

THROUGHPUT_JOB = {"size": "256x256", "steps": 12}
LATENCY_JOB = {"size": "64x64", "steps": 4}
USERS = 4


def settings_for(work: Path, queue: str) -> Settings:
    return Settings(
        data_dir=work / f"bot-{queue[:5]}",
        database_url=f"sqlite+aiosqlite:///{work / f'bot-{time.monotonic_ns()}.db'}",
        queue=queue,
        metrics_port=None,
        limits=LimitSettings(jobs_per_window=1000, window_s=60, max_queued_per_user=100, max_queue=10_000),
        workers=WorkerSettings(heartbeat_s=HEARTBEAT_S, dead_after_s=DEAD_AFTER_S),
        engine=EngineSettings(
            model="tiny", presets_file=work / "presets.toml", loras_file=work / "loras.toml"
        ),
    )


async def start_workers(work: Path, tiny: Path, count: int) -> list[WorkerProcess]:
    workers = [
        WorkerProcess(
            f"bench{i}", worker_env(work / f"w{i}", work / "presets.toml", work / "loras.toml", tiny), work
        )
        for i in range(count)
    ]
    for worker in workers:
        await worker.start()
    await asyncio.gather(*(worker.wait_ready() for worker in workers))
    return workers


async def stop_workers(workers: list[WorkerProcess]) -> None:
    await asyncio.gather(*(worker.terminate() for worker in workers))


async def burst(app: App, jobs: int) -> float:
    """Seconds from the first submission until the last job is done."""
    started = time.perf_counter()
    for i in range(jobs):
        who = Requester(user_id=1 + i % USERS, user_name="bench")
        await app.studio.imagine(who, GenerationRequest(prompt=f"bench {i}", seed=i, **THROUGHPUT_JOB))
    await app.queue.wait_idle(3600)
    return time.perf_counter() - started


async def one_at_a_time(app: App, runs: int) -> tuple[list[float], list[float]]:
    """Per job: wall time from submission to done, and the engine's own time for it."""
    walls, engine = [], []
    for i in range(runs):
        started = time.perf_counter()
        ticket = await app.studio.imagine(
            Requester(user_id=1, user_name="bench"),
            GenerationRequest(prompt=f"lat {i}", seed=i, **LATENCY_JOB),
        )
        await app.queue.wait_idle(120)
        walls.append(time.perf_counter() - started)
        job = await app.jobs.get(ticket.job_id)
        assert job is not None and job.timings is not None, job
        engine.append(float(job.timings["total_s"]))
    return walls[2:], engine[2:]  # the first runs warm caches on either path


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=24)
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--latency-runs", type=int, default=20)
    args = parser.parse_args()
    require_redis()
    torch.set_num_threads(1)  # the local engine gets what one worker gets
    work = Path(tempfile.mkdtemp(prefix="fluxbot-scale-"))
    (work / "presets.toml").write_text(FAST_PRESETS)
    (work / "loras.toml").write_text("")
    tiny = ensure_tiny_model(work / "models" / "tiny-flux1")

    print(f"throughput: {args.jobs} jobs of {THROUGHPUT_JOB} from {USERS} users; one torch thread per worker")
    per_minute: dict[int, float] = {}
    for count in (int(n) for n in args.workers.split(",")):
        flush_redis()
        workers = await start_workers(work, tiny, count)
        app = await build_app(settings_for(work, REDIS_URL), RecordingEvents())
        await app.start()
        try:
            await burst(app, 2 * count)  # warm-up: every worker has run a job
            seconds = await burst(app, args.jobs)
        finally:
            await app.close()
            await stop_workers(workers)
        per_minute[count] = args.jobs * 60 / seconds
        ratio = per_minute[count] / per_minute[min(per_minute)]
        print(f"  {count} worker(s): {per_minute[count]:7.1f} jobs/min  ({ratio:.2f}x of 1 worker)")

    print(f"latency: {args.latency_runs} single {LATENCY_JOB} jobs, one at a time, submit -> done")
    local = await build_app(settings_for(work, "local"), RecordingEvents())
    await local.start()
    try:
        local_wall, local_engine = await one_at_a_time(local, args.latency_runs)
    finally:
        await local.close()
    flush_redis()
    workers = await start_workers(work, tiny, 1)
    remote = await build_app(settings_for(work, REDIS_URL), RecordingEvents())
    await remote.start()
    try:
        redis_wall, redis_engine = await one_at_a_time(remote, args.latency_runs)
    finally:
        await remote.close()
        await stop_workers(workers)
    med = statistics.median
    local_over = med(w - e for w, e in zip(local_wall, local_engine, strict=True))
    redis_over = med(w - e for w, e in zip(redis_wall, redis_engine, strict=True))
    print(
        f"  local: median {med(local_wall) * 1000:6.1f} ms per job, engine {med(local_engine) * 1000:6.1f} ms"
    )
    print(
        f"  redis: median {med(redis_wall) * 1000:6.1f} ms per job, engine {med(redis_engine) * 1000:6.1f} ms"
    )
    print(
        f"  outside the engine: local {local_over * 1000:.1f} ms, redis {redis_over * 1000:.1f} ms: "
        f"the Redis path adds {(redis_over - local_over) * 1000:.1f} ms per job"
    )


if __name__ == "__main__":
    asyncio.run(main())
