"""/imagine, /upscale, /rerun, /history and /edit: parse the options, call the Studio, render."""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands

from bot import render
from bot.commands.context import private, reply_error, requester
from bot.commands.submit import submit
from bot.i18n import Language
from bot.mentions import NOBODY
from bot.services.errors import UserError
from bot.services.studio import EDITS_OFF, INPAINTS_OFF, JobPicture, OnStored, Requester, Studio, Ticket
from engine.input_image import InputImage
from engine.messages import Message

if TYPE_CHECKING:
    from bot.client import FluxBot

log = logging.getLogger(__name__)
SIZES = ["1024x1024", "1:1", "4:3", "3:4", "3:2", "2:3", "16:9", "9:16", "1216x832", "832x1216"]


def _studio(interaction: discord.Interaction[FluxBot]) -> Studio:
    return interaction.client.app.studio


async def preset_autocomplete(
    interaction: discord.Interaction[FluxBot], current: str
) -> list[app_commands.Choice[str]]:
    presets = _studio(interaction).rules.catalog.presets
    return [
        app_commands.Choice(name=f"{name}: {p.description}"[:100], value=name)
        for name, p in presets.items()
        if current.lower() in name.lower()
    ][:25]


async def lora_autocomplete(
    interaction: discord.Interaction[FluxBot], current: str
) -> list[app_commands.Choice[str]]:
    entries = _studio(interaction).rules.catalog.loras
    return [
        app_commands.Choice(name=name, value=name)
        for name in sorted(entries)
        if current.lower() in name.lower()
    ][:25]


async def size_autocomplete(
    interaction: discord.Interaction[FluxBot], current: str
) -> list[app_commands.Choice[str]]:
    return [app_commands.Choice(name=s, value=s) for s in SIZES if current in s][:25]


@app_commands.command(name="imagine", description="Draw a picture from a prompt")
@app_commands.describe(
    prompt="What to draw",
    preset="dev, schnell, fast… (sets steps, guidance, size)",
    size="WxH or an aspect like 16:9",
    seed="Same seed + same settings = same picture",
    steps="Denoising steps",
    guidance="Distilled guidance (dev)",
    lora="A whitelisted LoRA",
    lora_weight="Its weight (default: the whitelist's)",
    image="An image to start from (PNG, JPEG or WebP): the picture follows it",
    strength="With an image: how much is redrawn (0.3 keeps the composition, 1.0 redraws all)",
    enhance="Let an AI expand the prompt into a detailed scene first (shown with the result)",
)
@app_commands.autocomplete(preset=preset_autocomplete, lora=lora_autocomplete, size=size_autocomplete)
async def imagine(
    interaction: discord.Interaction[FluxBot],
    prompt: str,
    preset: str | None = None,
    size: str | None = None,
    seed: int | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    lora: str | None = None,
    lora_weight: float | None = None,
    image: discord.Attachment | None = None,
    strength: float | None = None,
    enhance: bool | None = None,
) -> None:
    studio = _studio(interaction)
    # As plain data: validate() checks the weight (10, NaN) and names the option in its answer.
    loras = ({"name": lora[:64], "weight": lora_weight},) if lora else None
    preset = preset or studio.default_preset(requester(interaction, with_token=False))
    try:
        request = studio.validate(
            image_coming=image is not None,
            guild_id=interaction.guild_id,
            prompt=prompt,
            preset=preset,
            size=size,
            seed=seed,
            steps=steps,
            guidance=guidance,
            loras=loras,
            strength=strength,
            enhance=enhance,
        )
        if image is not None:
            check_attachment(image, studio.images.max_input_mb)
    except UserError as exc:
        await reply_error(interaction, UserError(_option_names(exc.message, private(interaction))))
        return

    async def create(who: Requester, on_stored: OnStored) -> Ticket:
        pinned = request
        if image is not None:
            # Downloaded and checked inside submit(): slow uploads still get their answer in 3 s.
            stored = await studio.image_prompt(await image.read())
            size_now = request.size or studio.size_for_input(request, stored, interaction.guild_id)
            pinned = request.model_copy(update={"init_image": stored.sha256, "size": size_now})
        return await studio.imagine(who, pinned, on_stored=on_stored)

    await submit(interaction, create)


def check_attachment(attachment: discord.Attachment, max_mb: float) -> None:
    """What Discord says about an attachment, checked before it is downloaded (the bytes decide later)."""
    if attachment.size > max_mb * 1e6:
        raise UserError(
            "That image is {mb:.1f} MB; the limit is {limit:g} MB.",
            mb=attachment.size / 1e6,
            limit=float(max_mb),
        )
    kind = (attachment.content_type or "").split(";")[0].strip().lower()
    if kind and kind not in {"image/png", "image/jpeg", "image/webp"}:
        raise UserError("That file is {kind}, not a PNG, JPEG or WebP image.", kind=kind[:40])


@app_commands.command(
    name="upscale", description="Upscale one of your results (the upscaler model, then a light redraw)"
)
@app_commands.describe(
    job_id="The job's number (see /history)",
    picture="Which of its pictures (default 1)",
    factor="How much larger (default: 4x where the size cap allows it with a model, else 2x)",
    redraw="Redraw lightly at the new size (default yes on FLUX.1); no: the upscaler model alone",
)
@app_commands.choices(factor=[app_commands.Choice(name=f"{x}x", value=x) for x in (2, 4)])
async def upscale(
    interaction: discord.Interaction[FluxBot],
    job_id: int,
    picture: int = 1,
    factor: int | None = None,
    redraw: bool | None = None,
) -> None:
    studio = _studio(interaction)
    await submit(
        interaction, lambda who, on_stored: studio.upscale(who, job_id, on_stored, picture, factor, redraw)
    )


_OPTIONS = {"loras.0.weight": "lora_weight", "loras.0.name": "lora"}


def _option_names(message: Message, tr: Language) -> Message:
    """A request field a refusal names (`where`), as the option the user typed, in their language."""
    where = message.values.get("where")
    if not isinstance(where, str):
        return message
    option = _OPTIONS.get(where, where)
    return Message(message.template, **{**message.values, "where": tr.name(option) or option})


@app_commands.command(name="rerun", description="Run one of the stored jobs again")
@app_commands.describe(
    job_id="The job's number (see /history)", seed="A new seed; without one: the same picture"
)
async def rerun(interaction: discord.Interaction[FluxBot], job_id: int, seed: int | None = None) -> None:
    studio = _studio(interaction)
    await submit(interaction, lambda who, on_stored: studio.rerun(who, job_id, seed, on_stored))


@app_commands.command(name="history", description="Your recent jobs (or someone else's)")
@app_commands.describe(user="Whose jobs (default: yours)", page="Page number")
async def history(
    interaction: discord.Interaction[FluxBot], user: discord.User | None = None, page: int = 1
) -> None:
    target = user or interaction.user
    try:
        result = await _studio(interaction).history(requester(interaction, with_token=False), target.id, page)
    except UserError as exc:
        await reply_error(interaction, exc)
        return
    await interaction.response.send_message(
        render.history(private(interaction), result, target.display_name),
        ephemeral=True,
        allowed_mentions=NOBODY,
    )


@app_commands.command(
    name="edit", description="Edit pictures with an instruction (FLUX.1 Kontext, or FLUX.2's references)"
)
@app_commands.describe(
    instruction='What to change, e.g. "make it night" or "put the cat from image 2 on the sofa"',
    job_id="The job whose picture to edit (see /history)",
    image="Or: the picture to edit (PNG, JPEG or WebP)",
    picture="With job_id: which of its pictures (default 1)",
    image2="FLUX.2/FLUX.3: another reference image",
    image3="FLUX.2/FLUX.3: another reference image",
    jobs="FLUX.2/FLUX.3: more reference jobs after those, e.g. 12 15:2 (job:picture)",
    enhance="FLUX.3 with its upsampler: expand the instruction from the pictures first (shown too)",
)
async def edit(
    interaction: discord.Interaction[FluxBot],
    instruction: str,
    job_id: int | None = None,
    image: discord.Attachment | None = None,
    picture: int = 1,
    image2: discord.Attachment | None = None,
    image3: discord.Attachment | None = None,
    jobs: str | None = None,
    enhance: bool | None = None,
) -> None:
    studio = _studio(interaction)
    # The references in the order the options are listed: job_id, image, image2, image3, jobs.
    order: list[JobPicture | discord.Attachment] = []
    try:
        if not studio.edits:
            raise UserError(EDITS_OFF)
        if job_id is not None:
            order.append(JobPicture(job_id, picture))
        order += [a for a in (image, image2, image3) if a is not None]
        order += parse_job_pictures(jobs or "")
        if picture != 1 and job_id is None:
            raise UserError("picture goes with job_id: which of that job's pictures to edit.")
        studio.check_edit_count(interaction.guild_id, len(order))  # before any upload is read
        for attachment in order:
            if isinstance(attachment, discord.Attachment):
                check_attachment(attachment, studio.images.max_input_mb)
    except UserError as exc:
        await reply_error(interaction, exc)
        return

    async def create(who: Requester, on_stored: OnStored) -> Ticket:
        references = [
            await studio.image_prompt(await item.read()) if isinstance(item, discord.Attachment) else item
            for item in order
        ]
        return await studio.edit(who, instruction, references, on_stored, enhance)

    await submit(interaction, create)


@app_commands.command(name="inpaint", description="Repaint part of a picture: white in the mask is redrawn")
@app_commands.describe(
    prompt="What to paint there",
    where='Words naming the part to repaint, e.g. "the sky" (or attach a mask)',
    mask="Or: a mask (PNG, JPEG or WebP, the picture's aspect): white = repaint, black = keep",
    job_id="The job whose picture to repaint (see /history)",
    image="Or: the picture to repaint",
    picture="With job_id: which of its pictures (default 1)",
)
async def inpaint(
    interaction: discord.Interaction[FluxBot],
    prompt: str,
    where: str | None = None,
    mask: discord.Attachment | None = None,
    job_id: int | None = None,
    image: discord.Attachment | None = None,
    picture: int = 1,
) -> None:
    studio = _studio(interaction)
    try:
        if not studio.inpaints:
            raise UserError(INPAINTS_OFF)
        if (image is None) == (job_id is None):
            raise UserError("Give exactly one of job_id or image: the picture to repaint.")
        if (mask is None) == (where is None):
            raise UserError("Give exactly one of where or mask: the part to repaint.")
        if picture != 1 and job_id is None:
            raise UserError("picture goes with job_id: which of that job's pictures to edit.")
        for attachment in (mask, image):
            if attachment is not None:
                check_attachment(attachment, studio.images.max_input_mb)
    except UserError as exc:
        await reply_error(interaction, exc)
        return

    async def create(who: Requester, on_stored: OnStored) -> Ticket:
        part: InputImage | str = (
            await studio.image_prompt(await mask.read()) if mask is not None else where or ""
        )
        target: JobPicture | InputImage = (
            await studio.image_prompt(await image.read())
            if image is not None
            else JobPicture(job_id or 0, picture)
        )
        return await studio.inpaint(who, prompt, target, part, on_stored)

    await submit(interaction, create)


_JOB_PICTURE = re.compile(r"^#?(\d{1,19})(?::(\d{1,2}))?$")


def parse_job_pictures(text: str) -> list[JobPicture]:
    """`12 15:2, #20`: job ids, each with an optional picture number, in order."""
    found = []
    for word in text.replace(",", " ").split():
        match = _JOB_PICTURE.match(word)
        if match is None:
            raise UserError("jobs: {word!r} is not a job number (write e.g. 12 or 12:2).", word=word[:20])
        found.append(JobPicture(int(match[1]), int(match[2] or 1)))
    return found


COMMANDS: list[app_commands.Command[Any, Any, None]] = [imagine, rerun, history, upscale, edit, inpaint]
