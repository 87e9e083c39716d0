"""/admin …: presets, LoRA whitelist, limits, bans and the queue. Hidden by Discord permission, and
checked again here against the configured admin users and roles."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import discord
from discord import app_commands

from bot import render
from bot.commands.imagine import lora_autocomplete, preset_autocomplete
from bot.commands.rules import add_rule_commands, run_for_server
from bot.i18n import Language
from bot.services.admin import AdminService
from bot.services.errors import UserError
from bot.services.studio import Requester

if TYPE_CHECKING:
    from bot.client import FluxBot


async def _run(
    interaction: discord.Interaction[FluxBot],
    action: Callable[[AdminService, Requester, Language], Awaitable[str]],
    server_scope: bool = False,
) -> None:
    """Every /admin answer is private, in the admin's own language. `server_scope`: the change is the
    asking server's own, which its own admins may make where the operator allows it."""
    await run_for_server(interaction, action, operator_only=not server_scope)


SCOPES = [
    app_commands.Choice(name="global (every server)", value="global"),
    app_commands.Choice(name="this server only", value="server"),
]


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
        add_rule_commands(self)  # /admin role, channel, rules, server-weight (bot/commands/rules.py)

    @app_commands.command(name="presets", description="Show presets with their defaults and bounds")
    @app_commands.describe(scope="Global, or this server's own")
    @app_commands.choices(scope=SCOPES)
    async def presets(self, interaction: discord.Interaction[FluxBot], scope: str = "global") -> None:
        server = scope == "server"

        async def show(service: AdminService, who: Requester, tr: Language) -> str:
            lines = []
            own = service.studio.community.presets_of(who.guild_id) if server else {}
            shown = service.studio.resolver_for(who.guild_id).presets if server else service.presets()
            for name, p in shown.items():
                guidance = (
                    tr.tr("guidance {value} in {range}", value=p.guidance, range=list(p.guidance_range))
                    if p.guidance_range
                    else tr.tr("no guidance")
                )
                cache = ", " + tr.tr("cache {cache}", cache=str(p.cache)) if p.cache.on else ""
                steps = tr.tr("steps {value} in {range}", value=p.steps, range=list(p.steps_range))
                where = " (" + tr.tr("this server") + ")" if name in own else ""
                lines.append(
                    f"**{name}**{where} ({p.family}): {steps}, {guidance}, "
                    f"{p.width}x{p.height}, {list(p.megapixels_range)} MP{cache}"
                )
            return "\n".join(lines)

        await _run(interaction, show, server_scope=server)

    @app_commands.command(name="preset-set", description="Change one default or bound of a preset")
    @app_commands.describe(
        name="Preset",
        field="e.g. steps, steps_range, guidance, width, cache",
        value="e.g. 24, [10, 40] or fbcache:0.08",
        scope="Global, or this server's own",
    )
    @app_commands.autocomplete(name=preset_autocomplete)
    @app_commands.choices(scope=SCOPES)
    async def preset_set(
        self,
        interaction: discord.Interaction[FluxBot],
        name: str,
        field: str,
        value: str,
        scope: str = "global",
    ) -> None:
        server = scope == "server"

        async def change(service: AdminService, who: Requester, tr: Language) -> str:
            preset = await service.set_preset(who, name, field, value, server)
            return tr.tr(
                "Preset **{preset}**: {field} = {value!r}",
                preset=name,
                field=field,
                value=getattr(preset, field),
            )

        await _run(interaction, change, server_scope=server)

    @app_commands.command(name="loras", description="List the LoRA whitelist")
    async def loras(self, interaction: discord.Interaction[FluxBot]) -> None:
        async def show(service: AdminService, who: Requester, tr: Language) -> str:
            entries = service.loras()
            return "\n".join(
                f"**{e.name}**: {e.file} sha256 {e.sha256[:12]}… "
                + tr.tr("weight {weight} (max {most})", weight=e.default_weight, most=e.max_weight)
                for e in entries
            ) or tr.tr("The whitelist is empty.")

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
        async def add(service: AdminService, who: Requester, tr: Language) -> str:
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
            return tr.tr("LoRA **{lora}** whitelisted (hash checked).", lora=entry.name)

        await _run(interaction, add)

    @app_commands.command(name="lora-remove", description="Remove a LoRA from the whitelist")
    @app_commands.autocomplete(name=lora_autocomplete)
    async def lora_remove(self, interaction: discord.Interaction[FluxBot], name: str) -> None:
        async def remove(service: AdminService, who: Requester, tr: Language) -> str:
            await service.remove_lora(who, name)
            return tr.tr("LoRA **{lora}** removed from the whitelist.", lora=name)

        await _run(interaction, remove)

    @app_commands.command(name="limits", description="Show or change the limits")
    @app_commands.describe(
        field="Which limit to change", value="New value", scope="Global, or this server's own"
    )
    @app_commands.choices(
        scope=SCOPES,
        field=[
            app_commands.Choice(name="jobs per window", value="jobs_per_window"),
            app_commands.Choice(name="window (seconds)", value="window_s"),
            app_commands.Choice(name="max queued per user", value="max_queued_per_user"),
            app_commands.Choice(name="max queue (all users)", value="max_queue"),
        ],
    )
    async def limits(
        self,
        interaction: discord.Interaction[FluxBot],
        field: str | None = None,
        value: float | None = None,
        scope: str = "global",
    ) -> None:
        server = scope == "server"

        async def change(service: AdminService, who: Requester, tr: Language) -> str:
            if field is not None:
                if value is None:
                    raise UserError("Give a value to set.")
                await service.set_limit(who, field, value, server)
            return render.limits(
                tr, service.studio.limits_for(who.guild_id), service.studio.community.limits_of(who.guild_id)
            )

        await _run(interaction, change, server_scope=server)

    @app_commands.command(name="ban", description="Stop a user from making images")
    async def ban(
        self, interaction: discord.Interaction[FluxBot], user: discord.User, reason: str | None = None
    ) -> None:
        async def do(service: AdminService, who: Requester, tr: Language) -> str:
            await service.ban(who, user.id, reason)
            return tr.tr("{user} is banned.", user=user.mention)

        await _run(interaction, do)

    @app_commands.command(name="unban", description="Let a banned user make images again")
    async def unban(self, interaction: discord.Interaction[FluxBot], user: discord.User) -> None:
        async def do(service: AdminService, who: Requester, tr: Language) -> str:
            await service.unban(who, user.id)
            return tr.tr("{user} is no longer banned.", user=user.mention)

        await _run(interaction, do)

    @app_commands.command(name="stats", description="Queue, jobs today, seconds per image, uptime")
    async def stats(self, interaction: discord.Interaction[FluxBot]) -> None:
        started_at = interaction.client.app.started_at

        async def show(service: AdminService, who: Requester, tr: Language) -> str:
            return render.stats(tr, await service.stats(started_at))

        await _run(interaction, show)

    @app_commands.command(name="queue", description="Show the queue")
    async def queue(self, interaction: discord.Interaction[FluxBot]) -> None:
        async def show(service: AdminService, who: Requester, tr: Language) -> str:
            return render.queue(tr, service.queue(who))

        await _run(interaction, show)

    @app_commands.command(name="workers", description="Engine workers: what they serve, state, throughput")
    async def workers(self, interaction: discord.Interaction[FluxBot]) -> None:
        async def show(service: AdminService, who: Requester, tr: Language) -> str:
            return render.workers(tr, await service.workers())

        await _run(interaction, show)

    @app_commands.command(name="cancel", description="Cancel a queued or running job")
    async def cancel(self, interaction: discord.Interaction[FluxBot], job_id: int) -> None:
        async def do(service: AdminService, who: Requester, tr: Language) -> str:
            await service.cancel(who, job_id)
            return tr.tr("Job {job} cancelled.", job=job_id)

        await _run(interaction, do)

    @app_commands.command(name="pause", description="Stop starting new jobs (the running one finishes)")
    async def pause(self, interaction: discord.Interaction[FluxBot]) -> None:
        async def do(service: AdminService, who: Requester, tr: Language) -> str:
            await service.pause(who, True)
            return tr.tr("Queue paused.")

        await _run(interaction, do)

    @app_commands.command(name="resume", description="Start jobs again")
    async def resume(self, interaction: discord.Interaction[FluxBot]) -> None:
        async def do(service: AdminService, who: Requester, tr: Language) -> str:
            await service.pause(who, False)
            return tr.tr("Queue resumed.")

        await _run(interaction, do)

    @blocklist.command(name="add", description="Refuse prompts containing this word or phrase")
    @app_commands.describe(
        term="A word or phrase; spacing, case, accents and leetspeak are undone",
        scope="Global, or this server's own",
    )
    @app_commands.choices(scope=SCOPES)
    async def blocklist_add(
        self, interaction: discord.Interaction[FluxBot], term: str, scope: str = "global"
    ) -> None:
        async def do(service: AdminService, who: Requester, tr: Language) -> str:
            stored = await service.block_term(who, term, scope == "server")
            return tr.tr("Blocked: {term}", term=render.inert(stored))

        await _run(interaction, do, server_scope=scope == "server")

    @blocklist.command(name="remove", description="Allow a blocked term again")
    @app_commands.describe(scope="Global, or this server's own")
    @app_commands.choices(scope=SCOPES)
    async def blocklist_remove(
        self, interaction: discord.Interaction[FluxBot], term: str, scope: str = "global"
    ) -> None:
        async def do(service: AdminService, who: Requester, tr: Language) -> str:
            removed = await service.unblock_term(who, term, scope == "server")
            return tr.tr("No longer blocked: {term}", term=render.inert(removed))

        await _run(interaction, do, server_scope=scope == "server")

    @blocklist.command(name="list", description="Show the blocked terms")
    @app_commands.describe(scope="Global, or this server's own")
    @app_commands.choices(scope=SCOPES)
    async def blocklist_list(self, interaction: discord.Interaction[FluxBot], scope: str = "global") -> None:
        async def show(service: AdminService, who: Requester, tr: Language) -> str:
            terms = service.blocked_terms(who, scope == "server")
            if not terms:
                return tr.tr("No blocked terms.")
            return tr.plural(
                "**{n} blocked term:** {terms}",
                "**{n} blocked terms:** {terms}",
                len(terms),
                terms=", ".join(render.inert(t) for t in terms),
            )

        await _run(interaction, show, server_scope=scope == "server")
