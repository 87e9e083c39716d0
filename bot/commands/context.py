"""Turning a discord.py Interaction into the service-level Requester, its languages, and answering
errors."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import discord

from bot import render
from bot.i18n import Language
from bot.mentions import NOBODY
from bot.services.errors import UserError
from bot.services.studio import Requester
from bot.services.visibility import ChannelCheck, no_channel

if TYPE_CHECKING:
    from bot.client import FluxBot

log = logging.getLogger(__name__)


def private(interaction: discord.Interaction[FluxBot] | discord.Interaction[Any]) -> Language:
    """The language of answers only the asker sees: their own Discord locale."""
    client: FluxBot = interaction.client
    return client.languages.for_locale(interaction.locale)


def public(interaction: discord.Interaction[FluxBot] | discord.Interaction[Any]) -> Language:
    """The language of messages the channel sees: the server's locale (the asker's in a DM)."""
    client: FluxBot = interaction.client
    return client.languages.for_locale(public_locale(interaction))


def public_locale(interaction: discord.Interaction[Any]) -> str:
    where = interaction.guild_locale if interaction.guild_id is not None else None
    return str((where or interaction.locale).value)


def requester(interaction: discord.Interaction[Any], with_token: bool = True) -> Requester:
    user = interaction.user
    return Requester(
        user_id=user.id,
        user_name=user.name,
        guild_id=interaction.guild_id,
        channel_id=interaction.channel_id,
        application_id=interaction.application_id if with_token else None,
        interaction_id=interaction.id if with_token else None,
        interaction_token=interaction.token if with_token else None,
        can_view=channel_check(interaction.guild, user),
        age_restricted=age_restricted(interaction.channel, interaction.guild_id),
        upload_limit=interaction.filesize_limit,
        locale=str(interaction.locale.value),
        public_locale=public_locale(interaction),
        role_ids=tuple(role_ids(interaction)),
        parent_channel_id=parent_channel(interaction.channel),
    )


def parent_channel(channel: object) -> int | None:
    """The channel a thread is in (None for anything else): channel rules of a channel cover its threads."""
    return getattr(channel, "parent_id", None) if isinstance(channel, discord.Thread) else None


def channel_check(guild: discord.Guild | None, user: discord.abc.User | None) -> ChannelCheck:
    """Whether `user` can view a channel (or thread) of `guild` now, from discord.py's cache of the
    guild's roles and permission overwrites. A channel the cache does not know is not viewable."""
    if guild is None or not isinstance(user, discord.Member):
        return no_channel
    member = user

    def can_view(channel_id: int) -> bool:
        channel = guild.get_channel_or_thread(channel_id)
        return channel is not None and channel.permissions_for(member).view_channel

    return can_view


def age_restricted(channel: object, guild_id: int | None) -> bool:
    """Discord's rule for bots: sexual content only in age-restricted channels (threads follow their
    parent). A DM is the user's own: allowed."""
    if guild_id is None:
        return True
    is_nsfw = getattr(channel, "is_nsfw", None)
    return bool(is_nsfw()) if callable(is_nsfw) else False


def role_ids(interaction: discord.Interaction[Any]) -> list[int]:
    user = interaction.user
    return [role.id for role in user.roles] if isinstance(user, discord.Member) else []


async def reply_error(interaction: discord.Interaction[Any], error: Exception) -> None:
    """Every interaction gets an answer, in the asker's language: the user's error as is, anything else
    as a short apology."""
    tr = private(interaction)
    if isinstance(error, UserError):
        text = tr.message(error.message)
    else:
        text = tr.tr("Sorry, something went wrong on our side. It has been logged.")
    if not isinstance(error, UserError):
        log.error("interaction %s failed", interaction.id, exc_info=error)
    text = render.fit(text)
    try:
        if interaction.response.is_done():
            await interaction.followup.send(text, ephemeral=True, allowed_mentions=NOBODY)
        else:
            await interaction.response.send_message(text, ephemeral=True, allowed_mentions=NOBODY)
    except discord.HTTPException:
        log.warning("could not send the error for interaction %s", interaction.id)
