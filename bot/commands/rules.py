"""/admin role …, /admin channel …, /admin rules and /admin server-weight: the community rules.

Role and channel rules are the server's own: its admins may change them where the operator lists the
server in `server_admin_guilds`; the operator's admins always may. Server weights are the operator's."""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import discord
from discord import app_commands

from bot import render
from bot.commands.context import parent_channel, private, reply_error, requester, role_ids
from bot.i18n import Language
from bot.mentions import NOBODY
from bot.services.admin import AdminService
from bot.services.community import RULE_FIELDS
from bot.services.community_admin import CHANNEL_FIELDS
from bot.services.errors import UserError
from bot.services.studio import Requester

if TYPE_CHECKING:
    from bot.client import FluxBot

Action = Callable[[AdminService, Requester, Language], Awaitable[str]]


async def run_for_server(
    interaction: discord.Interaction[FluxBot], action: Action, operator_only: bool = False
) -> None:
    """Checked (an operator's admin; or, unless `operator_only`, this server's admin where allowed),
    answered privately first, then the work, then the answer in the admin's language."""
    service = interaction.client.app.admin
    who = requester(interaction, with_token=False)
    # is_admin: one of the operator's admins (a server's own admins may not go past the global limits)
    who = dataclasses.replace(who, is_admin=service.policy.allows(who.user_id, role_ids(interaction)))
    try:
        if operator_only:
            service.require(who, role_ids(interaction))
        else:
            permissions = interaction.permissions  # theirs in this channel, as Discord computed them
            manages = permissions.manage_guild or permissions.administrator
            service.require_server(who, role_ids(interaction), manages)
    except UserError as exc:
        await reply_error(interaction, exc)
        return
    await interaction.response.defer(ephemeral=True, thinking=True)
    tr = private(interaction)
    try:
        text = await action(service, who, tr)
    except UserError as exc:
        text = tr.message(exc.message)
    await interaction.edit_original_response(content=render.fit(text), allowed_mentions=NOBODY)


_ROLE_FIELDS = [app_commands.Choice(name=name.replace("_", " "), value=name) for name in RULE_FIELDS]
_CHANNEL_FIELDS = [app_commands.Choice(name=name.replace("_", " "), value=name) for name in CHANNEL_FIELDS]


class RoleCommands(app_commands.Group):
    def __init__(self) -> None:
        super().__init__(name="role", description="What a role's members may use, and how much")

    @app_commands.command(name="set", description="Set one field of a role's rule (value - unsets it)")
    @app_commands.describe(
        role="The role (@everyone: the server's default)",
        field="Which field",
        value="A number, or names separated by commas (* = all); - unsets it",
    )
    @app_commands.choices(field=_ROLE_FIELDS)
    async def set_(
        self, interaction: discord.Interaction[FluxBot], role: discord.Role, field: str, value: str
    ) -> None:
        async def change(service: AdminService, who: Requester, tr: Language) -> str:
            await service.community.set_role(who, role.id, field, value[:1000])
            return render.role_rules(tr, service.community.roles(who), who.guild_id)

        await run_for_server(interaction, change)

    @app_commands.command(name="clear", description="Remove a role's rule")
    async def clear(self, interaction: discord.Interaction[FluxBot], role: discord.Role) -> None:
        async def change(service: AdminService, who: Requester, tr: Language) -> str:
            await service.community.clear_role(who, role.id)
            return render.role_rules(tr, service.community.roles(who), who.guild_id)

        await run_for_server(interaction, change)

    @app_commands.command(name="list", description="The role rules of this server")
    async def list_(self, interaction: discord.Interaction[FluxBot]) -> None:
        async def show(service: AdminService, who: Requester, tr: Language) -> str:
            return render.role_rules(tr, service.community.roles(who), who.guild_id)

        await run_for_server(interaction, show)


class ChannelCommands(app_commands.Group):
    def __init__(self) -> None:
        super().__init__(name="channel", description="Where drawing works, and each channel's presets")

    @app_commands.command(name="draw", description="Let drawing commands work in a channel (or stop them)")
    @app_commands.describe(channel="The channel (its threads follow it)", allowed="Drawing works there")
    async def draw(
        self, interaction: discord.Interaction[FluxBot], channel: discord.TextChannel, allowed: bool
    ) -> None:
        async def change(service: AdminService, who: Requester, tr: Language) -> str:
            rules = await service.community.set_drawing(who, channel.id, allowed)
            return render.channel_rules(tr, rules)

        await run_for_server(interaction, change)

    @app_commands.command(name="set", description="A channel's default preset or allowed presets")
    @app_commands.describe(
        channel="The channel",
        field="Which field",
        value="A preset, or presets separated by commas; - unsets it",
    )
    @app_commands.choices(field=_CHANNEL_FIELDS)
    async def set_(
        self, interaction: discord.Interaction[FluxBot], channel: discord.TextChannel, field: str, value: str
    ) -> None:
        async def change(service: AdminService, who: Requester, tr: Language) -> str:
            await service.community.set_channel(who, channel.id, field, value[:1000])
            return render.channel_rules(tr, service.community.rules.channels(who.guild_id))

        await run_for_server(interaction, change)

    @app_commands.command(name="list", description="The channel rules of this server")
    async def list_(self, interaction: discord.Interaction[FluxBot]) -> None:
        async def show(service: AdminService, who: Requester, tr: Language) -> str:
            return render.channel_rules(tr, service.community.rules.channels(who.guild_id))

        await run_for_server(interaction, show)


def add_rule_commands(admin: app_commands.Group) -> None:
    """The rules commands, under /admin."""
    admin.add_command(RoleCommands())
    admin.add_command(ChannelCommands())
    admin.add_command(rules)
    admin.add_command(server_weight)
    admin.add_command(flagged_images)


@app_commands.command(name="rules", description="What a member may use in a channel, and why")
@app_commands.describe(member="The member", channel="Where (default: here)")
async def rules(
    interaction: discord.Interaction[FluxBot],
    member: discord.Member,
    channel: discord.TextChannel | None = None,
) -> None:
    async def show(service: AdminService, who: Requester, tr: Language) -> str:
        where = channel or interaction.channel
        asked = Requester(
            user_id=member.id,
            guild_id=who.guild_id,
            channel_id=where.id if where is not None else None,
            role_ids=tuple(role.id for role in member.roles),
            parent_channel_id=parent_channel(where),
        )
        return render.explained(
            tr, service.community.explain(asked), member.display_name, asked.channel_id, who.guild_id
        )

    await run_for_server(interaction, show)


@app_commands.command(name="server-weight", description="A server's share of the GPU against the others")
@app_commands.describe(
    weight="1 = an equal share; 2 = twice as much when servers wait together",
    server_id="Which server (default: this one)",
)
async def server_weight(
    interaction: discord.Interaction[FluxBot], weight: float, server_id: str | None = None
) -> None:
    async def change(service: AdminService, who: Requester, tr: Language) -> str:
        try:
            guild_id = int(server_id) if server_id else who.guild_id
        except ValueError:
            guild_id = -1
        if guild_id is not None and not 0 < guild_id < 2**63:
            raise UserError("server_id must be a server's id (a number).")
        if guild_id is None:
            raise UserError("Rules belong to a server: use this command in one.")
        await service.community.set_server_weight(who, guild_id, weight)
        return tr.tr("Server {server}: weight {weight:g}.", server=guild_id, weight=float(weight))

    await run_for_server(interaction, change, operator_only=True)


@app_commands.command(
    name="flagged-images", description="What this server does with images the safety filter flags"
)
@app_commands.describe(action="Withhold them, or show them as spoilers")
@app_commands.choices(
    action=[
        app_commands.Choice(name="withhold", value="withhold"),
        app_commands.Choice(name="spoiler", value="spoiler"),
    ]
)
async def flagged_images(interaction: discord.Interaction[FluxBot], action: str) -> None:
    async def change(service: AdminService, who: Requester, tr: Language) -> str:
        await service.community.set_flagged(who, action)
        return tr.tr("Flagged images on this server: {action}.", action=action)

    await run_for_server(interaction, change)
