"""The real discord.py client against the fake Discord server: a harness and helpers shared by tests."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from bot.app import App
from bot.client import FluxBot, build_bot
from engine.engine import FluxEngine
from engine.settings import EngineSettings
from fluxbot.settings import LimitSettings, Settings
from tests.bot_support import make_settings
from tests.fake_discord import ADMIN_ROLE, FakeDiscord

ALICE = 111000000000000001
BOB = 111000000000000002
ADMIN = 111000000000000003


class Harness:
    """Starts and stops the real bot against the fake server."""

    def __init__(self, fake: FakeDiscord, settings: Settings, engine: FluxEngine | None) -> None:
        self.fake, self.settings, self.engine = fake, settings, engine
        self.bot: FluxBot | None = None
        self.task: asyncio.Task[None] | None = None

    async def start(self, token: str = "fake-token") -> FluxBot:
        self.fake.identified.clear()
        self.bot = await build_bot(self.settings, self.engine)
        self.task = asyncio.create_task(self.bot.start(token))
        await asyncio.wait_for(self.bot.wait_until_ready(), 60)
        return self.bot

    async def stop(self) -> None:
        if self.bot is not None:
            await self.bot.close()
        if self.task is not None:
            await asyncio.wait_for(self.task, 30)
        self.bot = self.task = None

    @property
    def app(self) -> App:
        assert self.bot is not None
        return self.bot.app


@contextlib.asynccontextmanager
async def running_bot(fake: FakeDiscord, settings: Settings, data_dir: Path) -> AsyncIterator[Harness]:
    """The real bot on its own tiny engine against `fake`, started; stopped afterwards."""
    engine = await asyncio.to_thread(FluxEngine.load, settings.engine, data_dir)
    harness = Harness(fake, settings, engine)
    await harness.start()
    try:
        yield harness
    finally:
        await harness.stop()


def make_bot_settings(
    tmp: Path, engine_settings: Callable[..., EngineSettings], fake: FakeDiscord, **kw: Any
) -> Settings:
    values: dict[str, Any] = {
        "discord_api_base": fake.api_base,
        "discord_gateway_url": fake.gateway_url,
        "guild_ids": [],
        "admin_user_ids": [ADMIN],
        "admin_role_ids": [ADMIN_ROLE],
        "progress_interval_s": 0.2,
        "limits": LimitSettings(jobs_per_window=50, window_s=60, max_queued_per_user=5, max_queue=50),
    }
    values.update(kw)
    return make_settings(tmp, engine_settings, **values)


def opt(name: str, value: Any, kind: int = 3) -> dict[str, Any]:
    return {"name": name, "type": kind, "value": value}


def job_id_of(message: dict[str, Any]) -> int:
    """The job a result message shows (its buttons' custom_ids end with it)."""
    return int(message["components"][0]["components"][0]["custom_id"].split(":")[-1])


def png_of(fake: FakeDiscord, message: dict[str, Any]) -> bytes:
    return fake.attachment_bytes[message["attachments"][0]["id"]]


def has_result(message: dict[str, Any] | None) -> bool:
    """The message carries a result (not only the preview of the picture forming)."""
    return bool(message) and any(
        not a["filename"].endswith("-preview.jpg")
        for a in message["attachments"]  # type: ignore[index]
    )


async def finished_message(fake: FakeDiscord, token: str) -> dict[str, Any]:
    return await fake.wait_for(lambda: (m := fake.original(token)) and has_result(m) and m)


def is_ephemeral_error(fake: FakeDiscord, token: str, text: str) -> bool:
    for call in fake.calls:
        body = call.json or {}
        data = body.get("data", body) if isinstance(body, dict) else {}
        if (
            token in call.path
            and isinstance(data, dict)
            and data.get("flags", 0) & 64
            and text in data.get("content", "")
        ):
            return True
    return False


def make_tiny_classifier(folder: Path) -> Path:
    """A random-weight ViT image classifier with the labels normal / nsfw, built from config (for the
    safety classifier's plumbing: thresholds 0 and 1 make it flag every image, or none)."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    if not (folder / "config.json").exists():
        config = ViTConfig(
            image_size=32,
            patch_size=8,
            num_channels=3,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            num_labels=2,
            id2label={0: "normal", 1: "nsfw"},
            label2id={"normal": 0, "nsfw": 1},
        )
        ViTForImageClassification(config).save_pretrained(folder)
        ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder
