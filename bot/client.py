"""FluxBot: the discord.py client, made around an App that exists before it (as discord.py's
advanced_startup example builds its resources first). It syncs commands and routes reactions; the
handlers in bot/commands reach the services through `interaction.client.app`, typed."""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

import discord
from aiohttp import web
from discord import app_commands

from bot.app import App, build_app
from bot.commands.admin import AdminCommands
from bot.commands.buttons import JobButton
from bot.commands.context import reply_error
from bot.commands.imagine import COMMANDS
from bot.commands.reactions import on_reaction
from bot.delivery import DiscordDelivery
from bot.discord_endpoint import point_client_at
from bot.i18n import CommandTranslator, Languages
from bot.mentions import NOBODY
from bot.observability import Metrics, serve
from bot.services.notices import NoticeThrottle
from engine.errors import ConfigError
from fluxbot.settings import Settings

log = logging.getLogger(__name__)


class FluxBot(discord.Client):
    def __init__(
        self,
        settings: Settings,
        app: App,
        delivery: DiscordDelivery,
        metrics_server: web.AppRunner | None = None,
        languages: Languages | None = None,
        **options: Any,
    ) -> None:
        intents = discord.Intents.default()  # guilds + reactions; no message content needed
        # Nobody is pinged unless a message names whom (bot/mentions.py): the default of every send.
        super().__init__(intents=intents, allowed_mentions=NOBODY, **options)
        point_client_at(self, settings.discord_api_base, settings.discord_gateway_url)
        self.settings = settings
        self.app = app
        self.delivery = delivery
        self.languages = languages or delivery.languages
        self.metrics_server = metrics_server
        self.reaction_notices = NoticeThrottle(settings.limits.window_s)
        self.tree: app_commands.CommandTree[FluxBot] = app_commands.CommandTree(self)
        self.tree.error(self._on_tree_error)
        for command in COMMANDS:
            self.tree.add_command(command)
        self.tree.add_command(AdminCommands(settings.admin_permission))
        delivery.bind(self)
        self._app_closed = False

    async def setup_hook(self) -> None:
        self.add_dynamic_items(JobButton)
        await self.app.start()
        await self.tree.set_translator(CommandTranslator(self.languages))  # names and descriptions too
        await self._sync_commands()

    async def health(self) -> dict[str, bool]:
        checks = {"process": True, **await self.app.health()}
        checks["gateway"] = self.is_ready() and not self.is_closed() and self.ws is not None and self.ws.open
        return checks

    async def health_details(self) -> dict[str, Any]:
        """What /healthz shows beside the checks: each engine's compile mode, attention backend and
        the seconds its compile and warm-up took at start."""
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
        self, interaction: discord.Interaction[FluxBot], error: app_commands.AppCommandError
    ) -> None:
        await reply_error(interaction, getattr(error, "original", error))

    async def shutdown(self, grace_s: float) -> None:
        """SIGTERM: refuse new jobs, finish or re-queue the running one, close the DB, disconnect."""
        self.app.studio.accepting = False
        await self.app.queue.drain(grace_s)
        await self.close()

    async def close(self) -> None:
        if self.metrics_server is not None:
            await self.metrics_server.cleanup()
            self.metrics_server = None
        if not self._app_closed:
            self._app_closed = True
            await self.app.close()
        await super().close()


class _Starting:
    """What /healthz reads while the process comes up: not ready until the bot exists."""

    def __init__(self) -> None:
        self.bot: FluxBot | None = None

    async def health(self) -> dict[str, bool]:
        return await self.bot.health() if self.bot is not None else {"process": True, "database": False}

    async def details(self) -> dict[str, Any]:
        return await self.bot.health_details() if self.bot is not None else {"engines": []}


async def build_bot(settings: Settings, engine: Any = None) -> FluxBot:
    """Metrics first (a busy port is refused before minutes of model loading, and /healthz answers
    "not ready" while the engine loads), then the App, then the client around them."""
    metrics = Metrics()
    starting = _Starting()
    server = None
    if (port := settings.metrics_port) is not None:
        host = settings.metrics_host
        try:
            server = await serve(metrics, starting.health, host, port, starting.details)
        except OSError as exc:  # not "cannot reach Discord": the CLI's answer for other OSErrors
            raise ConfigError(
                f"metrics_port {port} on {host} is not free ({exc.strerror or exc}); set "
                "FLUXBOT_METRICS_PORT to a free port, or leave metrics_port unset to turn it off"
            ) from exc
    try:
        languages = await asyncio.to_thread(Languages.load)
        delivery = DiscordDelivery(
            languages,
            settings.data_dir,
            settings.progress_interval_s,
            settings.safety.flagged_action,
            # With a classifier, only finished images are checked: the forming picture is shown only
            # where anything may be (age-restricted channels, DMs).
            previews_everywhere=settings.safety.classifier is None,
        )
        app = await build_app(settings, delivery, engine, metrics)
    except BaseException:
        if server is not None:
            await server.cleanup()
        raise
    delivery.flagged_for = app.studio.flagged_action  # a server may withhold what the host spoilers
    delivery.edits = app.studio.edits  # Kontext beside FLUX.1, or FLUX.2 klein itself: an Edit button
    delivery.redraws = app.studio.resolver.family == "flux1"  # Vary and Upscale are FLUX.1's img2img
    delivery.upscales = app.studio.upscales  # an upscaler model: Upscale on every family
    delivery.outpaints = app.studio.inpaints  # Zoom Out and Pan draw with FLUX.1 Fill
    delivery.regions = app.studio.inpaints and app.studio.segmenter is not None  # Vary (Region): words
    starting.bot = FluxBot(settings, app, delivery, server, languages)
    return starting.bot


async def run_bot(settings: Settings) -> None:
    """Run until Discord closes the session or SIGTERM/SIGINT asks for a clean stop."""
    assert settings.discord_token is not None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    building = asyncio.create_task(build_bot(settings))
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({building, stopping}, return_when=asyncio.FIRST_COMPLETED)
    bot = await building  # a stop while the engine loads takes effect once it has loaded
    if stop.is_set():
        await bot.close()
        return
    async with bot:
        running = asyncio.create_task(bot.start(settings.discord_token.get_secret_value()))
        await asyncio.wait({running, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set():
            log.info("stopping: finishing the running job (up to %.0fs)", settings.shutdown_grace_s)
            await bot.shutdown(settings.shutdown_grace_s)
        stopping.cancel()
        await running  # re-raises login/connection errors
