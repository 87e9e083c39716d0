"""Buttons under every result. Dynamic items keep working after a restart: the job id is in custom_id."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, cast

import discord

from bot.commands.context import private
from bot.commands.submit import submit
from bot.i18n import Language
from bot.services.studio import JobPicture, Move

if TYPE_CHECKING:
    from bot.client import FluxBot

# action -> emoji. "vary" is the next seeds of the same recipe; Subtle/Strong redraw the picture itself.
ACTIONS = {
    "reroll": "🔁",
    "vary": "🎲",
    "subtle": "🪶",
    "strong": "🌪️",
    "upscale": "🔍",
    "edit": "✏️",  # only when FLUX.1 Kontext is loaded
    # Vary (Region), Zoom Out and Pan: only when FLUX.1 Fill is loaded (Vary (Region): and a segmenter)
    "region": "🖌️",
    "zoom15": "🔭",
    "zoom2": "🌌",
    "left": "⬅️",
    "up": "⬆️",
    "right": "➡️",
    "down": "⬇️",
}
OUTPAINTS = ("zoom15", "zoom2", "left", "up", "right", "down")


def label(tr: Language, action: str) -> str:
    """A button's label in the result message's language (Discord: at most 80 characters)."""
    labels = {
        "reroll": tr.ctext("button", "Reroll"),
        "vary": tr.ctext("button", "4 more seeds"),
        "subtle": tr.ctext("button", "Vary (Subtle)"),
        "strong": tr.ctext("button", "Vary (Strong)"),
        "upscale": tr.ctext("button", "Upscale"),
        "edit": tr.ctext("button", "Edit"),
        "region": tr.ctext("button", "Vary (Region)"),
        "zoom15": tr.ctext("button", "Zoom Out 1.5x"),
        "zoom2": tr.ctext("button", "Zoom Out 2x"),
        "left": tr.ctext("button", "Pan left"),
        "up": tr.ctext("button", "Pan up"),
        "right": tr.ctext("button", "Pan right"),
        "down": tr.ctext("button", "Pan down"),
    }
    return labels[action]


class JobButton(
    discord.ui.DynamicItem[discord.ui.Button[Any]],
    template=r"fluxbot:(?P<action>reroll|vary|subtle|strong|upscale|edit|region|zoom15|zoom2|left|up|right|down):(?P<job>\d+)",
):
    def __init__(self, action: str, job_id: int, text: str | None = None) -> None:
        super().__init__(
            discord.ui.Button(
                label=text or action,  # a pressed button is rebuilt from its custom_id: no label needed
                emoji=ACTIONS[action],
                style=discord.ButtonStyle.secondary,
                custom_id=f"fluxbot:{action}:{job_id}",
            )
        )
        self.action = action
        self.job_id = job_id

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction[Any], item: discord.ui.Item[Any], match: re.Match[str], /
    ) -> JobButton:
        return cls(match["action"], int(match["job"]))

    async def callback(self, interaction: discord.Interaction[Any]) -> None:
        # discord.py types an item's interaction by the view's client type; this one is always FluxBot.
        client: FluxBot = interaction.client
        studio = client.app.studio
        job_id, action = self.job_id, self.action
        if action == "reroll":
            await submit(interaction, lambda who, on_stored: studio.reroll(who, job_id, on_stored))
        elif action == "vary":
            await submit(interaction, lambda who, on_stored: studio.variations(who, job_id, on_stored))
        elif action == "edit":
            await interaction.response.send_modal(EditModal(job_id, private(interaction)))
        elif action in OUTPAINTS:
            await interaction.response.send_modal(
                OutpaintModal(job_id, cast(Move, action), private(interaction))
            )
        elif action == "region":
            await interaction.response.send_modal(RegionModal(job_id, private(interaction)))
        elif action in ("subtle", "strong"):
            strong = action == "strong"
            await submit(interaction, lambda who, on_stored: studio.vary(who, job_id, strong, on_stored))
        else:
            await submit(interaction, lambda who, on_stored: studio.upscale(who, job_id, on_stored))


class EditModal(discord.ui.Modal):
    """The Edit button's form: one instruction, then a Kontext edit of that job's picture."""

    def __init__(self, job_id: int, tr: Language) -> None:
        # In the presser's language; Discord: title and label at most 45 characters, placeholder 100.
        super().__init__(
            title=tr.ctext("modal title", "Edit job {job}", job=job_id),
            custom_id=f"fluxbot:edit-form:{job_id}",
        )
        self.job_id = job_id
        self.instruction: discord.ui.TextInput[EditModal] = discord.ui.TextInput(
            label=tr.ctext("modal label", "What to change"),
            placeholder=tr.ctext(
                "modal placeholder",
                "make it night · replace the hat with a crown · turn it into a watercolor",
            ),
            max_length=500,
        )
        self.add_item(self.instruction)

    async def on_submit(self, interaction: discord.Interaction[Any]) -> None:
        client: FluxBot = interaction.client
        studio = client.app.studio
        text, job_id = self.instruction.value, self.job_id
        await submit(
            interaction, lambda who, on_stored: studio.edit(who, text, [JobPicture(job_id)], on_stored)
        )


class RegionModal(discord.ui.Modal):
    """Vary (Region)'s form: what to repaint (words the segmenter finds) and what to paint there."""

    def __init__(self, job_id: int, tr: Language) -> None:
        super().__init__(
            title=tr.ctext("modal title", "Vary a region of job {job}", job=job_id),
            custom_id=f"fluxbot:region-form:{job_id}",
        )
        self.job_id = job_id
        self.where: discord.ui.TextInput[RegionModal] = discord.ui.TextInput(
            label=tr.ctext("modal label", "What to repaint"),
            placeholder=tr.ctext("modal placeholder", "the sky · the red car · her hat"),
            max_length=200,
        )
        self.prompt: discord.ui.TextInput[RegionModal] = discord.ui.TextInput(
            label=tr.ctext("modal label", "What to paint there"),
            placeholder=tr.ctext("modal placeholder", "a stormy sky at dusk"),
            max_length=1000,
        )
        self.add_item(self.where)
        self.add_item(self.prompt)

    async def on_submit(self, interaction: discord.Interaction[Any]) -> None:
        client: FluxBot = interaction.client
        studio = client.app.studio
        where, prompt, job_id = self.where.value, self.prompt.value, self.job_id
        await submit(
            interaction,
            lambda who, on_stored: studio.inpaint(who, prompt, JobPicture(job_id), where, on_stored),
        )


class OutpaintModal(discord.ui.Modal):
    """Zoom Out / Pan's form: the prompt the new border is drawn with (empty: the job's own)."""

    def __init__(self, job_id: int, move: Move, tr: Language) -> None:
        super().__init__(
            title=tr.ctext("modal title", "Widen job {job}", job=job_id),
            custom_id=f"fluxbot:{move}-form:{job_id}",
        )
        self.job_id, self.move = job_id, move
        self.prompt: discord.ui.TextInput[OutpaintModal] = discord.ui.TextInput(
            label=tr.ctext("modal label", "Prompt for the new border"),
            placeholder=tr.ctext("modal placeholder", "Leave empty to keep the job's own prompt"),
            required=False,
            max_length=1000,
        )
        self.add_item(self.prompt)

    async def on_submit(self, interaction: discord.Interaction[Any]) -> None:
        client: FluxBot = interaction.client
        studio = client.app.studio
        job_id, move, prompt = self.job_id, self.move, self.prompt.value.strip() or None
        await submit(
            interaction, lambda who, on_stored: studio.outpaint(who, job_id, move, on_stored, prompt)
        )


REDRAWS = ("subtle", "strong")  # FLUX.1's image-to-image
SEEDED = ("reroll", "vary")  # new seeds: not under an upscale without a redraw, which reads none


def result_view(
    tr: Language,
    job_id: int,
    edits: bool = False,
    redraws: bool = True,
    outpaints: bool = False,
    regions: bool = False,
    upscales: bool = False,
    seeded: bool = True,
) -> discord.ui.View:
    """The buttons a result gets: Edit where the model edits, Vary where it redraws, Upscale where it
    redraws or an upscaler model enlarges, Zoom Out and Pan where FLUX.1 Fill is loaded, Vary
    (Region) where a segmenter is too (at most 13 buttons: three of Discord's rows of five)."""
    view = discord.ui.View(timeout=None)
    for action in ACTIONS:
        shown = (
            (action != "edit" or edits)
            and (action not in REDRAWS or redraws)
            and (action != "upscale" or redraws or upscales)
            and (action not in SEEDED or seeded)
            and (action not in OUTPAINTS or outpaints)
            and (action != "region" or regions)
        )
        if shown:
            view.add_item(JobButton(action, job_id, label(tr, action)))
    return view
