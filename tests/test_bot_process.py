"""The bot as a real process (`fluxbot run`) against the fake Discord: SIGTERM and kill -9 lose no job."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.bot_support import write_lock
from tests.discord_support import has_result
from tests.fake_discord import FakeDiscord
from tests.scaleout_support import DEAD_AFTER_S, HEARTBEAT_S, WorkerProcess, worker_env
from tests.services import REDIS_URL, database_url_for_test, flush_redis, require_redis

pytestmark = pytest.mark.usefixtures("database_backend")  # on SQLite and on PostgreSQL

ALICE, BOB = 111000000000000001, 111000000000000002


class BotProcess:
    def __init__(self, fake: FakeDiscord, data_dir: Path, presets: Path, tiny_data: Path) -> None:
        loras = data_dir / "loras.toml"
        loras.parent.mkdir(parents=True, exist_ok=True)
        loras.write_text("")
        (data_dir / "models").mkdir(exist_ok=True)
        if not (data_dir / "models" / "tiny-flux1").exists():  # reuse the session's tiny model
            os.symlink(tiny_data, data_dir / "models" / "tiny-flux1")
        self.fake = fake
        self.env = {
            **os.environ,
            "FLUXBOT_DISCORD_TOKEN": "process-token",
            "FLUXBOT_DISCORD_API_BASE": fake.api_base,
            "FLUXBOT_DISCORD_GATEWAY_URL": fake.gateway_url,
            "FLUXBOT_DATA_DIR": str(data_dir),
            "FLUXBOT_ENGINE__PRESETS_FILE": str(presets),
            "FLUXBOT_ENGINE__LORAS_FILE": str(loras),
            "FLUXBOT_CONFIG": str(data_dir / "absent.toml"),
            "FLUXBOT_LIMITS__MAX_QUEUED_PER_USER": "10",
            "FLUXBOT_SHUTDOWN_GRACE_S": "20",
            "FLUXBOT_PROGRESS_INTERVAL_S": "0.2",
            "FLUXBOT_METRICS_PORT": "0",
            "FLUXBOT_DATABASE_URL": database_url_for_test(data_dir),
        }
        self.proc: asyncio.subprocess.Process | None = None
        # A file, not a pipe nobody reads: a chatty bot must never block on a full pipe.
        self.log_path = data_dir.parent / "bot.log"

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""

    async def start(self) -> None:
        self.fake.identified.clear()
        log = self.log_path.open("ab")
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "fluxbot.cli",
            "run",
            env=self.env,
            cwd=self.log_path.parent,  # not the repository: the installed package must run anywhere
            stdout=log,
            stderr=log,
        )
        log.close()
        await asyncio.wait_for(self.fake.identified.wait(), 120)

    async def signal(self, sig: int) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        code = await asyncio.wait_for(self.proc.wait(), 60)
        self.proc = None
        return code

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


def opt(name: str, value: Any, kind: int = 3) -> dict[str, Any]:
    return {"name": name, "type": kind, "value": value}


async def delivered(fake: FakeDiscord, tokens: list[str]) -> bool:
    await fake.wait_for(lambda: all(has_result(fake.original(t)) for t in tokens), timeout=120)
    return True


@pytest.fixture
async def bot_process(
    fake: FakeDiscord, tmp_path: Path, presets_file: Path, tiny_dir: Path
) -> AsyncIterator[BotProcess]:
    process = BotProcess(fake, tmp_path / "data", presets_file, tiny_dir)
    yield process
    await process.stop()
    print(f"--- the bot's log (shown when the test failed) ---\n{process.log_tail()}")


async def test_kill_9_at_any_moment_loses_no_accepted_job(bot_process: BotProcess, fake: FakeDiscord) -> None:
    await bot_process.start()
    slow = [opt("steps", 40, 4), opt("size", "512x512")]
    tokens = [
        await fake.slash(
            "imagine", [opt("prompt", f"a fox {i}"), *slow], fake.member(ALICE if i % 2 else BOB, "u")
        )
        for i in range(4)
    ]
    await fake.wait_for(lambda: all(fake.response_to(t) for t in tokens))
    await fake.wait_for(lambda: any((m := fake.original(t)) and "steps" in m["content"] for t in tokens))

    assert await bot_process.signal(signal.SIGKILL) == -signal.SIGKILL
    await bot_process.start()

    assert await delivered(fake, tokens)


async def test_sigterm_finishes_or_requeues_the_running_job_and_exits_0(
    bot_process: BotProcess, fake: FakeDiscord
) -> None:
    await bot_process.start()
    tokens = [
        await fake.slash(
            "imagine",
            [opt("prompt", f"an owl {i}"), opt("steps", 30, 4), opt("size", "512x512")],
            fake.member(ALICE, "alice"),
        )
        for i in range(3)
    ]
    await fake.wait_for(lambda: all(fake.response_to(t) for t in tokens))
    await fake.wait_for(lambda: (m := fake.original(tokens[0])) and "steps" in m["content"])

    assert await bot_process.signal(signal.SIGTERM) == 0
    await bot_process.start()

    assert await delivered(fake, tokens)


async def test_kill_9_right_after_the_acknowledgements_loses_none(
    bot_process: BotProcess, fake: FakeDiscord
) -> None:
    await bot_process.start()
    members = [fake.member(ALICE, "alice"), fake.member(BOB, "bob"), fake.member(ALICE, "alice")]
    tokens = await asyncio.gather(
        *(fake.slash("imagine", [opt("prompt", f"a quick fox {i}")], m) for i, m in enumerate(members))
    )
    await fake.wait_for(lambda: all(fake.response_to(t) for t in tokens), timeout=30)

    assert await bot_process.signal(signal.SIGKILL) == -signal.SIGKILL  # the instant the last ack is out
    await bot_process.start()

    assert await delivered(fake, list(tokens))


@pytest.fixture
async def redis_worker(
    bot_process: BotProcess, tmp_path: Path, presets_file: Path, tiny_dir: Path
) -> AsyncIterator[WorkerProcess]:
    """Scale-out mode: a real `fluxbot worker` drawing, and the bot process set to dispatch to it."""
    require_redis()
    flush_redis()
    loras = tmp_path / "data" / "loras.toml"
    worker = WorkerProcess("w-proc", worker_env(tmp_path / "worker", presets_file, loras, tiny_dir), tmp_path)
    bot_process.env |= {
        "FLUXBOT_QUEUE": REDIS_URL,
        "FLUXBOT_WORKERS__HEARTBEAT_S": str(HEARTBEAT_S),
        "FLUXBOT_WORKERS__DEAD_AFTER_S": str(DEAD_AFTER_S),
    }
    await worker.start()
    try:
        await worker.wait_ready()
        yield worker
    finally:
        await worker.reap()
        print(f"--- the worker's log ---\n{worker.log_path.read_text(errors='replace')[-3000:]}")


def uploads_per_token(fake: FakeDiscord, tokens: list[str]) -> Counter[str]:
    return Counter(t for c in fake.calls if c.carries_result for t in tokens if t in c.path)


async def test_kill_9_right_after_the_acknowledgements_loses_none_in_redis_mode(
    bot_process: BotProcess, fake: FakeDiscord, redis_worker: WorkerProcess
) -> None:
    """The same with a `fluxbot worker` drawing: the restarted bot finds the jobs in the store, and the
    one the worker was drawing in its dispatch record, and delivers each once."""
    await bot_process.start()
    members = [fake.member(ALICE, "alice"), fake.member(BOB, "bob"), fake.member(ALICE, "alice")]
    tokens = await asyncio.gather(
        *(fake.slash("imagine", [opt("prompt", f"a redis fox {i}")], m) for i, m in enumerate(members))
    )
    await fake.wait_for(lambda: all(fake.response_to(t) for t in tokens), timeout=30)

    assert await bot_process.signal(signal.SIGKILL) == -signal.SIGKILL
    await bot_process.start()

    assert await delivered(fake, list(tokens))
    assert set(uploads_per_token(fake, list(tokens)).values()) == {1}


async def sigterm_during_a_slow_upload(bot_process: BotProcess, fake: FakeDiscord) -> None:
    await bot_process.start()
    fake.upload_delay_s = 4.0  # Discord takes 4 s to take the PNG
    token = await fake.slash("imagine", [opt("prompt", "a slow upload")], fake.member(ALICE, "alice"))
    await fake.wait_for(lambda: any(c.carries_result and token in c.path for c in fake.calls), timeout=60)

    assert await bot_process.signal(signal.SIGTERM) == 0

    message = fake.original(token)
    assert message is not None and message["attachments"], "the upload finished before the exit"
    assert uploads_per_token(fake, [token]) == Counter({token: 1})


async def sigterm_with_the_database_locked(bot_process: BotProcess, fake: FakeDiscord) -> None:
    """The job finishes while the bot cannot write it down and is asked to stop: the bot exits within
    its grace, the job waits (in the store, or its outcome in Redis) and the next start delivers it."""
    bot_process.env["FLUXBOT_SHUTDOWN_GRACE_S"] = "3"
    await bot_process.start()
    token = await fake.slash(
        "imagine",
        [opt("prompt", "a locked owl"), opt("steps", 30, 4), opt("size", "384x384")],
        fake.member(ALICE, "alice"),
    )
    await fake.wait_for(lambda: (m := fake.original(token)) and "steps" in m["content"], timeout=60)

    async with write_lock(bot_process.env["FLUXBOT_DATABASE_URL"]):
        stopping = time.monotonic()
        code = await bot_process.signal(signal.SIGTERM)
        took = time.monotonic() - stopping
    await bot_process.start()

    assert code == 0 and took < 3 + 10, f"exited {code} after {took:.1f} s"
    assert await delivered(fake, [token])
    assert uploads_per_token(fake, [token]) == Counter({token: 1})


async def test_sigterm_during_a_slow_upload_delivers_it_before_exiting(
    bot_process: BotProcess, fake: FakeDiscord
) -> None:
    await sigterm_during_a_slow_upload(bot_process, fake)


async def test_sigterm_during_a_slow_upload_delivers_it_before_exiting_in_redis_mode(
    bot_process: BotProcess, fake: FakeDiscord, redis_worker: WorkerProcess
) -> None:
    await sigterm_during_a_slow_upload(bot_process, fake)


async def test_sigterm_with_the_database_locked_exits_within_grace_and_loses_nothing(
    bot_process: BotProcess, fake: FakeDiscord
) -> None:
    await sigterm_with_the_database_locked(bot_process, fake)


async def test_sigterm_with_the_database_locked_in_redis_mode_exits_within_grace_and_loses_nothing(
    bot_process: BotProcess, fake: FakeDiscord, redis_worker: WorkerProcess
) -> None:
    await sigterm_with_the_database_locked(bot_process, fake)


async def test_debug_log_never_holds_an_interaction_token(bot_process: BotProcess, fake: FakeDiscord) -> None:
    bot_process.env["FLUXBOT_LOG_LEVEL"] = "DEBUG"  # discord.py then logs gateway events and webhook URLs
    await bot_process.start()
    tokens = [
        await fake.slash("imagine", [opt("prompt", f"a newt {i}")], fake.member(ALICE, "a")) for i in range(2)
    ]
    assert await delivered(fake, tokens)
    assert await bot_process.signal(signal.SIGTERM) == 0

    log = bot_process.log_path.read_text(errors="replace")
    assert "DEBUG" in log and "[redacted]" in log  # it did log the requests, without their secrets
    for secret in [*tokens, "process-token"]:
        assert secret not in log


async def test_a_busy_metrics_port_is_named_in_one_line(bot_process: BotProcess, fake: FakeDiscord) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        bot_process.env["FLUXBOT_METRICS_PORT"] = str(taken.getsockname()[1])
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "fluxbot.cli",
            "run",
            env=bot_process.env,
            cwd=bot_process.log_path.parent,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await asyncio.wait_for(proc.communicate(), 120)

    errors = [line for line in err.decode().splitlines() if line.startswith("fluxbot:")]
    assert proc.returncode == 1, err.decode()
    assert len(errors) == 1 and "metrics_port" in errors[0] and "not free" in errors[0], errors
    assert "cannot reach Discord" not in err.decode()


def mapped_libraries(pid: int) -> str:
    """The shared libraries a running process has loaded (Linux)."""
    return Path(f"/proc/{pid}/maps").read_text()


async def test_the_bot_in_redis_mode_never_loads_torch(
    bot_process: BotProcess, fake: FakeDiscord, redis_worker: WorkerProcess
) -> None:
    """With the engines in workers, the bot only talks to Discord, Redis and the database: a job goes
    all the way through it, and torch was never imported (its libraries are never mapped into the
    process; diffusers and transformers import torch themselves)."""
    bot_process.env["FLUXBOT_LOG_LEVEL"] = "DEBUG"
    await bot_process.start()
    token = await fake.slash("imagine", [opt("prompt", "a fox without torch")], fake.member(ALICE, "alice"))
    assert await delivered(fake, [token])
    assert bot_process.proc is not None

    maps = mapped_libraries(bot_process.proc.pid)

    assert "libtorch" not in maps and "libc10" not in maps, "the bot process loaded torch"
    assert "libtorch" in mapped_libraries(redis_worker.pid), "the check itself sees torch where it is"
