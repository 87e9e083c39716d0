"""The shared path of every job-creating interaction and reaction: store the job first, then answer
with its place.

Write-ahead: the job (with the interaction's id and token, for delivery) is committed before Discord
gets any answer, and the first answer is the queued message itself. If the store is slow, Discord still
gets an answer within its 3 s that says so, and claims nothing; the queued text replaces it once the job
is stored, or an ephemeral refusal does if it was not. Meanwhile the job's own progress and result are
held back (`Held`), so nothing about it reaches Discord before its first answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import discord

from bot import render
from bot.commands.context import public, reply_error, requester
from bot.delivery import DiscordDelivery
from bot.mentions import NOBODY
from bot.services.studio import OnStored, Requester, Studio, Ticket
from bot.store.database import is_store_fault

if TYPE_CHECKING:
    from bot.client import FluxBot

log = logging.getLogger(__name__)
# Discord drops an interaction not answered within 3 s; leave room for the answer's own round trip.
ANSWER_WITHIN_S = 2.0

Create = Callable[[Requester, OnStored], Awaitable[Ticket]]


class Held:
    """Jobs stored while their first answer is on its way: their progress and result wait for it
    (and then edit the message it names). Use as a context manager: released whatever happens."""

    def __init__(self, delivery: DiscordDelivery) -> None:
        self.delivery = delivery
        self.job_ids: list[int] = []
        self.message_id: int | None = None

    def on_stored(self, job_id: int) -> None:
        self.job_ids.append(job_id)
        self.delivery.hold(job_id)

    def __enter__(self) -> Held:
        return self

    def __exit__(self, *exc: object) -> None:
        for job_id in self.job_ids:
            self.delivery.release(job_id, self.message_id)


async def submit(interaction: discord.Interaction[FluxBot], create: Create) -> None:
    client = interaction.client
    tr = public(interaction)  # the queued message is public: the server's language
    with Held(client.delivery) as held:
        admission = asyncio.ensure_future(create(requester(interaction), held.on_stored))
        try:
            done, _ = await asyncio.wait({admission}, timeout=ANSWER_WITHIN_S)
            if not done:
                await interaction.response.send_message(render.saving(tr), allowed_mentions=NOBODY)
            ticket = await admission
            text = render.queued(tr, ticket.prompt, ticket)
            if interaction.response.is_done():
                message = await interaction.edit_original_response(content=text, allowed_mentions=NOBODY)
                held.message_id = message.id
            else:
                callback = await interaction.response.send_message(text, allowed_mentions=NOBODY)
                held.message_id = callback.message_id or (await interaction.original_response()).id
            await remember_message(client.app.studio, ticket.job_id, held.message_id)
        except Exception as exc:
            if interaction.response.is_done():  # our public "saving…" message: the refusal is private
                with contextlib.suppress(discord.HTTPException):
                    await interaction.delete_original_response()
            await reply_error(interaction, exc)


async def remember_message(studio: Studio, job_id: int, message_id: int) -> None:
    """Which message shows the job (for 🔁 reactions, and for edits after the token expires)."""
    try:
        await studio.admissions.remember_message(job_id, message_id)
    except Exception as exc:
        if not is_store_fault(exc):
            raise
        log.warning("job %d: could not store its message id (%s); delivery uses the interaction", job_id, exc)
