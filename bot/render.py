"""How jobs look in Discord: short texts, progress bars and footers, in the reader's language (`tr`).
Pure functions, no I/O."""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping

from discord.utils import escape_markdown, escape_mentions

from bot.i18n import Language
from bot.services.admin import QueueView, Stats
from bot.services.community import ChannelRules, RoleRule, Source
from bot.services.community_admin import Explained
from bot.services.execution import INTERNAL_ERROR
from bot.services.outcomes import ENHANCED_BLOCKED
from bot.services.redis_executor import FAILURES
from bot.services.studio import HistoryPage, Ticket
from bot.services.workers import WorkerInfo
from bot.store.models import Job, JobKind, JobStatus
from engine.text import clean_text
from fluxbot.settings import LimitSettings

BAR_CELLS = 12
MESSAGE_LIMIT = 2000  # Discord refuses (400) a message whose content is longer
_URL_SCHEME = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*):(//)")


def inert(text: str) -> str:
    """User text as Discord shows it literally: no markdown, no masked or bare links, no mention pills.
    (The allowed mentions keep it from pinging; this keeps it from looking like a ping or a link.)"""
    return _escaped(clean_text(text))


def _escaped(text: str) -> str:
    text = escape_mentions(escape_markdown(text, ignore_links=False))
    text = text.replace("<", "<\u200b")  # <@id>, <#channel>, <t:…>, <https://…>: shown, not parsed
    return _URL_SCHEME.sub("\\1:\u200b\\2", text)  # a zero-width space breaks autolinking


def fit(text: str) -> str:
    """Message content within Discord's limit: a long list or a long stored error is cut, not refused."""
    return text if len(text) <= MESSAGE_LIMIT else text[: MESSAGE_LIMIT - 1] + "…"


def short(prompt: str, limit: int = 80) -> str:
    """A prompt shortened to `limit` characters, then made inert (escapes may lengthen it)."""
    prompt = " ".join(clean_text(prompt).split())  # cleaned once, before it is cut to length
    return _escaped(prompt if len(prompt) <= limit else prompt[: limit - 1] + "…")


def saving(tr: Language) -> str:
    return tr.tr("⏳ Saving your request… (fluxbot's database is slow right now)")


def queued(tr: Language, prompt: str, ticket: Ticket) -> str:
    if ticket.position == 0:
        where = tr.tr("starting")
    elif ticket.position == 1:
        where = tr.tr("next in line")
    else:
        where = tr.tr("#{position} in the queue", position=ticket.position)
    status = tr.tr(
        "⏳ {where} · ETA ~{eta} · job {job}", where=where, eta=tr.duration(ticket.eta_s), job=ticket.job_id
    )
    lines = [f"**{short(prompt)}**", status]
    lines += [f"⚠️ {tr.message(w)}" for w in ticket.warnings]
    return "\n".join(lines)


def progress(tr: Language, job: Job, step: int, total: int, eta_s: float) -> str:
    filled = round(BAR_CELLS * step / max(total, 1))
    bar = "█" * filled + "░" * (BAR_CELLS - filled)
    # An upscale without a redraw counts the upscaler model's tiles: it runs no denoising steps.
    unit = tr.tr("tiles") if job.spec.mode == "upscale" else tr.tr("steps")
    status = tr.tr(
        "{step}/{total} {unit} · ~{eta} left · job {job}",
        step=step,
        total=total,
        unit=unit,
        eta=tr.duration(eta_s),
        job=job.id,
    )
    return f"**{short(job.spec.prompt)}**\n🎨 `{bar}` {status}"


def started(tr: Language, job: Job) -> str:
    return f"**{short(job.spec.prompt)}**\n🎨 " + tr.tr("starting… · job {job}", job=job.id)


def footer(tr: Language, job: Job) -> str:
    spec = job.spec
    seeds = ", ".join(str(image.seed) for image in job.images) or str(spec.seed)
    took = (job.timings or {}).get("total_s", 0.0)
    loras = ", ".join(f"{lo.name}:{lo.weight:g}" for lo in spec.loras if lo.weight)
    parts = [
        tr.tr("seed {seeds}", seeds=seeds),
        spec.preset,
        spec.size,
        tr.tr("job {job}", job=job.id),
        tr.tr("{seconds:.1f} s", seconds=float(took)),
    ]
    if loras:
        parts.insert(3, loras)
    if (made := _made_from(tr, job)) is not None:
        parts.insert(0, made)
    return f"**{short(spec.prompt, 200)}** — <@{job.user_id}>\n-# " + " · ".join(parts)


def _made_from(tr: Language, job: Job) -> str | None:
    """How an image-in job was made: its kind, strength and the job it started from."""
    spec = job.spec
    if spec.init_image is None:
        return None
    if spec.mode == "upscale":
        return tr.tr("upscale of job {job} (upscaler model, no redraw)", job=job.parent_id or 0)
    if spec.mode == "inpaint" and job.kind == JobKind.OUTPAINT:
        return tr.tr("zoom out or pan of job {job}", job=job.parent_id or 0)
    if spec.mode == "inpaint":
        if job.parent_id:
            return tr.tr("inpaint of job {job}", job=job.parent_id)
        return tr.tr("inpaint")
    if spec.mode == "edit" and spec.family in ("flux2", "flux3"):
        more = len(spec.inputs) - 1
        if job.parent_id and more:
            return tr.plural(
                "edit of job {job} and {n} more image",
                "edit of job {job} and {n} more images",
                more,
                job=job.parent_id,
            )
        if job.parent_id:
            return tr.tr("edit of job {job}", job=job.parent_id)
        return tr.tr("edit of {count} images", count=more + 1) if more else tr.tr("edit")
    if spec.mode == "edit":
        if job.parent_id:
            return tr.tr("Kontext edit of job {job}", job=job.parent_id)
        return tr.tr("Kontext edit")
    made = {
        JobKind.VARY_SUBTLE: tr.tr("vary (subtle)"),
        JobKind.VARY_STRONG: tr.tr("vary (strong)"),
        JobKind.UPSCALE: tr.tr("upscale"),
    }.get(job.kind) or tr.tr("from an image")
    strength = float(spec.strength or 0.0)
    if job.parent_id:
        return tr.tr(
            "{made} of job {job}, strength {strength:g}", made=made, job=job.parent_id, strength=strength
        )
    return tr.tr("{made}, strength {strength:g}", made=made, strength=strength)


ENHANCED_SHOWN = 1200  # of an enhanced prompt, in the result message (the PNG's recipe has it all)


def enhance_note(tr: Language, job: Job, room: int = MESSAGE_LIMIT) -> str | None:
    """The prompt the model read when it was enhanced (a spoiler: long, and the user's own prompt
    stays the headline), in at most `room` characters, or why it was drawn as written although
    enhancement was asked for. Escaping can lengthen the text: it is cut until it fits, spoiler closed."""
    recipe = job.recipe or {}
    enhanced, failed = recipe.get("enhanced_prompt"), recipe.get("enhance_note")
    if isinstance(enhanced, str) and enhanced:
        label, limit = "✨ " + tr.tr("Enhanced prompt:"), ENHANCED_SHOWN
        while limit > 0:
            note = f"{label} ||{short(enhanced, limit)}||"
            if len(note) <= room:
                return note
            limit = min(limit - 1, int(limit * 0.8))
        return None
    if isinstance(failed, str) and failed:
        note = "✨ " + tr.tr("The prompt enhancer did not answer, so your prompt was drawn as written.")
        return note if len(note) <= room else None
    return None


def safety_note(tr: Language, action: str | None) -> str | None:
    if action == "withhold":
        return tr.tr(
            "🛡️ The image was withheld: the safety filter flagged it, and this channel is not age-restricted."
        )
    if action == "spoiler":
        return tr.tr("🛡️ Flagged by the safety filter: shown as a spoiler.")
    return None


def jpeg_note(tr: Language, job_id: int) -> str:
    return tr.tr(
        "📎 Too large for this channel's upload limit as PNG: sent as JPEG. The PNG, with its recipe, is "
        "kept (/rerun {job} draws it again).",
        job=job_id,
    )


def final(tr: Language, job: Job, safety_action: str | None = None, as_jpeg: bool = False) -> str:
    """The result message. `safety_action`: what the delivery did with flagged images, if anything;
    `as_jpeg`: the PNGs were over the upload limit and JPEG copies went out instead."""
    if job.status == JobStatus.DONE:
        notes = [safety_note(tr, safety_action), jpeg_note(tr, job.id) if as_jpeg else None]
        text = footer(tr, job) + "".join(f"\n{note}" for note in notes if note)
        # The enhanced prompt last, in the room the rest leaves: its spoiler is always closed.
        note = enhance_note(tr, job, MESSAGE_LIMIT - len(text) - 1)
        return fit(text + (f"\n{note}" if note else ""))
    if job.status == JobStatus.CANCELLED:
        # job.error is the stored, English reason ("cancelled by its owner"): the database stays English.
        reasons = {
            "cancelled by its owner": tr.tr("cancelled by its owner"),
            "cancelled by an admin": tr.tr("cancelled by an admin"),
        }
        reason = reasons.get(job.error or "", job.error) or tr.tr("cancelled")
        return f"**{short(job.spec.prompt)}**\n🚫 " + tr.tr("job {job} {reason}.", job=job.id, reason=reason)
    failed = tr.tr("job {job} failed: {error}", job=job.id, error=stored_reason(tr, job.error or ""))
    return fit(f"**{short(job.spec.prompt)}** — <@{job.user_id}>\n❌ {failed}")


# Why a job failed, as the executors store it (English, like the whole database): shown translated.
_FAILURES = (INTERNAL_ERROR, ENHANCED_BLOCKED, *FAILURES)


@functools.cache
def _failure_pattern(template: str) -> re.Pattern[str]:
    fields = re.escape(template)
    return re.compile("^" + re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>.+?)", fields) + "$")


def stored_reason(tr: Language, reason: str) -> str:
    """A stored failure reason in the reader's language where it is one of the executors' own; the
    engine's other messages stay as stored."""
    for template in _FAILURES:
        if (match := _failure_pattern(template).match(reason)) is not None:
            return tr.tr(template, **match.groupdict())
    return reason


def history(tr: Language, page: HistoryPage, whose: str) -> str:
    if not page.jobs:
        return tr.tr("No jobs yet for {who}.", who=inert(whose))
    lines = [
        tr.tr(
            "**Jobs of {who}** (page {page}/{pages}, {total} in all)",
            who=inert(whose),
            page=page.page,
            pages=page.pages,
            total=page.total,
        )
    ]
    for job in page.jobs:
        status = status_name(tr, job.status)
        seed = tr.tr("seed {seed}", seed=job.spec.seed)
        lines.append(f"`{job.id:>6}` {status:<9} {seed} · {short(job.spec.prompt, 60)}")
    return "\n".join(lines)


def status_name(tr: Language, status: JobStatus) -> str:
    names = {
        JobStatus.QUEUED: tr.ctext("job status", "queued"),
        JobStatus.RUNNING: tr.ctext("job status", "running"),
        JobStatus.DONE: tr.ctext("job status", "done"),
        JobStatus.FAILED: tr.ctext("job status", "failed"),
        JobStatus.CANCELLED: tr.ctext("job status", "cancelled"),
    }
    return names.get(status, status.value)


def queue(tr: Language, view: QueueView) -> str:
    head = tr.tr("⏸️ queue paused") if view.paused else tr.tr("▶️ queue running")
    entries = view.entries
    elsewhere = (
        " " + tr.tr("(+{count} from other servers or DMs)", count=view.elsewhere) if view.elsewhere else ""
    )
    if not entries:
        return tr.tr("{head}: nothing from this server", head=head) + elsewhere + "."
    waiting = sum(1 for e in entries if e.state == "waiting")
    lines = [tr.tr("{head}: {count} waiting here", head=head, count=waiting) + elsewhere]
    for entry in entries[:20]:
        where = _entry_state(tr, entry.state) if entry.state != "waiting" else f"#{entry.position}"
        eta = " · " + tr.tr("ETA ~{eta}", eta=tr.duration(entry.eta_s)) if entry.state != "saving" else ""
        job = tr.tr("job {job}", job=entry.job_id)
        lines.append(f"{where:>8} · {job} · <@{entry.user_id}>{eta}")
    return "\n".join(lines)


def _entry_state(tr: Language, state: str) -> str:
    return {"running": tr.ctext("job status", "running"), "saving": tr.tr("saving")}.get(state, state)


def stats(tr: Language, data: Stats) -> str:
    statuses = ", ".join(
        f"{n} {status_name(tr, JobStatus(status))}" for status, n in sorted(data.by_status.items())
    ) or tr.tr("none")
    speeds = ", ".join(
        f"{preset} " + tr.tr("{seconds:.1f} s", seconds=s)
        for preset, s in sorted(data.seconds_per_image.items())
    ) or tr.tr("n/a")
    running = tr.tr("{count} running", count=data.running) if data.running else tr.tr("idle")
    share = tr.tr(" ({percent:.0f} %)", percent=100 * data.steps_cached / data.steps) if data.steps else ""
    return tr.tr(
        "**fluxbot stats**\nqueue: {queued} waiting, {running}\njobs today: {today} ({statuses})\n"
        "average per image: {speeds}\nsteps skipped by step caches today: {cached} of {steps}{share}\n"
        "uptime: {uptime}",
        queued=data.queued,
        running=running,
        today=data.jobs_today,
        statuses=statuses,
        speeds=speeds,
        cached=data.steps_cached,
        steps=data.steps,
        share=share,
        uptime=tr.duration(data.uptime_s),
    )


def workers(tr: Language, infos: list[WorkerInfo]) -> str:
    if not infos:
        return tr.tr(
            "No engine worker is up: start one with `fluxbot worker` (same FLUXBOT_QUEUE as the bot)."
        )
    busy = sum(1 for w in infos if w.state == "busy")
    lines = [
        tr.plural("**{n} worker** ({busy} busy)", "**{n} workers** ({busy} busy)", len(infos), busy=busy)
    ]
    for w in infos[:20]:
        if w.state == "busy" and w.job_id:
            state = tr.tr("busy with job {job}", job=w.job_id)
        else:
            state = {"busy": tr.tr("busy"), "idle": tr.tr("idle")}.get(w.state, w.state)
        vram = " · " + tr.tr("{gb:.1f} GB VRAM free", gb=w.free_vram_gb) if w.free_vram_gb is not None else ""
        loras = f" · LoRAs: {', '.join(w.resident_loras)}" if w.resident_loras else ""
        speed = (
            " · " + tr.tr("{mode} compile (warm-up {seconds:g} s)", mode=w.compile, seconds=float(w.warmup_s))
            if w.warmup_s is not None
            else ""
        )
        speed += " · " + tr.tr("attention {backend}", backend=w.attention) if w.attention != "native" else ""
        counts = tr.tr(
            "{done} done, {failed} failed · {rate:.1f} jobs/min",
            done=w.jobs_done,
            failed=w.jobs_failed,
            rate=float(w.jobs_per_min),
        )
        where = tr.tr("on {device}", device=w.device)
        lines.append(
            f"`{w.name}` {state} · {w.model} ({w.family}, {w.quant}) {where}{vram} · {counts}{speed}{loras}"
        )
    return "\n".join(lines)


def _source(tr: Language, source: Source, guild_id: int | None) -> str:
    if source.role_id is None:
        return tr.tr("global default")
    return "@everyone" if source.role_id == guild_id else f"<@&{source.role_id}>"


def _allowed(tr: Language, names: frozenset[str] | None) -> str:
    return tr.tr("all") if names is None else ", ".join(sorted(names)) or tr.tr("none")


def role_rules(tr: Language, rules: dict[int, RoleRule], guild_id: int | None) -> str:
    if not rules:
        return tr.tr("No role rules on this server: everyone has the global limits and every preset.")
    lines = []
    for role_id, rule in sorted(rules.items()):
        who = "@everyone" if role_id == guild_id else f"<@&{role_id}>"
        values = ", ".join(
            f"{k} = {', '.join(v) if isinstance(v, tuple) else v}"
            for k, v in rule.model_dump().items()
            if v is not None
        )
        lines.append(f"{who}: {values}")
    return "\n".join(lines[:40])


def channel_rules(tr: Language, rules: ChannelRules) -> str:
    drawing = ", ".join(f"<#{c}>" for c in rules.drawing) if rules.drawing else tr.tr("every channel")
    lines = [tr.tr("Drawing works in: {channels}", channels=drawing)]
    for channel_id, rule in sorted(rules.channels.items()):
        default = rule.default_preset or "-"
        presets = ", ".join(rule.presets) if rule.presets is not None else tr.tr("all")
        lines.append(
            tr.tr(
                "<#{channel}>: default preset {default}; presets {presets}",
                channel=channel_id,
                default=default,
                presets=presets,
            )
        )
    return "\n".join(lines[:40])


def explained(
    tr: Language, rules: Explained, member: str, channel_id: int | None, guild_id: int | None
) -> str:
    """`/admin rules`: what a member may use in a channel, and which role says so."""
    m, sources = rules.member, rules.member.sources
    where = f"<#{channel_id}>" if channel_id else tr.tr("a DM")
    if rules.draws_here:
        draws = tr.tr("yes")
    else:
        draws = tr.tr(
            "no: drawing happens in {channels}", channels=", ".join(f"<#{c}>" for c in rules.drawing[:10])
        )

    def given(name: str) -> str:
        return _source(tr, sources[name], guild_id)

    lines = [
        tr.tr("**Rules for {member} in {channel}**", member=inert(member), channel=where),
        tr.tr("draws here: {answer}", answer=draws),
        tr.tr("jobs per window: {n} ({source})", n=m.jobs_per_window, source=given("jobs_per_window")),
        tr.tr("max queued: {n} ({source})", n=m.max_queued, source=given("max_queued")),
        tr.tr(
            "fair-share weight: {weight:g} ({source}); server weight {server:g}",
            weight=float(m.weight),
            source=given("weight"),
            server=float(rules.server_weight),
        ),
        tr.tr("presets: {names} ({source})", names=_allowed(tr, m.presets), source=given("presets")),
        tr.tr("LoRAs: {names} ({source})", names=_allowed(tr, m.loras), source=given("loras")),
        tr.tr("kinds: {names} ({source})", names=_allowed(tr, m.kinds), source=given("kinds")),
    ]
    channel = rules.channel
    if channel.default_preset or channel.presets is not None:
        presets = ", ".join(channel.presets) if channel.presets is not None else tr.tr("all")
        lines.append(
            tr.tr(
                "this channel: default preset {default}; presets {presets}",
                default=channel.default_preset or "-",
                presets=presets,
            )
        )
    return "\n".join(lines)


def limits(tr: Language, limits: LimitSettings, own: Mapping[str, float]) -> str:
    """The limits in force in a server, each with where it comes from."""
    parts = []
    for name, value in limits.model_dump().items():
        where = tr.tr("this server") if name in own else tr.tr("global")
        parts.append(f"{name} = {value:g} ({where})")
    return ", ".join(parts)
