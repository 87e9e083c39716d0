"""Community rules: who may use what, where and how much, by Discord role and channel, per server.

Data, stored like every admin setting (settings table, audited) and read back into one immutable
snapshot (`CommunityRules`) that admissions use; admins replace it, nothing changes it in place.

- A role rule (`RoleRule`) may set a member's jobs per window, max queued, fair-share weight and the
  presets, LoRAs and job kinds they may use. A member gets the most generous value of each field
  across their roles; `@everyone` (the role whose id is the server's) is the base, and the global
  limits are what nobody's rule sets. A role can raise a member above `@everyone`, never lower them.
- A server's channel rules (`ChannelRules`): the channels where drawing works (none listed: all of
  them; a thread follows its parent), and per channel a default preset and the presets allowed there.
  The content policy stays on top: an nsfw preset still needs an age-restricted channel.
- A server's fair-share weight: between servers, as a role's weight is between members.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from bot.services.content_policy import BlockedTerms
from bot.store.models import JobKind
from engine.presets import Preset

# What a role rule can allow, as admins name it (several job kinds share one name).
Kind = Literal["imagine", "reroll", "rerun", "vary", "upscale", "edit"]
KINDS: tuple[Kind, ...] = ("imagine", "reroll", "rerun", "vary", "upscale", "edit")
KIND_OF: Mapping[JobKind, Kind] = MappingProxyType(
    {
        JobKind.IMAGINE: "imagine",
        JobKind.REROLL: "reroll",
        JobKind.RERUN: "rerun",
        JobKind.VARIATION: "vary",
        JobKind.VARY_SUBTLE: "vary",
        JobKind.VARY_STRONG: "vary",
        JobKind.UPSCALE: "upscale",
        JobKind.EDIT: "edit",
        JobKind.INPAINT: "edit",  # repainting part of a picture is an edit of it
        JobKind.OUTPAINT: "edit",  # so is drawing its new border
    }
)
ALL = "*"  # in an allowed list: everything


class RoleRule(BaseModel):
    """What one role gives its members; a field left None is not set by this role."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    jobs_per_window: int | None = Field(None, ge=1, le=1000)
    max_queued: int | None = Field(None, ge=1, le=100)
    weight: float | None = Field(None, gt=0, le=100)
    presets: tuple[str, ...] | None = None  # allowed presets; ("*",): all
    loras: tuple[str, ...] | None = None
    kinds: tuple[str, ...] | None = None

    @field_validator("kinds")
    @classmethod
    def _known_kinds(cls, kinds: tuple[str, ...] | None) -> tuple[str, ...] | None:
        unknown = [k for k in kinds or () if k != ALL and k not in KINDS]
        if unknown:
            raise ValueError(f"unknown kind {unknown[0]!r}; kinds are {', '.join(KINDS)}")
        return kinds

    @field_validator("presets", "loras", "kinds")
    @classmethod
    def _short_names(cls, names: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if names is not None and (len(names) > 50 or any(not 1 <= len(n) <= 64 for n in names)):
            raise ValueError("at most 50 names of 1 to 64 characters")
        return names

    @property
    def empty(self) -> bool:
        return all(value is None for value in self.model_dump().values())


RULE_FIELDS = tuple(RoleRule.model_fields)


class ChannelRule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    default_preset: str | None = None
    presets: tuple[str, ...] | None = None  # the presets allowed here (None: what the member may use)


class ChannelRules(BaseModel):
    """One server's channel rules."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    drawing: tuple[int, ...] = ()  # where drawing works; (): everywhere
    channels: Mapping[str, ChannelRule] = Field(default_factory=dict)  # channel id (as text) -> rule

    def rule(self, channel_id: int | None) -> ChannelRule:
        return self.channels.get(str(channel_id), ChannelRule()) if channel_id else ChannelRule()


@dataclass(frozen=True)
class Source:
    """Where an effective value comes from: a role (by id), `@everyone` or the global limits."""

    role_id: int | None  # None: the global default


@dataclass(frozen=True)
class MemberRule:
    """A member's effective rule in one server, and which role gave each value."""

    jobs_per_window: int
    max_queued: int
    weight: float
    presets: frozenset[str] | None  # None: all
    loras: frozenset[str] | None
    kinds: frozenset[str] | None
    sources: Mapping[str, Source] = field(default_factory=dict)

    def allows_preset(self, name: str) -> bool:
        return self.presets is None or name in self.presets

    def allows_lora(self, name: str) -> bool:
        return self.loras is None or name in self.loras

    def allows_kind(self, kind: JobKind) -> bool:
        return self.kinds is None or KIND_OF[kind] in self.kinds


@dataclass(frozen=True)
class Defaults:
    """What applies where no rule says otherwise (the global limits)."""

    jobs_per_window: int
    max_queued: int
    weight: float = 1.0


@dataclass(frozen=True)
class CommunityRules:
    """Every server's role and channel rules and weights, as one snapshot."""

    roles: Mapping[int, RoleRule] = field(default_factory=dict)  # role id -> rule
    role_guilds: Mapping[int, int] = field(default_factory=dict)  # role id -> its server
    servers: Mapping[int, ChannelRules] = field(default_factory=dict)  # guild id -> channel rules
    server_weights: Mapping[int, float] = field(default_factory=dict)
    # A server's own values over the global ones: limits (by field) and blocked terms (added).
    limits: Mapping[int, Mapping[str, float]] = field(default_factory=dict)
    blocked: Mapping[int, BlockedTerms] = field(default_factory=dict)
    presets: Mapping[int, Mapping[str, Preset]] = field(default_factory=dict)  # a server's own presets
    flagged: Mapping[int, str] = field(default_factory=dict)  # a server's safety.flagged_action

    def with_role(self, guild_id: int, role_id: int, rule: RoleRule) -> CommunityRules:
        roles = {k: v for k, v in self.roles.items() if k != role_id}
        guilds = {k: v for k, v in self.role_guilds.items() if k != role_id}
        if not rule.empty:
            roles[role_id], guilds[role_id] = rule, guild_id
        return replace(self, roles=roles, role_guilds=guilds)

    def with_channels(self, guild_id: int, rules: ChannelRules) -> CommunityRules:
        return replace(self, servers={**self.servers, guild_id: rules})

    def with_server_weight(self, guild_id: int, weight: float) -> CommunityRules:
        return replace(self, server_weights={**self.server_weights, guild_id: weight})

    def with_limits(self, guild_id: int, limits: Mapping[str, float]) -> CommunityRules:
        return replace(self, limits={**self.limits, guild_id: dict(limits)})

    def with_blocked(self, guild_id: int, blocked: BlockedTerms) -> CommunityRules:
        return replace(self, blocked={**self.blocked, guild_id: blocked})

    def with_preset(self, guild_id: int, preset: Preset) -> CommunityRules:
        own = {**self.presets.get(guild_id, {}), preset.name: preset}
        return replace(self, presets={**self.presets, guild_id: own})

    def with_flagged(self, guild_id: int, action: str) -> CommunityRules:
        return replace(self, flagged={**self.flagged, guild_id: action})

    def presets_of(self, guild_id: int | None) -> Mapping[str, Preset]:
        """A server's own versions of presets (bounds and defaults), by name."""
        return self.presets.get(guild_id, {}) if guild_id is not None else {}

    def limits_of(self, guild_id: int | None) -> Mapping[str, float]:
        """A server's own limits (only the fields it sets)."""
        return self.limits.get(guild_id, {}) if guild_id is not None else {}

    def blocked_in(self, guild_id: int | None) -> BlockedTerms:
        """A server's own blocked terms (the global ones apply everywhere besides)."""
        return self.blocked.get(guild_id, BlockedTerms()) if guild_id is not None else BlockedTerms()

    def channels(self, guild_id: int | None) -> ChannelRules:
        return self.servers.get(guild_id, ChannelRules()) if guild_id is not None else ChannelRules()

    def server_weight(self, guild_id: int | None) -> float:
        return self.server_weights.get(guild_id, 1.0) if guild_id is not None else 1.0

    def roles_of(self, guild_id: int) -> dict[int, RoleRule]:
        return {role: rule for role, rule in self.roles.items() if self.role_guilds.get(role) == guild_id}

    def member(self, guild_id: int | None, role_ids: Iterable[int], defaults: Defaults) -> MemberRule:
        """The most generous value of each field across `@everyone` and the member's roles: `@everyone`'s
        value (the global default where it sets none) raised by any role that gives more. An allowed
        list is everything unless `@everyone` narrows it; a role then adds to it. In a DM: the defaults."""
        everyone = self.roles.get(guild_id) if guild_id is not None else None
        others: list[tuple[int, RoleRule]] = []
        if guild_id is not None:
            for role_id in sorted(set(role_ids) - {guild_id}):  # @everyone's id is the server's
                rule = self.roles.get(role_id)
                if rule is not None and self.role_guilds.get(role_id) == guild_id:
                    others.append((role_id, rule))
        sources: dict[str, Source] = {}

        def most(name: str, default: float) -> float:
            best, source = default, Source(None)
            if everyone is not None and getattr(everyone, name) is not None:
                best, source = getattr(everyone, name), Source(guild_id)
            for role_id, rule in others:
                value = getattr(rule, name)
                if value is not None and value > best:
                    best, source = value, Source(role_id)
            sources[name] = source
            return best

        def union(name: str) -> frozenset[str] | None:
            base = getattr(everyone, name) if everyone is not None else None
            if base is None or ALL in base:
                sources[name] = Source(guild_id if base is not None else None)
                return None
            allowed, source = set(base), Source(guild_id)
            for role_id, rule in others:
                names = getattr(rule, name)
                if names is not None and ALL in names:
                    sources[name] = Source(role_id)
                    return None
                if names is not None and not set(names) <= allowed:
                    allowed.update(names)
                    source = Source(role_id)
            sources[name] = source
            return frozenset(allowed)

        return MemberRule(
            jobs_per_window=int(most("jobs_per_window", defaults.jobs_per_window)),
            max_queued=int(most("max_queued", defaults.max_queued)),
            weight=most("weight", defaults.weight),
            presets=union("presets"),
            loras=union("loras"),
            kinds=union("kinds"),
            sources=sources,
        )
