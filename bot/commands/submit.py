"""The shared path of every job-creating interaction: ack at once, queue, show the position."""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable

import discord

from bot import render
from bot.commands.context import reply_error, requester
from bot.services.errors import UserError
from bot.services.studio import Requester, Ticket


async def submit(
    interaction: discord.Interaction,
    create: Callable[[Requester], Awaitable[Ticket]],
    prompt: str | None = None,
) -> None:
    """Defer first (Discord wants an answer within 3 s), then admit the job and edit in its place in line."""
    callback = await interaction.response.defer(thinking=True)
    message_id = getattr(callback, "message_id", None) or (await interaction.original_response()).id
    who = dataclasses.replace(requester(interaction), message_id=message_id)
    client = interaction.client
    try:
        ticket = await create(who)
    except UserError as exc:
        # The "thinking" message was public; the refusal is for the user's eyes only.
        await interaction.delete_original_response()
        await reply_error(interaction, exc)
        return
    if prompt is None:
        job = await client.app.jobs.get(ticket.job_id)  # type: ignore[attr-defined]
        prompt = job.request["prompt"] if job else ""
    text = render.queued(prompt or "", ticket)
    await client.delivery.queued(ticket.job_id, lambda: interaction.edit_original_response(content=text))  # type: ignore[attr-defined]
