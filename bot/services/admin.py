"""AdminService: presets, LoRA whitelist, limits, bans and the queue, changed from Discord, audited."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from bot.services.community_admin import (
    SERVER_BLOCKLIST_KEY,
    SERVER_LIMITS_KEY,
    SERVER_PRESET_KEY,
    CommunityAdmin,
    server_of,
    within_global,
)
from bot.services.content_policy import BlockedTerms, normalize_term
from bot.services.dispatcher import QueueEntry
from bot.services.errors import NotAllowed, NotFound, UserError
from bot.services.studio import Requester, Studio
from bot.services.visibility import may_moderate
from bot.services.workers import WorkerInfo
from bot.store.admin import AdminStore
from engine.errors import EngineError, first_problem
from engine.presets import Preset
from engine.whitelist import LoraEntry, LoraFiles
from fluxbot.settings import LimitSettings

PRESET_KEY = "preset:"
LORA_KEY = "lora:"
LIMITS_KEY = "limits"
BLOCKLIST_KEY = "blocklist"
QUEUE_KEY = "queue"
MAX_SERVER_TERMS = 500
SERVER_LIMITS = ("jobs_per_window", "window_s", "max_queued_per_user")  # max_queue: the host's own


@dataclass(frozen=True)
class Stats:
    jobs_today: int
    by_status: dict[str, int]
    seconds_per_image: dict[str, float]  # preset -> average engine seconds per image, today
    queued: int
    running: int  # jobs running now (one per busy worker)
    uptime_s: float
    steps: int = 0  # denoising steps of today's finished jobs
    steps_cached: int = 0  # of those, skipped or predicted by a step cache


@dataclass(frozen=True)
class QueueView:
    entries: list[QueueEntry]  # this guild's jobs, in queue order
    elsewhere: int  # jobs of other guilds and DMs, counted only
    paused: bool


@dataclass(frozen=True)
class AdminPolicy:
    """Who is an admin. Checked on the server for every admin action, whatever Discord's UI shows.

    The operator's admins (`user_ids`, `role_ids`) change everything. A server admin (Manage Server
    in a server of `server_guilds`) changes only that server's rules (roles, channels)."""

    user_ids: frozenset[int]
    role_ids: frozenset[int]
    server_guilds: frozenset[int] = frozenset()

    def allows(self, user_id: int, role_ids: Iterable[int]) -> bool:
        return user_id in self.user_ids or bool(self.role_ids.intersection(role_ids))

    def allows_server(
        self, user_id: int, role_ids: Iterable[int], guild_id: int | None, manages: bool
    ) -> bool:
        """May change the rules of `guild_id` (`manages`: they have Manage Server there)."""
        if self.allows(user_id, role_ids):
            return True
        return guild_id is not None and guild_id in self.server_guilds and manages


class AdminService:
    """Changes to presets and the whitelist are stored and audited first, then published as a new
    catalog snapshot (bot/services/rules.py): nothing a job is being resolved against changes under it."""

    def __init__(
        self, studio: Studio, store: AdminStore, policy: AdminPolicy, lora_files: LoraFiles | None = None
    ) -> None:
        self.studio = studio
        self.store = store
        self.policy = policy
        self.lora_files = lora_files  # the bot's own LoRA folder: a LoRA is hash-checked before it is listed
        self.community = CommunityAdmin(studio, store)
        # One change of the limits or blocked terms at a time (each reads, stores, then publishes them).
        self._changing = asyncio.Lock()

    def require(self, who: Requester, role_ids: Iterable[int]) -> None:
        if not self.policy.allows(who.user_id, role_ids):
            raise NotAllowed("Only fluxbot admins can do that.")

    def require_server(self, who: Requester, role_ids: Iterable[int], manages: bool) -> None:
        """An operator's admin, or this server's admin where the operator lets server admins in."""
        if not self.policy.allows_server(who.user_id, role_ids, who.guild_id, manages):
            raise NotAllowed("Only fluxbot admins (or this server's admins, where allowed) can do that.")

    async def load_overrides(self) -> None:
        """Apply what admins changed earlier (presets, LoRAs, limits) on top of the config files."""
        catalog = self.studio.rules.catalog
        for value in (await self.store.settings_with_prefix(PRESET_KEY)).values():
            catalog = catalog.with_preset(Preset.model_validate(value))
        for key, value in (await self.store.settings_with_prefix(LORA_KEY)).items():
            name = key.removeprefix(LORA_KEY)
            if value.get("removed"):
                catalog = catalog.without_lora(name)
            else:
                catalog = catalog.with_lora(LoraEntry.model_validate(value))
        self.studio.rules.publish(catalog)
        limits = await self.store.setting(LIMITS_KEY)
        if limits:
            self.studio.set_limits(LimitSettings.model_validate(limits))
        blocklist = await self.store.setting(BLOCKLIST_KEY)
        if blocklist is not None:
            self.studio.set_blocked(BlockedTerms(tuple(blocklist.get("terms", ()))))
        queue = await self.store.setting(QUEUE_KEY)
        if queue and queue.get("paused"):
            self.studio.queue.pause()
        await self.community.load()

    # presets
    def presets(self) -> dict[str, Preset]:
        return dict(self.studio.rules.catalog.presets)

    async def set_preset(
        self, who: Requester, name: str, field: str, value: str, server: bool = False
    ) -> Preset:
        """One default or bound of a preset, globally or (`server`) in the asker's server only."""
        async with self._changing:
            return await self._set_preset(who, name, field, value, server)

    async def _set_preset(self, who: Requester, name: str, field: str, value: str, server: bool) -> Preset:
        base = self.studio.rules.catalog.presets.get(name)
        if base is None:
            raise NotFound("There is no preset {preset!r}.", preset=name)
        if field not in Preset.model_fields or field in ("name", "family", "loras"):
            raise UserError("{field!r} is not a preset field admins can change", field=field)
        current = self.studio.community.presets_of(server_of(who)).get(name, base) if server else base
        data = current.model_dump()
        data[field] = _parse_value(value)
        try:
            updated = Preset.model_validate(data)
        except ValidationError as exc:
            raise UserError(first_problem(exc, name)) from exc
        if server:
            if not who.is_admin and (wider := _wider(base, updated)) is not None:
                raise UserError(
                    "A server's admins can narrow a preset, not widen it: "
                    "{field} goes past the global preset.",
                    field=wider,
                )
            guild_id = server_of(who)
            await self.store.put_setting(
                f"{SERVER_PRESET_KEY}{guild_id}:{name}",
                updated.model_dump(mode="json"),
                who.user_id,
                guild_id,
                "preset.set",
            )
            self.studio.set_community(self.studio.community.with_preset(guild_id, updated))
            return updated
        await self.store.put_setting(
            PRESET_KEY + name, updated.model_dump(mode="json"), who.user_id, who.guild_id, "preset.set"
        )
        self.studio.rules.publish(self.studio.rules.catalog.with_preset(updated))
        return updated

    # LoRA whitelist
    def loras(self) -> list[LoraEntry]:
        return list(self.studio.rules.catalog.loras.values())

    async def add_lora(self, who: Requester, fields: dict[str, Any]) -> LoraEntry:
        try:
            entry = LoraEntry.model_validate({k: v for k, v in fields.items() if v is not None})
        except ValidationError as exc:
            raise UserError(first_problem(exc)) from exc
        if self.lora_files is not None:
            try:  # file present, hash matches: before it is listed (hashing: in a thread)
                await asyncio.to_thread(self.lora_files.verify, entry.name, entry.file, entry.sha256)
            except EngineError as exc:
                raise UserError.of(exc) from exc
        await self.store.put_setting(
            LORA_KEY + entry.name, entry.model_dump(mode="json"), who.user_id, who.guild_id, "lora.add"
        )
        self.studio.rules.publish(self.studio.rules.catalog.with_lora(entry))
        return entry

    async def remove_lora(self, who: Requester, name: str) -> None:
        if name not in self.studio.rules.catalog.loras:
            raise NotFound("LoRA {lora!r} is not on the whitelist.", lora=name)
        await self.store.put_setting(
            LORA_KEY + name, {"removed": True}, who.user_id, who.guild_id, "lora.remove"
        )
        self.studio.rules.publish(self.studio.rules.catalog.without_lora(name))

    # limits and users
    async def set_limit(
        self, who: Requester, field: str, value: float, server: bool = False
    ) -> LimitSettings:
        async with self._changing:
            return await self._set_limit(who, field, value, server)

    async def _set_limit(
        self, who: Requester, field: str, value: float, server: bool = False
    ) -> LimitSettings:
        """One limit, globally or (`server`) for the asker's server only, over the global value."""
        if server:
            return await self._set_server_limit(who, field, value)
        if field not in LimitSettings.model_fields:
            raise UserError(
                "{field!r} is not a limit; one of: {limits}",
                field=field,
                limits=", ".join(LimitSettings.model_fields),
            )
        try:
            limits = LimitSettings.model_validate({**self.studio.limits.model_dump(), field: value})
        except ValidationError as exc:
            raise UserError(first_problem(exc)) from exc
        await self.store.put_setting(LIMITS_KEY, limits.model_dump(), who.user_id, who.guild_id, "limits.set")
        self.studio.set_limits(limits)
        return limits

    async def _set_server_limit(self, who: Requester, field: str, value: float) -> LimitSettings:
        guild_id = server_of(who)
        if field not in SERVER_LIMITS:
            raise UserError(
                "{field!r} is not a limit a server sets; one of: {limits}",
                field=field,
                limits=", ".join(SERVER_LIMITS),
            )
        own = {**self.studio.community.limits_of(guild_id), field: value}
        try:
            limits = LimitSettings.model_validate({**self.studio.limits.model_dump(), **own})
        except ValidationError as exc:
            raise UserError(first_problem(exc)) from exc
        stored = {k: getattr(limits, k) for k in own}
        within_global(who, self.studio.limits, stored)
        await self.store.put_setting(
            f"{SERVER_LIMITS_KEY}{guild_id}", stored, who.user_id, guild_id, "limits.set"
        )
        self.studio.set_community(self.studio.community.with_limits(guild_id, stored))
        return limits

    # blocked terms
    def blocked_terms(self, who: Requester | None = None, server: bool = False) -> tuple[str, ...]:
        """The global blocked terms, or (`server`) the asker's server's own."""
        return self._blocked(who, server).terms

    def _blocked(self, who: Requester | None, server: bool) -> BlockedTerms:
        if not server:
            return self.studio.blocked
        assert who is not None
        return self.studio.community.blocked_in(server_of(who))

    async def block_term(self, who: Requester, term: str, server: bool = False) -> str:
        async with self._changing:
            return await self._block_term(who, term, server)

    async def _block_term(self, who: Requester, term: str, server: bool = False) -> str:
        """Add a term (stored as normalized words: what it matches), globally or for the asker's server
        only; returns it as stored."""
        normalized = normalize_term(term)
        if not normalized or len(normalized) > 100:
            raise UserError("A blocked term needs letters or digits (at most 100 characters).")
        current = self._blocked(who, server)
        if normalized in current.terms or normalized in self.studio.blocked.terms:
            raise UserError("{term!r} is already blocked.", term=normalized)
        if server and len(current.terms) >= MAX_SERVER_TERMS:
            raise UserError("A server blocks at most {most} terms of its own.", most=MAX_SERVER_TERMS)
        await self._store_blocked(who, current.with_term(normalized), "blocklist.add", normalized, server)
        return normalized

    async def unblock_term(self, who: Requester, term: str, server: bool = False) -> str:
        async with self._changing:
            return await self._unblock_term(who, term, server)

    async def _unblock_term(self, who: Requester, term: str, server: bool = False) -> str:
        normalized = normalize_term(term)
        current = self._blocked(who, server)
        if normalized not in current.terms:
            raise NotFound("{term!r} is not on the blocklist.", term=normalized or term)
        await self._store_blocked(who, current.without(normalized), "blocklist.remove", normalized, server)
        return normalized

    async def _store_blocked(
        self, who: Requester, blocked: BlockedTerms, action: str, term: str, server: bool = False
    ) -> None:
        # The whole list is the stored value (the audit entry keeps before and after); the change applies
        # only once it is committed.
        key = f"{SERVER_BLOCKLIST_KEY}{server_of(who)}" if server else BLOCKLIST_KEY
        value = {"terms": list(blocked.terms), "changed": term}
        await self.store.put_setting(key, value, who.user_id, who.guild_id, action)
        if server:
            self.studio.set_community(self.studio.community.with_blocked(server_of(who), blocked))
        else:
            self.studio.set_blocked(blocked)

    async def ban(self, who: Requester, user_id: int, reason: str | None) -> None:
        if user_id == who.user_id:
            raise UserError("You can't ban yourself.")
        await self.store.set_ban(user_id, True, reason, who.user_id, who.guild_id)

    async def unban(self, who: Requester, user_id: int) -> None:
        await self.store.set_ban(user_id, False, None, who.user_id, who.guild_id)

    async def stats(self, started_at: float) -> Stats:
        """Today's jobs by status, average engine seconds per image by preset, uptime."""
        midnight = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        jobs = await self.studio.jobs.since(midnight)
        by_status = Counter(job.status.value for job in jobs)
        per_preset: dict[str, list[float]] = {}
        steps = cached = 0
        for job in jobs:
            if job.timings and job.images:
                per_preset.setdefault(job.spec.preset, []).append(
                    float(job.timings["total_s"]) / len(job.images)
                )
                ran = int(job.timings.get("steps") or 0)
                steps += ran
                cached += max(0, ran - int(job.timings.get("computed_steps") or ran))
        averages = {preset: sum(v) / len(v) for preset, v in per_preset.items()}
        queue = self.studio.queue
        return Stats(
            len(jobs),
            dict(by_status),
            averages,
            len(queue),
            queue.busy,
            time.time() - started_at,
            steps,
            cached,
        )

    # queue
    def queue(self, who: Requester) -> QueueView:
        """The queue as an admin of this guild sees it: its own jobs listed, the rest only counted
        (the visibility rule: another guild's or a DM's jobs are not theirs to see)."""
        entries = self.studio.queue.snapshot()
        mine = [entry for entry in entries if may_moderate(entry.guild_id, who)]
        return QueueView(mine, len(entries) - len(mine), self.studio.queue.paused)

    async def workers(self) -> list[WorkerInfo]:
        """The engines serving the queue: the in-process one, or each `fluxbot worker` that is up."""
        return await self.studio.queue.workers()

    async def cancel(self, who: Requester, job_id: int) -> None:
        await self.studio.cancel(Requester(**{**who.__dict__, "is_admin": True}), job_id)
        await self.store.record(who.user_id, who.guild_id, "job.cancel", {"job_id": job_id})

    async def pause(self, who: Requester, paused: bool) -> None:
        """Paused stays paused across restarts, like every admin change."""
        action = "queue.pause" if paused else "queue.resume"
        await self.store.put_setting(QUEUE_KEY, {"paused": paused}, who.user_id, who.guild_id, action)
        queue = self.studio.queue
        queue.pause() if paused else queue.resume()


def _parse_value(text: str) -> Any:
    """Admin input for a preset field: numbers, '[a, b]' ranges, true/false, or text."""
    import json

    try:
        return json.loads(text)
    except ValueError:
        return text


def _wider(base: Preset, updated: Preset) -> str | None:
    """The first field in which `updated` allows more than `base` (a server's own admins may narrow a
    preset: fewer steps, a smaller size, a cheaper sampler setting; never the opposite), or None."""
    for name in ("steps_range", "megapixels_range", "strength_range", "guidance_range"):
        wide, narrow = getattr(base, name), getattr(updated, name)
        if wide is None and narrow is None:
            continue
        if wide is None or narrow is None or narrow[0] < wide[0] or narrow[1] > wide[1]:
            return name
    if (base.aspects and not set(updated.aspects or ()) <= set(base.aspects)) or (
        base.aspects and not updated.aspects
    ):
        return "aspects"
    if base.nsfw and not updated.nsfw:
        return "nsfw"  # the age-restriction rule is the operator's to lift
    if updated.true_cfg > base.true_cfg:
        return "true_cfg"  # true CFG runs the transformer twice per step
    return None
