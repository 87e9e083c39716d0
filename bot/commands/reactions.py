"""The 🔁 reaction: anyone reacting on a result rerolls it as their own job, posted as a new message."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import discord

from bot import render
from bot.commands.context import age_restricted, channel_check, parent_channel
from bot.commands.submit import Held, remember_message
from bot.delivery import REROLL_EMOJI
from bot.mentions import owner_only
from bot.services.errors import UserError
from bot.services.studio import Requester

if TYPE_CHECKING:
    from bot.client import FluxBot


async def on_reaction(client: FluxBot, payload: discord.RawReactionActionEvent) -> None:
    if str(payload.emoji) != REROLL_EMOJI or client.user is None or payload.user_id == client.user.id:
        return
    studio = client.app.studio
    member = payload.member
    guild = client.get_guild(payload.guild_id) if payload.guild_id is not None else None
    # No interaction, no locale: the post is public, in the server's language (the user's is unknown).
    locale = str(guild.preferred_locale.value) if guild is not None else None
    who = Requester(
        role_ids=tuple(role.id for role in member.roles) if member is not None else (),
        parent_channel_id=parent_channel(client.get_channel(payload.channel_id)),
        locale=locale,
        public_locale=locale,
        user_id=payload.user_id,
        user_name=member.name if member else "",
        guild_id=payload.guild_id,
        channel_id=payload.channel_id,
        can_view=channel_check(guild, member),
        age_restricted=age_restricted(client.get_channel(payload.channel_id), payload.guild_id),
    )
    job = await studio.job_on_message(who, payload.message_id)
    if job is None:
        return
    channel = client.get_partial_messageable(payload.channel_id)
    with Held(client.delivery) as held:
        try:
            ticket = await studio.reroll(who, job.id, held.on_stored)
        except UserError as exc:
            await _refuse(client, payload, exc, locale)
            return
        queued = render.queued(client.languages.for_locale(locale), ticket.prompt, ticket)
        message = await channel.send(
            f"<@{payload.user_id}> 🔁 {queued}",
            allowed_mentions=owner_only(payload.user_id),
        )
        held.message_id = message.id
        await remember_message(client.app.studio, ticket.job_id, message.id)


async def _refuse(
    client: FluxBot, payload: discord.RawReactionActionEvent, exc: UserError, locale: str | None
) -> None:
    """No interaction to answer privately: the reaction is taken off (where the bot may), and a short
    mention in the channel says why, at most once per user per window (NoticeThrottle)."""
    channel = client.get_partial_messageable(payload.channel_id)
    with contextlib.suppress(discord.HTTPException):  # needs Manage Messages; the notice still goes out
        await channel.get_partial_message(payload.message_id).remove_reaction(
            payload.emoji, discord.Object(payload.user_id)
        )
    if client.reaction_notices.allow(payload.user_id):
        text = client.languages.for_locale(locale).message(exc.message)
        await channel.send(
            render.fit(f"<@{payload.user_id}> {text}"), allowed_mentions=owner_only(payload.user_id)
        )
