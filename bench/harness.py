"""What bench/bot.py and bench/soak.py share: the real bot on the tiny model against the fake Discord."""

from __future__ import annotations

import asyncio
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fluxbot.logs import quiet

quiet("discord", "alembic", "aiohttp.access", "bot", "engine")

from bot.client import FluxBot, point_at  # noqa: E402
from engine.engine import FluxEngine  # noqa: E402
from engine.settings import EngineSettings  # noqa: E402
from fluxbot.settings import LimitSettings, Settings  # noqa: E402
from tests.fake_discord import GUILD_ID, FakeDiscord  # noqa: E402

__all__ = ["GUILD_ID", "BenchBot", "start_bot"]


@dataclass
class BenchBot:
    fake: FakeDiscord
    bot: FluxBot
    task: asyncio.Task[None]

    async def stop(self) -> None:
        await self.bot.close()
        await self.task
        await self.fake.stop()


async def start_bot(presets: str, limits: LimitSettings, keep_payloads: bool = True) -> BenchBot:
    work = Path(tempfile.mkdtemp())
    (work / "presets.toml").write_text(presets)
    (work / "loras.toml").write_text("")
    fake = FakeDiscord(keep_payloads=keep_payloads)
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
    point_at(fake.api_base, fake.gateway_url)
    bot = FluxBot(settings, engine=engine)
    task = asyncio.create_task(bot.start("bench-token"))
    await asyncio.wait_for(bot.wait_until_ready(), 120)
    return BenchBot(fake, bot, task)
