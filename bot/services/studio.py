"""Studio: admits jobs (validation, bans, rate limit and caps, stored before anyone is told); history
and reruns. Everything a user asks for that makes a job comes through `imagine`."""

from __future__ import annotations

import asyncio
import functools
import io
import logging
import math
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from PIL import Image
from pydantic import ValidationError

from bot.observability import Metrics
from bot.services.admissions import GroupAdmission
from bot.services.community import KIND_OF, ChannelRule, CommunityRules, Defaults, MemberRule
from bot.services.content_policy import BlockedTerms
from bot.services.dispatcher import JobDispatcher
from bot.services.errors import LimitReached, NotAllowed, NotFound, StoreBusy, UserError
from bot.services.pictures import Pictures, size_for
from bot.services.rules import LiveRules
from bot.services.visibility import ChannelCheck, may_moderate, may_see, no_channel
from bot.store.database import is_store_fault
from bot.store.files import ImageFiles
from bot.store.jobs import Admission, JobStore, NewJob, Quota
from bot.store.models import Job, JobKind
from engine.api import GenerationRequest
from engine.errors import RequestError, first_problem
from engine.input_image import InputImage, mask_problem, reference_problem
from engine.messages import Message
from engine.outpaint import Direction, pan, zoom_out
from engine.presets import Preset
from engine.resolve import RequestResolver, Resolution, reference_count_problem
from engine.spec import MAX_PIXELS, MAX_SEED, MAX_SIDE, DrawSpec
from engine.step_cache import NO_CACHE
from fluxbot.settings import ImageSettings, LimitSettings

if TYPE_CHECKING:
    from engine.segmenter import Segmenter  # torch: loaded only where engine.segmenter is set

log = logging.getLogger(__name__)
HISTORY_PAGE = 10
EDIT_PRESET = "kontext"
FILL_PRESET = "fill"
Move = Literal["zoom15", "zoom2", "left", "right", "up", "down"]
ZOOMS: dict[str, float] = {"zoom15": 1.5, "zoom2": 2.0}
PANS: dict[str, Direction] = {"left": "left", "right": "right", "up": "up", "down": "down"}
INPAINTS_OFF = Message(
    "Inpainting needs FLUX.1 Fill, which this fluxbot has not loaded. An admin enables it with "
    'engine.fill = "<Fill diffusers folder, .safetensors or .gguf>" (see the README).'
)
SEGMENTER_OFF = Message(
    "Masks from words need a segmentation model, which this fluxbot has not loaded: attach a mask "
    "(white = repaint), or an admin sets engine.segmenter."
)
EDITS_OFF = Message(
    "Edits need FLUX.1 Kontext, which this fluxbot has not loaded. An admin enables them with "
    'engine.kontext = "<Kontext diffusers folder, .safetensors or .gguf>" (see the README).'
)
VARIATIONS = 4
MAX_JOB_ID = 2**31 - 1  # Postgres' integer; SQLite's is wider, but no job id gets there
# Called with the new job's id after it is stored and before it can start (the Discord layer holds
# the job's progress and result until its first answer is out).
OnStored = Callable[[int], None]


@dataclass(frozen=True)
class Requester:
    """Who asks, and where the answer goes."""

    user_id: int
    user_name: str = ""
    guild_id: int | None = None
    channel_id: int | None = None
    application_id: int | None = None
    interaction_id: int | None = None
    interaction_token: str | None = None
    message_id: int | None = None  # the message that will show progress and the result
    is_admin: bool = False
    # Which channels of guild_id they can view now (Discord's permissions): see services/visibility.
    can_view: ChannelCheck = field(default=no_channel, compare=False)
    age_restricted: bool = False  # asked in an age-restricted channel or a DM (the nsfw rule)
    upload_limit: int | None = None  # bytes Discord takes per upload where they asked
    locale: str | None = None  # the asker's Discord locale: their private answers' language
    public_locale: str | None = None  # the job's public messages: the server's locale (theirs in a DM)
    role_ids: tuple[int, ...] = ()  # their roles in guild_id (community rules)
    parent_channel_id: int | None = None  # channel_id is a thread: the channel it is in


@dataclass(frozen=True)
class Ticket:
    job_id: int
    position: int  # 0: already on an engine
    eta_s: float
    seed: int
    prompt: str
    warnings: tuple[Message, ...] = ()


@dataclass(frozen=True)
class JobPicture:
    """One picture of a stored job, as an input (1-based, as users count them)."""

    job_id: int
    picture: int = 1


@dataclass(frozen=True)
class HistoryPage:
    jobs: list[Job]
    page: int
    pages: int
    total: int


class Studio:
    def __init__(
        self,
        rules: LiveRules,
        jobs: JobStore,
        queue: JobDispatcher,
        limits: LimitSettings,
        metrics: Metrics,
        blocked: BlockedTerms | None = None,
        files: ImageFiles | None = None,
        images: ImageSettings | None = None,
        edits: bool = False,
        inpaints: bool = False,
        upscales: bool = False,
    ) -> None:
        self.edits = edits  # engine.kontext is set: /edit and the Edit button work
        self.inpaints = inpaints  # engine.fill is set: /inpaint works
        self.upscales = upscales  # engine.upscaler is set: Upscale enlarges with it first
        self.segmenter: Segmenter | None = None  # engine.segmenter: /inpaint where:"the sky"
        self.images = images or ImageSettings()
        self.pictures = Pictures(files, self.images, metrics)
        self.metrics = metrics
        self.blocked = blocked or BlockedTerms()
        self.rules = rules
        self.jobs = jobs
        self.admissions = GroupAdmission(jobs)
        self.queue = queue
        self.limits = limits
        self.community = CommunityRules()  # roles, channels, server weights (AdminService loads them)
        self.flagged_default = "withhold"  # safety.flagged_action: what happens to a flagged image
        self.accepting = True  # False while shutting down

    @property
    def resolver(self) -> RequestResolver:
        """The presets and whitelist in force now (admins replace them, see bot/services/rules.py)."""
        return self.rules.resolver

    def resolver_for(self, guild_id: int | None) -> RequestResolver:
        """The resolver of one server: the global catalog with that server's own presets over it (a
        preset the operator removed is gone everywhere)."""
        own = self.community.presets_of(guild_id)
        resolver = self.rules.resolver
        if not own:
            return resolver
        catalog = resolver.catalog
        for preset in own.values():
            if preset.name in catalog.presets:
                catalog = catalog.with_preset(preset)
        return resolver.with_catalog(catalog)

    def set_limits(self, limits: LimitSettings) -> None:
        self.limits = limits

    def set_blocked(self, blocked: BlockedTerms) -> None:
        self.blocked = blocked

    def set_community(self, community: CommunityRules) -> None:
        self.community = community

    def limits_for(self, guild_id: int | None) -> LimitSettings:
        """The limits in a server: its own values over the global ones."""
        own = self.community.limits_of(guild_id)
        return self.limits.model_copy(update=dict(own)) if own else self.limits

    def member_rule(self, who: Requester) -> MemberRule:
        """What `who` may use and how much, in the server they ask in (community rules)."""
        limits = self.limits_for(who.guild_id)
        return self.community.member(
            who.guild_id, who.role_ids, Defaults(limits.jobs_per_window, limits.max_queued_per_user)
        )

    def channel_rule(self, who: Requester) -> ChannelRule:
        """The rule of the channel `who` asks in (a thread without its own: its parent's)."""
        rules = self.community.channels(who.guild_id)
        own = rules.rule(who.channel_id)
        return own if own != ChannelRule() else rules.rule(who.parent_channel_id)

    def flagged_action(self, guild_id: int | None) -> str:
        """What a server does with an image the safety classifier flagged: its own choice, or the host's."""
        return (
            self.community.flagged.get(guild_id, self.flagged_default)
            if guild_id is not None
            else self.flagged_default
        )

    def server_weight(self, guild_id: int | None) -> float:
        """A server's fair share of the GPU against the others (the dispatcher orders by it)."""
        return self.community.server_weight(guild_id)

    def default_preset(self, who: Requester) -> str | None:
        """The channel's default preset, for a request that names none."""
        return self.channel_rule(who).default_preset

    def validate(
        self, image_coming: bool = False, guild_id: int | None = None, **fields: object
    ) -> GenerationRequest:
        """Build a request from command options and check it before anything slow happens; a bad
        option becomes a UserError naming it. `image_coming`: an attachment will be the input image."""
        try:
            request = GenerationRequest.model_validate({k: v for k, v in fields.items() if v is not None})
            self.resolver_for(guild_id).check(request, image_coming)
        except ValidationError as exc:
            self.metrics.rejections.labels("validation").inc()
            raise UserError(first_problem(exc)) from exc
        except RequestError as exc:
            self.metrics.rejections.labels("validation").inc()
            raise UserError.of(exc) from exc
        return request

    async def imagine(
        self, who: Requester, request: GenerationRequest, on_stored: OnStored | None = None
    ) -> Ticket:
        """What someone asked for, resolved into a spec, checked, stored, queued. Without a preset: the
        channel's default (community rules), else the resolver's."""
        if request.preset is None and (default := self.default_preset(who)) is not None:
            request = request.model_copy(update={"preset": default})
        try:
            resolution = self.resolver_for(who.guild_id).resolve(request)
        except RequestError as exc:
            self.metrics.rejections.labels("validation").inc()
            raise UserError.of(exc) from exc
        kind = JobKind.EDIT if resolution.spec.mode == "edit" else JobKind.IMAGINE
        return await self.admit(who, resolution.spec, kind, None, on_stored, resolution.warnings)

    async def admit(
        self,
        who: Requester,
        spec: DrawSpec,
        kind: JobKind,
        parent_id: int | None = None,
        on_stored: OnStored | None = None,
        warnings: tuple[Message, ...] = (),
    ) -> Ticket:
        """Check the policy, then store (with the limits taken in the same transaction), then queue. A
        job is never queued, or answered as queued, before it is committed."""
        if not self.accepting:
            raise LimitReached("fluxbot is restarting; try again in a minute.")
        # Copies (model_copy) are not validated: a spec is read back as it will be stored, so a spec
        # the store could not read again fails here, before anything is stored.
        spec = DrawSpec.model_validate_json(spec.model_dump_json())
        term = self.blocked_term(who.guild_id, spec.prompt, spec.enhanced_prompt or "")
        if term is not None:
            self.metrics.rejections.labels("policy").inc()
            raise NotAllowed(
                "Your prompt contains a term that is blocked here ({term!r}). Rephrase it.", term=term
            )
        member = self._allowed(who, spec, kind)
        nsfw = self.resolver_for(who.guild_id).nsfw(spec)
        if nsfw and not who.age_restricted:
            self.metrics.rejections.labels("policy").inc()
            raise NotAllowed(
                "The {parts} can only be used in age-restricted channels (or in a DM with fluxbot).",
                parts=functools.reduce(_and_the, nsfw),
            )
        new = NewJob(
            user_id=who.user_id,
            user_name=who.user_name,
            guild_id=who.guild_id,
            channel_id=who.channel_id,
            kind=kind,
            spec=spec.model_copy(update={"origin": kind.value, "parent_job": parent_id}),
            parent_id=parent_id,
            application_id=who.application_id,
            interaction_id=who.interaction_id,
            interaction_token=who.interaction_token,
            result_message_id=who.message_id,
            age_restricted=who.age_restricted,
            upload_limit=who.upload_limit,
            locale=who.public_locale,
            weight=member.weight,
        )
        try:
            admission = await self.admissions.admit(new, self._quota(member, self.limits_for(who.guild_id)))
        except Exception as exc:
            if not is_store_fault(exc):
                raise
            log.warning("admission: the database failed (%s); the request was not stored", exc)
            self.metrics.rejections.labels("store").inc()
            raise StoreBusy(
                "fluxbot could not save your request (its database is busy). Nothing was queued; "
                "try again in a moment."
            ) from exc
        job = self._admitted(admission, self.limits_for(who.guild_id).window_s)
        if admission.replayed:
            entry = self.queue.entry(job.id)
        else:
            if on_stored is not None:
                on_stored(job.id)
            entry = self.queue.push(job)
        position, eta = (entry.position, entry.eta_s) if entry is not None else (0, 0.0)
        return Ticket(job.id, position, eta, job.spec.seed, job.spec.prompt, warnings)

    def _quota(self, member: MemberRule, limits: LimitSettings) -> Quota:
        # The waiting cap is the host's (all servers share one queue); the rest are the server's.
        return Quota(member.max_queued, self.limits.max_queue, member.jobs_per_window, limits.window_s)

    def _require_kind(self, who: Requester, kind: JobKind) -> None:
        """A button or command the member's roles do not allow: refused before anything is read."""
        if not self.member_rule(who).allows_kind(kind):
            self.metrics.rejections.labels("policy").inc()
            raise NotAllowed("Your roles don't allow `{kind}` jobs here.", kind=KIND_OF[kind])

    def _allowed(self, who: Requester, spec: DrawSpec, kind: JobKind) -> MemberRule:
        """The community rules for this request: where drawing works, and what the member's roles and
        the channel allow. Returns the member's rule (their quota and weight)."""
        drawing = self.community.channels(who.guild_id).drawing
        if drawing and who.channel_id not in drawing and who.parent_channel_id not in drawing:
            self.metrics.rejections.labels("policy").inc()
            shown = ", ".join(f"<#{channel}>" for channel in drawing[:10])
            raise NotAllowed("Drawing happens in {channels} on this server.", channels=shown)
        member = self.member_rule(who)
        refusal: UserError | None = None
        if not member.allows_kind(kind):
            refusal = NotAllowed("Your roles don't allow `{kind}` jobs here.", kind=KIND_OF[kind])
        elif not member.allows_preset(spec.preset):
            refusal = NotAllowed("Your roles don't allow the preset {preset!r} here.", preset=spec.preset)
        elif (
            lora := next((lo.name for lo in spec.loras if not member.allows_lora(lo.name)), None)
        ) is not None:
            refusal = NotAllowed("Your roles don't allow the LoRA {lora!r} here.", lora=lora)
        elif (here := self.channel_rule(who).presets) is not None and spec.preset not in here:
            refusal = NotAllowed(
                "The preset {preset!r} is not used in this channel; here: {presets}.",
                preset=spec.preset,
                presets=", ".join(here),
            )
        if refusal is not None:
            self.metrics.rejections.labels("policy").inc()
            raise refusal
        return member

    def _admitted(self, admission: Admission, window: float) -> Job:
        """The stored job, or the refusal in words the user reads."""
        if admission.job is not None:
            return admission.job
        self.metrics.rejections.labels(_REJECTION_LABEL[admission.refused or "rate"]).inc()
        if admission.refused == "banned":
            raise NotAllowed("You can't use fluxbot: an admin has banned you.")
        if admission.refused == "queue_full":
            raise LimitReached(
                "The queue is full ({limit} jobs). Try again in a few minutes.", limit=admission.limit
            )
        if admission.refused == "user_cap":
            raise LimitReached(
                "You have {count} jobs queued (max {limit}). Try again when one finishes.",
                count=admission.count,
                limit=admission.limit,
            )
        if window < 120:
            raise LimitReached(
                "Slow down: at most {limit} jobs per {seconds:g} s. Try again shortly.",
                limit=admission.limit,
                seconds=window,
            )
        raise LimitReached(
            "Slow down: at most {limit} jobs per {minutes:g} min. Try again shortly.",
            limit=admission.limit,
            minutes=window / 60,
        )

    # Jobs made from a stored one: its spec, with a field or two changed.

    async def reroll(self, who: Requester, job_id: int, on_stored: OnStored | None = None) -> Ticket:
        """Same spec, new seed, as a new job of whoever asked."""
        self._require_kind(who, JobKind.REROLL)
        parent, _ = await self._stored(job_id, who)
        _require_seeded(parent)
        spec = parent.spec.model_copy(update={"seed": secrets.randbelow(MAX_SEED + 1)})
        return await self.admit(who, spec, JobKind.REROLL, parent.id, on_stored)

    async def rerun(
        self, who: Requester, job_id: int, seed: int | None = None, on_stored: OnStored | None = None
    ) -> Ticket:
        """The stored job again; without a seed it is the identical image."""
        if seed is not None and not 0 <= seed <= MAX_SEED:
            raise UserError("seed must be between 0 and {most}", most=MAX_SEED)
        self._require_kind(who, JobKind.RERUN)
        parent, _ = await self._stored(job_id, who)
        if seed is not None:
            _require_seeded(parent)
        spec = parent.spec if seed is None else parent.spec.model_copy(update={"seed": seed})
        return await self.admit(who, spec, JobKind.RERUN, parent.id, on_stored)

    async def variations(self, who: Requester, job_id: int, on_stored: OnStored | None = None) -> Ticket:
        """A batch of images from the seeds right after the original's."""
        self._require_kind(who, JobKind.VARIATION)
        parent, _ = await self._stored(job_id, who)
        _require_seeded(parent)
        spec = parent.spec
        batch = min(VARIATIONS, self.resolver.max_batch_size)
        variation = spec.model_copy(update={"seed": (spec.seed + 1) % (MAX_SEED + 1), "batch_size": batch})
        return await self.admit(who, variation, JobKind.VARIATION, parent.id, on_stored)

    def check_edit_count(self, guild_id: int | None, count: int) -> None:
        """Refuses an edit of no image, or of more than the model reads (before anything is read)."""
        if count == 0:
            raise UserError("Give the image to edit: attach one, or name a job_id.")
        if (problem := reference_count_problem(self.resolver_for(guild_id).family, count)) is not None:
            raise UserError(problem)

    def blocked_term(self, guild_id: int | None, *texts: str) -> str | None:
        """The first blocked term (global, then the server's) in any of `texts`."""
        for text in texts:
            if term := self.blocked.find(text) or self.community.blocked_in(guild_id).find(text):
                return term
        return None

    def _require_redraws(self, who: Requester) -> None:
        """Vary and Upscale redraw a picture with FLUX.1's img2img; other families have none here."""
        family = self.resolver_for(who.guild_id).family
        if family != "flux1":
            raise UserError(
                "Vary and Upscale redraw with FLUX.1's image-to-image, which this {family} model lacks: "
                "use /edit.",
                family=family,
            )

    async def vary(
        self, who: Requester, job_id: int, strong: bool, on_stored: OnStored | None = None
    ) -> Ticket:
        """Vary (Subtle / Strong): img2img from the job's picture at the preset's strength, new seed,
        as the presser's own job."""
        kind = JobKind.VARY_STRONG if strong else JobKind.VARY_SUBTLE
        self._require_kind(who, kind)
        self._require_redraws(who)
        parent, preset = await self._stored(job_id, who)
        image = await self._drawn(parent, who)
        if (problem := preset.size_problem(image.width, image.height)) is not None:
            # An upscale without a redraw may be larger than the preset draws.
            raise UserError(
                "Vary would redraw {width}x{height}: {problem}.",
                width=image.width,
                height=image.height,
                problem=problem,
            )
        strength = preset.vary_strong_strength if strong else preset.vary_subtle_strength
        spec = _redraw(parent.spec, image, strength, secrets.randbelow(MAX_SEED + 1))
        return await self.admit(who, spec, kind, parent.id, on_stored)

    async def upscale(
        self,
        who: Requester,
        job_id: int,
        on_stored: OnStored | None = None,
        picture: int = 1,
        factor: int | None = None,
        redraw: bool | None = None,
    ) -> Ticket:
        """Upscale (hi-res fix) as the presser's own job: the job's `picture` (1-based) enlarged by the
        upscaler model where one is loaded (else resized with Lanczos) to `factor` x its size (default:
        4x where the preset's cap allows and a model enlarges, else 2x), then redrawn lightly at that
        size with its seed. `redraw` false (or the preset's `upscale_redraw`): the model's enlargement
        alone, the only Upscale on FLUX.2/FLUX.3 hosts (they have no image-to-image)."""
        self._require_kind(who, JobKind.UPSCALE)
        if factor is not None and factor not in (2, 4):
            raise UserError("factor must be 2 or 4")
        parent, preset = await self._stored(job_id, who)
        redraws = self.resolver_for(who.guild_id).family == "flux1"
        if redraw is None:
            redraw = preset.upscale_redraw and redraws
        if redraw:
            self._require_redraws(who)
        elif not self.upscales:
            raise UserError(
                "Upscale without a redraw enlarges with an upscaler model, and this bot has none "
                "(an admin sets engine.upscaler)."
            )
        image = await self._drawn(parent, who, picture)

        def problem(times: int) -> Message | None:
            width, height = times * image.width, times * image.height
            if max(width, height) > MAX_SIDE:
                return Message("a side longer than {most} px", most=MAX_SIDE)
            if redraw:
                return preset.size_problem(width, height)
            if width * height > min(preset.upscale_max_megapixels * 1e6, MAX_PIXELS):
                return Message(
                    "{mp:.1f} MP is above this preset's upscale maximum of {hi} MP",
                    mp=width * height / 1e6,
                    hi=preset.upscale_max_megapixels,
                )
            return None

        if factor is None:
            factor = 4 if self.upscales and problem(4) is None else 2
        if (refused := problem(factor)) is not None:
            raise UserError(
                "Upscale x{factor} would be {width}x{height}: {problem}.",
                factor=factor,
                width=factor * image.width,
                height=factor * image.height,
                problem=refused,
            )
        seed = parent.images[picture - 1].seed
        spec = _redraw(parent.spec, image, preset.upscale_strength, seed)
        size = {"width": factor * image.width, "height": factor * image.height}
        # _redraw cleared the parent's mask and upscaler: this upscale pins its own once drawn.
        if redraw:
            spec = spec.model_copy(update={**size, "model_upscale": self.upscales})
        else:
            # The enlargement alone: no prompt is read, so nothing is enhanced and no LoRA loaded.
            spec = spec.model_copy(
                update={
                    **size,
                    "mode": "upscale",
                    "strength": None,
                    "loras": (),
                    "model_upscale": True,
                    "enhance": False,
                    "enhanced_prompt": None,
                    "cache": NO_CACHE,
                }
            )
        return await self.admit(who, spec, JobKind.UPSCALE, parent.id, on_stored)

    async def edit(
        self,
        who: Requester,
        instruction: str,
        references: Sequence[JobPicture | InputImage],
        on_stored: OnStored | None = None,
        enhance: bool | None = None,
    ) -> Ticket:
        """An instruction edit ("make it night") as the asker's own job: FLUX.1 Kontext edits one
        picture; FLUX.2 klein reads up to four references in the resident model, in the order
        given. Each reference is a job's picture (which `who` must be able to see: one they may not
        is "not found") or an uploaded image. `enhance`: FLUX.3's upsampler expands the instruction
        from the references first (None: the preset's default)."""
        if not self.edits:
            raise UserError(EDITS_OFF)
        self._require_kind(who, JobKind.EDIT)
        resolver = self.resolver_for(who.guild_id)
        self.check_edit_count(who.guild_id, len(references))
        parent: Job | None = None
        images: list[InputImage] = []
        for index, reference in enumerate(references):
            if isinstance(reference, JobPicture):
                job = await self._job(reference.job_id, who)
                parent = job if index == 0 else parent  # the job whose picture is edited
                images.append(await self._drawn(job, who, reference.picture))
            else:
                images.append(reference)
        if resolver.family == "flux2":
            for image in images:
                if (problem := reference_problem(image.width, image.height)) is not None:
                    raise UserError(problem)
        preset = _family_preset(resolver, EDIT_PRESET)
        resolution = self._resolve_on(
            who,
            images[0],
            prompt=instruction,
            preset=preset.name if preset else None,
            mode="edit",
            init_image=images[0].sha256,
            references=tuple(image.sha256 for image in images[1:]),
            enhance=enhance,
        )
        parent_id = parent.id if parent is not None else None
        return await self.admit(who, resolution.spec, JobKind.EDIT, parent_id, on_stored, resolution.warnings)

    async def _mask_from_words(self, image: InputImage, words: str) -> InputImage:
        """The mask of what `words` name in `image`, stored like an uploaded one."""
        segmenter = self.segmenter
        assert segmenter is not None

        def segment() -> bytes:  # blocking: CLIPSeg on the CPU
            return _png_bytes(segmenter.mask(Image.open(io.BytesIO(image.png)), words))

        try:
            data = await asyncio.to_thread(segment)
        except RequestError as exc:
            raise UserError.of(exc) from exc
        return await self.pictures.upload(data)

    async def inpaint(
        self,
        who: Requester,
        prompt: str,
        picture: JobPicture | InputImage,
        mask: InputImage | str,
        on_stored: OnStored | None = None,
    ) -> Ticket:
        """Repaint part of a job's picture (one `who` may see) or of an uploaded one with FLUX.1 Fill
        and `prompt`, as the asker's own job: the white part of an uploaded `mask`, or what words
        name ("the sky", found by engine.segmenter). Outside the mask the picture is kept."""
        if not self.inpaints:
            raise UserError(INPAINTS_OFF)
        self._require_kind(who, JobKind.INPAINT)
        if isinstance(mask, str) and self.segmenter is None:
            raise UserError(SEGMENTER_OFF)
        parent: Job | None = None
        if isinstance(picture, JobPicture):
            parent = await self._job(picture.job_id, who)
            image = await self._drawn(parent, who, picture.picture)
        else:
            image = picture
        stored = await self._mask_from_words(image, mask) if isinstance(mask, str) else mask
        problem = await asyncio.to_thread(mask_problem, stored.png, image.width, image.height)
        if problem is not None:
            raise UserError(problem)
        preset = _family_preset(self.resolver_for(who.guild_id), FILL_PRESET)
        resolution = self._resolve_on(
            who,
            image,
            prompt=prompt,
            preset=preset.name if preset else None,
            mode="inpaint",
            init_image=image.sha256,
            mask=stored.sha256,
        )
        parent_id = parent.id if parent is not None else None
        return await self.admit(
            who, resolution.spec, JobKind.INPAINT, parent_id, on_stored, resolution.warnings
        )

    async def outpaint(
        self,
        who: Requester,
        job_id: int,
        move: Move,
        on_stored: OnStored | None = None,
        prompt: str | None = None,
    ) -> Ticket:
        """Zoom Out (1.5x, 2x) or Pan (left, right, up, down): a job's picture on a larger canvas,
        its new border drawn by FLUX.1 Fill with `prompt` (default: the job's), as the presser's own job."""
        if not self.inpaints:
            raise UserError(INPAINTS_OFF)
        self._require_kind(who, JobKind.OUTPAINT)
        parent, _ = await self._stored(job_id, who)
        picture = await self._drawn(parent, who)
        resolver = self.resolver_for(who.guild_id)
        preset = _family_preset(resolver, FILL_PRESET) or resolver.preset(None)
        most = int(preset.megapixels_range[1] * 1e6)

        def build() -> tuple[bytes, bytes]:  # blocking: decode, compose, encode
            image = Image.open(io.BytesIO(picture.png))
            canvas = zoom_out(image, ZOOMS[move], most) if move in ZOOMS else pan(image, PANS[move], most)
            return _png_bytes(canvas.image), _png_bytes(canvas.mask)

        canvas_png, mask_png = await asyncio.to_thread(build)
        canvas, mask = await self.pictures.upload(canvas_png), await self.pictures.upload(mask_png)
        resolution = self._resolve_on(
            who,
            None,
            prompt=prompt or parent.spec.prompt,
            preset=preset.name,
            mode="inpaint",
            init_image=canvas.sha256,
            mask=mask.sha256,
            size=f"{canvas.width}x{canvas.height}",
        )
        return await self.admit(
            who, resolution.spec, JobKind.OUTPAINT, parent.id, on_stored, resolution.warnings
        )

    def _resolve_on(self, who: Requester, sized_by: InputImage | None, **fields: Any) -> Resolution:
        """An image-in request (edit, inpaint) resolved for `who`'s server, sized by `sized_by`'s
        aspect where given; a problem is a UserError naming it."""
        resolver = self.resolver_for(who.guild_id)
        try:
            request = GenerationRequest(**fields)
            if sized_by is not None:
                size = self.size_for_input(request, sized_by, who.guild_id)
                request = request.model_copy(update={"size": size})
            return resolver.resolve(request)
        except ValidationError as exc:
            raise UserError(first_problem(exc)) from exc
        except RequestError as exc:
            raise UserError.of(exc) from exc

    async def _stored(self, job_id: int, who: Requester) -> tuple[Job, Preset]:
        """A job `who` may see, whose spec may still be drawn (its preset and LoRAs not withdrawn)."""
        job = await self._job(job_id, who)
        try:
            return job, self.resolver_for(who.guild_id).check_stored(job.spec)
        except RequestError as exc:
            raise UserError(
                "Job {job} can't be drawn again: {problem}.", job=job_id, problem=exc.message
            ) from exc

    # Image prompts (bot/services/pictures.py)

    async def image_prompt(self, data: bytes) -> InputImage:
        """An uploaded image checked, normalized and stored; a refusal is one UserError line."""
        return await self.pictures.upload(data)

    def size_for_input(
        self, request: GenerationRequest, image: InputImage, guild_id: int | None = None
    ) -> str:
        try:
            return size_for(self.resolver_for(guild_id).preset(request.preset), image)
        except RequestError as exc:
            raise UserError.of(exc) from exc

    async def _drawn(self, parent: Job, who: Requester, picture: int = 1) -> InputImage:
        return await self.pictures.of_job(parent, who.age_restricted, picture)

    async def job_on_message(self, who: Requester, message_id: int) -> Job | None:
        """The job a message shows (for 🔁 reactions), if `who` may see it."""
        job = await self.jobs.by_message(message_id)
        return job if job is not None and may_see(job, who) else None

    async def history(self, who: Requester, user_id: int, page: int = 1) -> HistoryPage:
        """`user_id`'s jobs as `who` may see them: all of their own; of someone else's, only those
        posted in this guild's channels that `who` can view (the visibility rule)."""
        if page < 1:
            raise UserError("page must be 1 or more")
        if user_id == who.user_id:
            jobs, total = await self.jobs.history(user_id, page, HISTORY_PAGE)
        elif who.guild_id is None:
            jobs, total = [], 0
        else:
            channels = await self.jobs.delivered_channels(user_id, who.guild_id)
            visible = [channel for channel in channels if who.can_view(channel)]
            jobs, total = await self.jobs.history(
                user_id, page, HISTORY_PAGE, guild_id=who.guild_id, channel_ids=visible
            )
        pages = max(1, math.ceil(total / HISTORY_PAGE))
        if page > pages and total:
            raise UserError("there are only {pages} pages", pages=pages)
        return HistoryPage(jobs, page, pages, total)

    async def cancel(self, who: Requester, job_id: int) -> None:
        """The owner's own job, or (an admin) any job asked in the admin's guild."""
        job = await self.jobs.get(job_id) if 1 <= job_id <= MAX_JOB_ID else None
        if job is None or not (
            job.user_id == who.user_id or (who.is_admin and may_moderate(job.guild_id, who))
        ):
            raise NotFound(_not_found(job_id))
        by = "an admin" if job.user_id != who.user_id else "its owner"
        if not await self.queue.cancel(job_id, by):
            raise UserError(
                "Job {job} is not queued or running (it is {status}).", job=job_id, status=job.status.value
            )

    async def _job(self, job_id: int, who: Requester) -> Job:
        """A job `who` refers to; one they may not see is as missing as one that never was (an id no
        database could hold, too: a client may send any number)."""
        job = await self.jobs.get(job_id) if 1 <= job_id <= MAX_JOB_ID else None
        if job is None or not may_see(job, who):
            raise NotFound(_not_found(job_id))
        return job


def _require_seeded(job: Job) -> None:
    """Rerolls, more seeds and reruns with another seed need a job whose pixels follow its seed: an
    upscale without a redraw is the upscaler model's alone."""
    if job.spec.mode == "upscale":
        raise UserError(
            "Job {job} is an upscale without a redraw: its seed changes nothing (use /rerun as it is).",
            job=job.id,
        )


def _redraw(spec: DrawSpec, image: InputImage, strength: float, seed: int) -> DrawSpec:
    """A job's spec redrawing one of its pictures (img2img at `strength`), one image."""
    return spec.model_copy(
        update={
            "mode": "img2img",
            "init_image": image.sha256,
            "references": (),  # an edit's other references are not part of redrawing its picture
            "mask": None,  # nor an inpaint's mask
            "model_upscale": False,  # nor an upscale's model (Upscale sets its own)
            "upscaler": None,
            "strength": strength,
            "seed": seed,
            "batch_size": 1,
            "width": image.width,
            "height": image.height,
        }
    )


def _and_the(first: Message, then: Message) -> Message:
    return Message("{a} and the {b}", a=first, b=then)


def _not_found(job_id: int) -> Message:
    return Message("There is no job {job} that you can see (see /history for yours).", job=job_id)


_REJECTION_LABEL = {
    "banned": "banned",
    "queue_full": "queue_cap",
    "user_cap": "queue_cap",
    "rate": "rate_limit",
}


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _family_preset(resolver: RequestResolver, name: str) -> Preset | None:
    """The preset `name` where it is for the loaded family (kontext, fill), else None."""
    preset = resolver.catalog.presets.get(name)
    return preset if preset is not None and preset.family == resolver.family else None
