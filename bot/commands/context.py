"""Turning a discord.py Interaction into the service-level Requester, and answering errors."""

from __future__ import annotations

import logging

import discord

from bot.services.errors import UserError
from bot.services.studio import Requester

log = logging.getLogger(__name__)
GENERIC_ERROR = "Sorry, something went wrong on our side. It has been logged."


def requester(interaction: discord.Interaction, with_token: bool = True) -> Requester:
    user = interaction.user
    return Requester(
        user_id=user.id,
        user_name=user.name,
        guild_id=interaction.guild_id,
        channel_id=interaction.channel_id,
        application_id=interaction.application_id if with_token else None,
        interaction_id=interaction.id if with_token else None,
        interaction_token=interaction.token if with_token else None,
    )


def role_ids(interaction: discord.Interaction) -> list[int]:
    user = interaction.user
    return [role.id for role in user.roles] if isinstance(user, discord.Member) else []


async def reply_error(interaction: discord.Interaction, error: Exception) -> None:
    """Every interaction gets an answer: the user's error as is, anything else as a short apology."""
    text = str(error) if isinstance(error, UserError) else GENERIC_ERROR
    if not isinstance(error, UserError):
        log.error("interaction %s failed", interaction.id, exc_info=error)
    try:
        if interaction.response.is_done():
            await interaction.followup.send(text, ephemeral=True)
        else:
            await interaction.response.send_message(text, ephemeral=True)
    except discord.HTTPException:
        log.warning("could not send the error for interaction %s", interaction.id)
