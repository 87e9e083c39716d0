"""How jobs look in Discord: short texts, progress bars and footers. Pure functions, no I/O."""

from __future__ import annotations

import re

from discord.utils import escape_markdown, escape_mentions

from bot.services.admin import QueueView, Stats
from bot.services.studio import HistoryPage, Ticket
from bot.services.workers import WorkerInfo
from bot.store.models import Job, JobKind, JobStatus
from engine.text import clean_text

BAR_CELLS = 12
_URL_SCHEME = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*):(//)")


def inert(text: str) -> str:
    """User text as Discord shows it literally: no markdown, no masked or bare links, no mention pills.
    (The allowed mentions keep it from pinging; this keeps it from looking like a ping or a link.)"""
    return _escaped(clean_text(text))


def _escaped(text: str) -> str:
    text = escape_mentions(escape_markdown(text, ignore_links=False))
    text = text.replace("<", "<\u200b")  # <@id>, <#channel>, <t:…>, <https://…>: shown, not parsed
    return _URL_SCHEME.sub("\\1:\u200b\\2", text)  # a zero-width space breaks autolinking


def short(prompt: str, limit: int = 80) -> str:
    """A prompt shortened to `limit` characters, then made inert (escapes may lengthen it)."""
    prompt = " ".join(clean_text(prompt).split())  # cleaned once, before it is cut to length
    return _escaped(prompt if len(prompt) <= limit else prompt[: limit - 1] + "…")


def duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds} s" if seconds < 90 else f"{seconds // 60} min {seconds % 60:02d} s"


def saving() -> str:
    return "⏳ Saving your request… (fluxbot's database is slow right now)"


def queued(prompt: str, ticket: Ticket) -> str:
    if ticket.position == 0:
        where = "starting"
    else:
        where = "next in line" if ticket.position == 1 else f"#{ticket.position} in the queue"
    lines = [f"**{short(prompt)}**", f"⏳ {where} · ETA ~{duration(ticket.eta_s)} · job {ticket.job_id}"]
    lines += [f"⚠️ {w}" for w in ticket.warnings]
    return "\n".join(lines)


def progress(job: Job, step: int, total: int, eta_s: float) -> str:
    filled = round(BAR_CELLS * step / max(total, 1))
    bar = "█" * filled + "░" * (BAR_CELLS - filled)
    return (
        f"**{short(job.spec.prompt)}**\n🎨 `{bar}` {step}/{total} steps · "
        f"~{duration(eta_s)} left · job {job.id}"
    )


def started(job: Job) -> str:
    return f"**{short(job.spec.prompt)}**\n🎨 starting… · job {job.id}"


def footer(job: Job) -> str:
    spec = job.spec
    seeds = ", ".join(str(image.seed) for image in job.images) or str(spec.seed)
    took = (job.timings or {}).get("total_s", 0.0)
    loras = ", ".join(f"{lo.name}:{lo.weight:g}" for lo in spec.loras if lo.weight)
    parts = [f"seed {seeds}", spec.preset, spec.size, f"job {job.id}", f"{took:.1f} s"]
    if loras:
        parts.insert(3, loras)
    if (made := _made_from(job)) is not None:
        parts.insert(0, made)
    return f"**{short(spec.prompt, 200)}** — <@{job.user_id}>\n-# " + " · ".join(parts)


def _made_from(job: Job) -> str | None:
    """How an image-in job was made: its kind, strength and the job it started from."""
    spec = job.spec
    if spec.init_image is None:
        return None
    parent = f" of job {job.parent_id}" if job.parent_id else ""
    if spec.mode == "edit":
        return f"Kontext edit{parent}"
    made = {
        JobKind.VARY_SUBTLE: "vary (subtle)",
        JobKind.VARY_STRONG: "vary (strong)",
        JobKind.UPSCALE: "upscale x2",
    }.get(job.kind, "from an image")
    return f"{made}{parent}, strength {spec.strength:g}"


SAFETY_NOTES = {
    "withhold": "🛡️ The image was withheld: the safety filter flagged it, and this channel is not "
    "age-restricted.",
    "spoiler": "🛡️ Flagged by the safety filter: shown as a spoiler.",
}


JPEG_NOTE = (
    "📎 Too large for this channel's upload limit as PNG: sent as JPEG. The PNG, with its recipe, is "
    "kept (/rerun {job_id} draws it again)."
)


def final(job: Job, safety_action: str | None = None, as_jpeg: bool = False) -> str:
    """The result message. `safety_action`: what the delivery did with flagged images, if anything;
    `as_jpeg`: the PNGs were over the upload limit and JPEG copies went out instead."""
    if job.status == JobStatus.DONE:
        notes = [SAFETY_NOTES.get(safety_action or ""), JPEG_NOTE.format(job_id=job.id) if as_jpeg else None]
        return footer(job) + "".join(f"\n{note}" for note in notes if note)
    if job.status == JobStatus.CANCELLED:
        return f"**{short(job.spec.prompt)}**\n🚫 job {job.id} {job.error or 'cancelled'}."
    return f"**{short(job.spec.prompt)}** — <@{job.user_id}>\n❌ job {job.id} failed: {job.error}"


def history(page: HistoryPage, whose: str) -> str:
    if not page.jobs:
        return f"No jobs yet for {inert(whose)}."
    lines = [f"**Jobs of {inert(whose)}** (page {page.page}/{page.pages}, {page.total} in all)"]
    for job in page.jobs:
        lines.append(
            f"`{job.id:>6}` {job.status.value:<9} seed {job.spec.seed} · {short(job.spec.prompt, 60)}"
        )
    return "\n".join(lines)


def queue(view: QueueView) -> str:
    head = "⏸️ queue paused" if view.paused else "▶️ queue running"
    entries = view.entries
    elsewhere = f" (+{view.elsewhere} from other servers or DMs)" if view.elsewhere else ""
    if not entries:
        return f"{head}: nothing from this server{elsewhere}."
    lines = [f"{head}: {sum(1 for e in entries if e.state == 'waiting')} waiting here{elsewhere}"]
    for entry in entries[:20]:
        where = entry.state if entry.state != "waiting" else f"#{entry.position}"
        eta = f" · ETA ~{duration(entry.eta_s)}" if entry.state != "saving" else ""
        lines.append(f"{where:>8} · job {entry.job_id} · <@{entry.user_id}>{eta}")
    return "\n".join(lines)


def stats(data: Stats) -> str:
    statuses = ", ".join(f"{n} {status}" for status, n in sorted(data.by_status.items())) or "none"
    speeds = ", ".join(f"{preset} {s:.1f} s" for preset, s in sorted(data.seconds_per_image.items())) or "n/a"
    running = f"{data.running} running" if data.running else "idle"
    share = f" ({100 * data.steps_cached / data.steps:.0f} %)" if data.steps else ""
    return (
        f"**fluxbot stats**\nqueue: {data.queued} waiting, {running}\njobs today: {data.jobs_today} "
        f"({statuses})\naverage per image: {speeds}\nsteps skipped by step caches today: "
        f"{data.steps_cached} of {data.steps}{share}\nuptime: {duration(data.uptime_s)}"
    )


def workers(infos: list[WorkerInfo]) -> str:
    if not infos:
        return "No engine worker is up: start one with `fluxbot worker` (same FLUXBOT_QUEUE as the bot)."
    busy = sum(1 for w in infos if w.state == "busy")
    lines = [f"**{len(infos)} worker{'s' if len(infos) != 1 else ''}** ({busy} busy)"]
    for w in infos[:20]:
        state = f"busy with job {w.job_id}" if w.state == "busy" and w.job_id else w.state
        vram = f" · {w.free_vram_gb:.1f} GB VRAM free" if w.free_vram_gb is not None else ""
        loras = f" · LoRAs: {', '.join(w.resident_loras)}" if w.resident_loras else ""
        speed = f" · {w.compile} compile (warm-up {w.warmup_s:g} s)" if w.warmup_s is not None else ""
        speed += f" · attention {w.attention}" if w.attention != "native" else ""
        lines.append(
            f"`{w.name}` {state} · {w.model} ({w.family}, {w.quant}) on {w.device}{vram} · "
            f"{w.jobs_done} done, {w.jobs_failed} failed · {w.jobs_per_min:.1f} jobs/min{speed}{loras}"
        )
    return "\n".join(lines)
