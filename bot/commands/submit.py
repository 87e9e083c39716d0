"""The shared path of every job-creating interaction: store the job first, then answer with its place.

Write-ahead: the job (with the interaction's id and token, for delivery) is committed before Discord
gets any answer, and the first answer is the queued message itself. If the store is slow, Discord still
gets an answer within its 3 s that says so, and claims nothing; the queued text replaces it once the job
is stored, or an ephemeral refusal does if it was not.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import discord

from bot import render
from bot.commands.context import reply_error, requester
from bot.mentions import NOBODY
from bot.services.studio import OnStored, Requester, Ticket
from bot.store.database import is_store_fault

log = logging.getLogger(__name__)
# Discord drops an interaction not answered within 3 s; leave room for the answer's own round trip.
ANSWER_WITHIN_S = 2.0

Create = Callable[[Requester, OnStored], Awaitable[Ticket]]


async def submit(interaction: discord.Interaction, create: Create) -> None:
    client = interaction.client
    delivery = client.delivery  # type: ignore[attr-defined]
    held: list[int] = []

    def on_stored(job_id: int) -> None:
        held.append(job_id)
        delivery.hold(job_id)

    admission = asyncio.ensure_future(create(requester(interaction), on_stored))
    message_id: int | None = None
    try:
        done, _ = await asyncio.wait({admission}, timeout=ANSWER_WITHIN_S)
        if not done:
            await interaction.response.send_message(render.saving(), allowed_mentions=NOBODY)
        ticket = await admission
        text = render.queued(ticket.prompt, ticket)
        if interaction.response.is_done():
            message_id = (await interaction.edit_original_response(content=text, allowed_mentions=NOBODY)).id
        else:
            callback = await interaction.response.send_message(text, allowed_mentions=NOBODY)
            message_id = callback.message_id or (await interaction.original_response()).id
        await _remember(client, ticket.job_id, message_id)
    except Exception as exc:
        if interaction.response.is_done():  # our public "saving…" message: the refusal is private
            with contextlib.suppress(discord.HTTPException):
                await interaction.delete_original_response()
        await reply_error(interaction, exc)
    finally:
        for job_id in held:
            delivery.release(job_id, message_id)


async def _remember(client: discord.Client, job_id: int, message_id: int) -> None:
    """Which message shows the job (for 🔁 reactions, and for edits after the token expires)."""
    try:
        await client.app.jobs.set_message(job_id, message_id)  # type: ignore[attr-defined]
    except Exception as exc:
        if not is_store_fault(exc):
            raise
        log.warning("job %d: could not store its message id (%s); delivery uses the interaction", job_id, exc)
