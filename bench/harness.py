"""What bench/bot.py and bench/soak.py share: the real bot on the tiny model against the fake Discord."""

from __future__ import annotations

import asyncio
import sys
import tempfile
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fluxbot.logs import quiet

quiet("discord", "alembic", "aiohttp.access", "bot", "engine")

from bot.client import FluxBot, build_bot  # noqa: E402
from engine.engine import FluxEngine  # noqa: E402
from engine.settings import EngineSettings  # noqa: E402
from fluxbot.settings import LimitSettings, Settings  # noqa: E402
from tests.fake_discord import GUILD_ID, FakeDiscord  # noqa: E402

__all__ = ["GUILD_ID", "BenchBot", "start_bot"]
T = TypeVar("T")


@dataclass
class BenchBot:
    fake: FakeDiscord
    bot: FluxBot
    task: asyncio.Task[None]
    # With fake_loop, the fake Discord runs on an event loop of its own, in its own thread, as the
    # real Discord runs elsewhere: the bot's loop then does only the bot's work.
    fake_loop: asyncio.AbstractEventLoop | None = None
    fake_thread: threading.Thread | None = field(default=None, repr=False)

    async def on_fake(self, work: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine of the fake server (slash, wait_for, ...) where the server lives."""
        if self.fake_loop is None:
            return await work
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(work, self.fake_loop))

    async def stop(self) -> None:
        await self.bot.close()
        await self.task
        await self.on_fake(self.fake.stop())
        if self.fake_loop is not None and self.fake_thread is not None:
            self.fake_loop.call_soon_threadsafe(self.fake_loop.stop)
            self.fake_thread.join(10)


async def start_bot(
    presets: str, limits: LimitSettings, keep_payloads: bool = True, fake_in_thread: bool = False
) -> BenchBot:
    work = Path(tempfile.mkdtemp())
    (work / "presets.toml").write_text(presets)
    (work / "loras.toml").write_text("")
    fake = FakeDiscord(keep_payloads=keep_payloads)
    fake_loop: asyncio.AbstractEventLoop | None = None
    fake_thread: threading.Thread | None = None
    if fake_in_thread:
        fake_loop = asyncio.new_event_loop()
        fake_thread = threading.Thread(target=fake_loop.run_forever, name="fake-discord", daemon=True)
        fake_thread.start()
        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(fake.start(), fake_loop))
    else:
        await fake.start()
    settings = Settings(
        data_dir=work,
        discord_api_base=fake.api_base,
        discord_gateway_url=fake.gateway_url,
        metrics_port=None,
        engine=EngineSettings(
            model="tiny", presets_file=work / "presets.toml", loras_file=work / "loras.toml"
        ),
        limits=limits,
    )
    engine = await asyncio.to_thread(FluxEngine.load, settings.engine, work)
    bot = await build_bot(settings, engine)
    task = asyncio.create_task(bot.start("bench-token"))
    await asyncio.wait_for(bot.wait_until_ready(), 120)
    return BenchBot(fake, bot, task, fake_loop, fake_thread)
