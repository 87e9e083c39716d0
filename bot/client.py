"""FluxBot: the discord.py client. Wires the app in setup_hook, syncs commands, routes reactions."""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

import discord
import yarl
from aiohttp import web
from discord import app_commands
from discord.gateway import DiscordWebSocket
from discord.http import Route

from bot.app import App, build_app
from bot.commands.admin import AdminCommands
from bot.commands.buttons import JobButton
from bot.commands.context import reply_error
from bot.commands.imagine import COMMANDS, on_reaction
from bot.delivery import DiscordDelivery
from bot.mentions import NOBODY
from bot.observability import Metrics, serve
from bot.services.notices import NoticeThrottle
from engine.engine import FluxEngine
from engine.errors import ConfigError
from fluxbot.settings import Settings

log = logging.getLogger(__name__)


def point_at(api_base: str, gateway_url: str) -> None:
    # discord.py keeps both URLs as class attributes (no per-client option); a process runs one bot.
    Route.BASE = api_base.rstrip("/")
    DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(gateway_url)


class FluxBot(discord.Client):
    def __init__(self, settings: Settings, engine: FluxEngine | None = None, **options: Any) -> None:
        intents = discord.Intents.default()  # guilds + reactions; no message content needed
        # Nobody is pinged unless a message names whom (bot/mentions.py): the default of every send.
        super().__init__(intents=intents, allowed_mentions=NOBODY, **options)
        self.settings = settings
        self._engine = engine
        self.tree = app_commands.CommandTree(self)
        self.tree.on_error = self._on_tree_error  # type: ignore[method-assign]
        for command in COMMANDS:
            self.tree.add_command(command)
        self.tree.add_command(AdminCommands(settings.admin_permission))
        self.delivery = DiscordDelivery(
            settings.data_dir,
            settings.progress_interval_s,
            settings.safety.flagged_action,
            # With a classifier, only finished images are checked: the forming picture is shown only
            # where anything may be (age-restricted channels, DMs).
            previews_everywhere=settings.safety.classifier is None,
            edits=settings.engine.kontext is not None,
        )
        self.reaction_notices = NoticeThrottle(settings.limits.window_s)
        self.app: App | None = None
        self.metrics = Metrics()
        self.metrics_server: web.AppRunner | None = None

    async def setup_hook(self) -> None:
        # Metrics first: a busy port is refused before minutes of model loading, and /healthz answers
        # (503, not ready) while the engine loads.
        if (port := self.settings.metrics_port) is not None:
            host = self.settings.metrics_host
            try:
                self.metrics_server = await serve(self.metrics, self.health, host, port, self.health_details)
            except OSError as exc:  # not "cannot reach Discord": the CLI's answer for other OSErrors
                raise ConfigError(
                    f"metrics_port {port} on {host} is not free ({exc.strerror or exc}); set "
                    "FLUXBOT_METRICS_PORT to a free port, or leave metrics_port unset to turn it off"
                ) from exc
        self.delivery.bind(self)
        self.app = await build_app(self.settings, self.delivery, self._engine, self.metrics)
        self.add_dynamic_items(JobButton)
        await self.app.start()
        await self._sync_commands()

    async def health(self) -> dict[str, bool]:
        app = self.app
        checks = {"process": True, **(await app.health() if app is not None else {"database": False})}
        checks["gateway"] = self.is_ready() and not self.is_closed() and self.ws is not None and self.ws.open
        return checks

    async def health_details(self) -> dict[str, Any]:
        """What /healthz shows beside the checks: each engine's compile mode, attention backend and
        the seconds its compile and warm-up took at start (none while it still loads)."""
        if self.app is None:
            return {"engines": []}
        try:
            workers = await self.app.queue.workers()
        except Exception:  # Redis away: the checks already say so
            return {"engines": []}
        return {
            "engines": [
                {"name": w.name, "compile": w.compile, "attention": w.attention, "warmup_s": w.warmup_s}
                for w in workers
            ]
        }

    async def _sync_commands(self) -> None:
        if self.settings.guild_ids:
            for guild_id in self.settings.guild_ids:
                guild = discord.Object(guild_id)
                self.tree.copy_global_to(guild=guild)
                await self.tree.sync(guild=guild)
        else:
            await self.tree.sync()
        log.info("slash commands synced (%s)", self.settings.guild_ids or "global")

    async def on_raw_reaction_add(self, payload: discord.RawReactionActionEvent) -> None:
        try:
            await on_reaction(self, payload)
        except Exception:
            log.exception("reaction on message %s failed", payload.message_id)

    async def _on_tree_error(
        self, interaction: discord.Interaction, error: app_commands.AppCommandError
    ) -> None:
        await reply_error(interaction, getattr(error, "original", error))

    async def shutdown(self, grace_s: float) -> None:
        """SIGTERM: refuse new jobs, finish or re-queue the running one, close the DB, disconnect."""
        if self.app is not None:
            self.app.studio.accepting = False
            await self.app.queue.drain(grace_s)
        await self.close()

    async def close(self) -> None:
        if self.metrics_server is not None:
            await self.metrics_server.cleanup()
            self.metrics_server = None
        if self.app is not None:
            await self.app.close()
            self.app = None
        await super().close()


async def run_bot(settings: Settings) -> None:
    """Run until Discord closes the session or SIGTERM/SIGINT asks for a clean stop."""
    assert settings.discord_token is not None
    point_at(settings.discord_api_base, settings.discord_gateway_url)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with FluxBot(settings) as bot:
        running = asyncio.create_task(bot.start(settings.discord_token.get_secret_value()))
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({running, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set():
            log.info("stopping: finishing the running job (up to %.0fs)", settings.shutdown_grace_s)
            await bot.shutdown(settings.shutdown_grace_s)
        stopping.cancel()
        await running  # re-raises login/connection errors
