"""Buttons under every result. Dynamic items keep working after a restart: the job id is in custom_id."""

from __future__ import annotations

import re
from typing import Any

import discord

from bot import render
from bot.commands.context import reply_error, requester
from bot.services.errors import UserError


class JobButton(
    discord.ui.DynamicItem[discord.ui.Button[Any]], template=r"fluxbot:(?P<action>reroll|vary):(?P<job>\d+)"
):
    def __init__(self, action: str, job_id: int) -> None:
        label, emoji = ("Reroll", "🔁") if action == "reroll" else ("Variations", "🎲")
        super().__init__(
            discord.ui.Button(
                label=label,
                emoji=emoji,
                style=discord.ButtonStyle.secondary,
                custom_id=f"fluxbot:{action}:{job_id}",
            )
        )
        self.action = action
        self.job_id = job_id

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Item[Any], match: re.Match[str], /
    ) -> JobButton:
        return cls(match["action"], int(match["job"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        studio = interaction.client.app.studio  # type: ignore[attr-defined]
        who = requester(interaction)
        try:
            if self.action == "reroll":
                ticket = await studio.reroll(who, self.job_id)
            else:
                ticket = await studio.variations(who, self.job_id)
        except UserError as exc:
            await reply_error(interaction, exc)
            return
        job = await studio.jobs.get(ticket.job_id)
        await interaction.response.send_message(render.queued(job.request["prompt"], ticket))
        message = await interaction.original_response()
        await studio.jobs.set_message(ticket.job_id, message.id)


def result_view(job_id: int) -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    view.add_item(JobButton("reroll", job_id))
    view.add_item(JobButton("vary", job_id))
    return view
