"""Buttons under every result. Dynamic items keep working after a restart: the job id is in custom_id."""

from __future__ import annotations

import re
from typing import Any

import discord

from bot.commands.submit import submit


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
        if self.action == "reroll":
            await submit(interaction, lambda who, on_stored: studio.reroll(who, self.job_id, on_stored))
        else:
            await submit(interaction, lambda who, on_stored: studio.variations(who, self.job_id, on_stored))


def result_view(job_id: int) -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    view.add_item(JobButton("reroll", job_id))
    view.add_item(JobButton("vary", job_id))
    return view
