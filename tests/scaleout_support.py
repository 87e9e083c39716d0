"""Scale-out test parts: real `fluxbot worker` processes on the tiny model, sharing the test Redis."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import redis.asyncio as aioredis

from bot.services.wire import worker_key
from bot.services.workers import WorkerInfo
from tests.services import REDIS_URL

HEARTBEAT_S = 0.3
DEAD_AFTER_S = 1.5


def worker_env(data_dir: Path, presets: Path, loras: Path, tiny_dir: Path, **extra: str) -> dict[str, str]:
    (data_dir / "models").mkdir(parents=True, exist_ok=True)
    if not (data_dir / "models" / "tiny-flux1").exists():  # reuse the session's tiny model
        os.symlink(tiny_dir, data_dir / "models" / "tiny-flux1")
    return {
        **os.environ,
        "FLUXBOT_CONFIG": str(data_dir / "absent.toml"),
        "FLUXBOT_QUEUE": REDIS_URL,
        "FLUXBOT_DATA_DIR": str(data_dir),
        "FLUXBOT_ENGINE__PRESETS_FILE": str(presets),
        "FLUXBOT_ENGINE__LORAS_FILE": str(loras),
        "FLUXBOT_WORKERS__HEARTBEAT_S": str(HEARTBEAT_S),
        "FLUXBOT_WORKERS__DEAD_AFTER_S": str(DEAD_AFTER_S),
        "FLUXBOT_SHUTDOWN_GRACE_S": "20",
        "FLUXBOT_LOG_LEVEL": "INFO",
        # Two workers share this machine's cores: one thread each keeps them from fighting.
        "OMP_NUM_THREADS": "1",
        **extra,
    }


class WorkerProcess:
    """`fluxbot worker --name NAME` as a real process; its log goes to a file for failed tests."""

    def __init__(self, name: str, env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.env = env
        self.log_path = log_dir / f"worker-{name}.log"
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def start(self) -> None:
        log = self.log_path.open("ab")
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "fluxbot.cli",
            "worker",
            "--name",
            self.name,
            env=self.env,
            cwd=self.log_path.parent,  # not the repository: the installed package must run anywhere
            stdout=log,
            stderr=log,
        )
        log.close()

    async def wait_ready(self, timeout: float = 120) -> WorkerInfo:
        client = aioredis.Redis.from_url(REDIS_URL)
        try:
            async with asyncio.timeout(timeout):
                while True:
                    if self.proc is not None and self.proc.returncode is not None:
                        raise RuntimeError(f"worker {self.name} exited: {self.log_path.read_text()[-2000:]}")
                    raw = await client.get(worker_key(self.name))
                    if raw is not None:
                        return WorkerInfo.model_validate_json(raw)
                    await asyncio.sleep(0.1)
        finally:
            await client.aclose()

    def kill(self) -> None:
        """kill -9: no drain, no goodbye; the bot must notice by the missing heartbeat."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)

    async def terminate(self, timeout: float = 60) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            self.proc.kill()
            raise RuntimeError(
                f"worker {self.name} ignored SIGTERM: {self.log_path.read_text()[-2000:]}"
            ) from None

    async def reap(self) -> None:
        if self.proc is not None:
            if self.proc.returncode is None:
                self.proc.kill()
            await self.proc.wait()
