"""/admin …: presets, LoRA whitelist, limits, bans and the queue. Hidden by Discord permission, and
checked again here against the configured admin users and roles."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import discord
from discord import app_commands

from bot import render
from bot.commands.context import reply_error, requester, role_ids
from bot.commands.imagine import lora_autocomplete, preset_autocomplete
from bot.mentions import NOBODY
from bot.services.admin import AdminService
from bot.services.errors import UserError
from bot.services.studio import Requester

if TYPE_CHECKING:
    from bot.client import FluxBot


async def _run(
    interaction: discord.Interaction[FluxBot], action: Callable[[AdminService, Requester], Awaitable[str]]
) -> None:
    service = interaction.client.app.admin
    who = requester(interaction, with_token=False)
    try:
        service.require(who, role_ids(interaction))
    except UserError as exc:
        await reply_error(interaction, exc)
        return
    # Answered first ("thinking…", private), then the work: it may wait on a busy store or on a job's
    # delivery, and Discord drops an interaction left unanswered for 3 s.
    await interaction.response.defer(ephemeral=True, thinking=True)
    try:
        text = await action(service, who)
    except UserError as exc:
        text = str(exc)
    await interaction.edit_original_response(content=text[:1990], allowed_mentions=NOBODY)


class AdminCommands(app_commands.Group):
    """The /admin group. Discord hides it from members without `permission`; every command checks again
    on the server against the configured admin users and roles."""

    blocklist = app_commands.Group(name="blocklist", description="Terms that prompts may not contain")

    def __init__(self, permission: str) -> None:
        super().__init__(
            name="admin",
            description="fluxbot administration",
            guild_only=True,
            default_permissions=discord.Permissions(**{permission: True}),
        )

    @app_commands.command(name="presets", description="Show presets with their defaults and bounds")
    async def presets(self, interaction: discord.Interaction[FluxBot]) -> None:
        async def show(service: AdminService, who: Requester) -> str:
            lines = []
            for name, p in service.presets().items():
                guidance = (
                    f"guidance {p.guidance} in {list(p.guidance_range)}"
                    if p.guidance_range
                    else "no guidance"
                )
                cache = f", cache {p.cache}" if p.cache.on else ""
                lines.append(
                    f"**{name}** ({p.family}): steps {p.steps} in {list(p.steps_range)}, {guidance}, "
                    f"{p.width}x{p.height}, {list(p.megapixels_range)} MP{cache}"
                )
            return "\n".join(lines)

        await _run(interaction, show)

    @app_commands.command(name="preset-set", description="Change one default or bound of a preset")
    @app_commands.describe(
        name="Preset",
        field="e.g. steps, steps_range, guidance, width, cache",
        value="e.g. 24, [10, 40] or fbcache:0.08",
    )
    @app_commands.autocomplete(name=preset_autocomplete)
    async def preset_set(
        self, interaction: discord.Interaction[FluxBot], name: str, field: str, value: str
    ) -> None:
        async def change(service: AdminService, who: Requester) -> str:
            preset = await service.set_preset(who, name, field, value)
            return f"Preset **{name}**: {field} = {getattr(preset, field)!r}"

        await _run(interaction, change)

    @app_commands.command(name="loras", description="List the LoRA whitelist")
    async def loras(self, interaction: discord.Interaction[FluxBot]) -> None:
        async def show(service: AdminService, who: Requester) -> str:
            entries = service.loras()
            return (
                "\n".join(
                    f"**{e.name}**: {e.file} sha256 {e.sha256[:12]}… weight {e.default_weight} "
                    f"(max {e.max_weight})"
                    for e in entries
                )
                or "The whitelist is empty."
            )

        await _run(interaction, show)

    @app_commands.command(name="lora-add", description="Whitelist a LoRA file that is in the LoRA folder")
    @app_commands.describe(
        file="File name inside the LoRA folder",
        sha256="sha256 of the file",
        trigger_words="Comma-separated words prepended to prompts",
    )
    async def lora_add(
        self,
        interaction: discord.Interaction[FluxBot],
        name: str,
        file: str,
        sha256: str,
        trigger_words: str | None = None,
        default_weight: float | None = None,
        max_weight: float | None = None,
    ) -> None:
        async def add(service: AdminService, who: Requester) -> str:
            words = [w.strip() for w in trigger_words.split(",") if w.strip()] if trigger_words else None
            entry = await service.add_lora(
                who,
                {
                    "name": name,
                    "file": file,
                    "sha256": sha256.lower(),
                    "trigger_words": words,
                    "default_weight": default_weight,
                    "max_weight": max_weight,
                },
            )
            return f"LoRA **{entry.name}** whitelisted (hash checked)."

        await _run(interaction, add)

    @app_commands.command(name="lora-remove", description="Remove a LoRA from the whitelist")
    @app_commands.autocomplete(name=lora_autocomplete)
    async def lora_remove(self, interaction: discord.Interaction[FluxBot], name: str) -> None:
        async def remove(service: AdminService, who: Requester) -> str:
            await service.remove_lora(who, name)
            return f"LoRA **{name}** removed from the whitelist."

        await _run(interaction, remove)

    @app_commands.command(name="limits", description="Show or change the limits")
    @app_commands.describe(
        field="jobs_per_window, window_s, max_queued_per_user or max_queue", value="New value"
    )
    async def limits(
        self, interaction: discord.Interaction[FluxBot], field: str | None = None, value: float | None = None
    ) -> None:
        async def change(service: AdminService, who: Requester) -> str:
            if field is not None:
                if value is None:
                    raise UserError("Give a value to set.")
                await service.set_limit(who, field, value)
            current = service.studio.limits
            return ", ".join(f"{k} = {v:g}" for k, v in current.model_dump().items())

        await _run(interaction, change)

    @app_commands.command(name="ban", description="Stop a user from making images")
    async def ban(
        self, interaction: discord.Interaction[FluxBot], user: discord.User, reason: str | None = None
    ) -> None:
        async def do(service: AdminService, who: Requester) -> str:
            await service.ban(who, user.id, reason)
            return f"{user.mention} is banned."

        await _run(interaction, do)

    @app_commands.command(name="unban", description="Let a banned user make images again")
    async def unban(self, interaction: discord.Interaction[FluxBot], user: discord.User) -> None:
        async def do(service: AdminService, who: Requester) -> str:
            await service.unban(who, user.id)
            return f"{user.mention} is no longer banned."

        await _run(interaction, do)

    @app_commands.command(name="stats", description="Queue, jobs today, seconds per image, uptime")
    async def stats(self, interaction: discord.Interaction[FluxBot]) -> None:
        started_at = interaction.client.app.started_at

        async def show(service: AdminService, who: Requester) -> str:
            return render.stats(await service.stats(started_at))

        await _run(interaction, show)

    @app_commands.command(name="queue", description="Show the queue")
    async def queue(self, interaction: discord.Interaction[FluxBot]) -> None:
        async def show(service: AdminService, who: Requester) -> str:
            return render.queue(service.queue(who))

        await _run(interaction, show)

    @app_commands.command(name="workers", description="Engine workers: what they serve, state, throughput")
    async def workers(self, interaction: discord.Interaction[FluxBot]) -> None:
        async def show(service: AdminService, who: Requester) -> str:
            return render.workers(await service.workers())

        await _run(interaction, show)

    @app_commands.command(name="cancel", description="Cancel a queued or running job")
    async def cancel(self, interaction: discord.Interaction[FluxBot], job_id: int) -> None:
        async def do(service: AdminService, who: Requester) -> str:
            await service.cancel(who, job_id)
            return f"Job {job_id} cancelled."

        await _run(interaction, do)

    @app_commands.command(name="pause", description="Stop starting new jobs (the running one finishes)")
    async def pause(self, interaction: discord.Interaction[FluxBot]) -> None:
        async def do(service: AdminService, who: Requester) -> str:
            await service.pause(who, True)
            return "Queue paused."

        await _run(interaction, do)

    @app_commands.command(name="resume", description="Start jobs again")
    async def resume(self, interaction: discord.Interaction[FluxBot]) -> None:
        async def do(service: AdminService, who: Requester) -> str:
            await service.pause(who, False)
            return "Queue resumed."

        await _run(interaction, do)

    @blocklist.command(name="add", description="Refuse prompts containing this word or phrase")
    @app_commands.describe(term="A word or phrase; spacing, case, accents and leetspeak are undone")
    async def blocklist_add(self, interaction: discord.Interaction[FluxBot], term: str) -> None:
        async def do(service: AdminService, who: Requester) -> str:
            stored = await service.block_term(who, term)
            return f"Blocked: {render.inert(stored)}"

        await _run(interaction, do)

    @blocklist.command(name="remove", description="Allow a blocked term again")
    async def blocklist_remove(self, interaction: discord.Interaction[FluxBot], term: str) -> None:
        async def do(service: AdminService, who: Requester) -> str:
            removed = await service.unblock_term(who, term)
            return f"No longer blocked: {render.inert(removed)}"

        await _run(interaction, do)

    @blocklist.command(name="list", description="Show the blocked terms")
    async def blocklist_list(self, interaction: discord.Interaction[FluxBot]) -> None:
        async def show(service: AdminService, who: Requester) -> str:
            terms = service.blocked_terms()
            if not terms:
                return "No blocked terms."
            return f"**{len(terms)} blocked terms:** " + ", ".join(render.inert(t) for t in terms)

        await _run(interaction, show)
