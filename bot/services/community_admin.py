"""CommunityAdmin: role rules, channel rules and server weights changed from Discord, stored and audited
first, then published to the Studio as a new CommunityRules snapshot (see bot/services/community.py).

A server's rules are changed by the operator's admins or by that server's own admins (Manage Server,
where `server_admin_guilds` lists the server): the rules of a role or channel are always those of the
server the command is used in, stored under that server's key."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from bot.services.community import (
    ALL,
    RULE_FIELDS,
    ChannelRule,
    ChannelRules,
    CommunityRules,
    MemberRule,
    RoleRule,
)
from bot.services.content_policy import BlockedTerms
from bot.services.errors import NotFound, UserError
from bot.services.studio import Requester, Studio
from bot.store.admin import AdminStore
from engine.errors import first_problem
from engine.presets import Preset
from fluxbot.settings import LimitSettings

ROLE_KEY = "role:"  # role:<guild id>:<role id> -> {"rule": RoleRule}
CHANNELS_KEY = "channels:"  # channels:<guild id> -> ChannelRules
SERVER_KEY = "server:"  # server:<guild id> -> {"weight": float}
SERVER_LIMITS_KEY = "limits@"  # limits@<guild id>: that server's own limits, over the global ones
SERVER_BLOCKLIST_KEY = "blocklist@"  # blocklist@<guild id>: terms blocked in that server only
SERVER_PRESET_KEY = "preset@"  # preset@<guild id>:<name>: that server's own version of a preset
SERVER_SAFETY_KEY = "safety@"  # safety@<guild id>: {"flagged_action": "withhold" | "spoiler"}
CHANNEL_FIELDS = ("default_preset", "presets")


@dataclass(frozen=True)
class Explained:
    """A member's effective rules in a channel, for `/admin rules`."""

    member: MemberRule
    channel: ChannelRule
    drawing: tuple[int, ...]  # where drawing works in the server; (): everywhere
    draws_here: bool
    server_weight: float


class CommunityAdmin:
    def __init__(self, studio: Studio, store: AdminStore) -> None:
        self.studio = studio
        self.store = store
        # One change at a time: each reads the rules in force, stores the changed ones, publishes them;
        # two at once would each store a copy without the other's change.
        self._changing = asyncio.Lock()

    @property
    def rules(self) -> CommunityRules:
        return self.studio.community

    async def load(self) -> None:
        """The stored rules, as one snapshot (at start)."""
        rules = CommunityRules()
        for key, value in (await self.store.settings_with_prefix(ROLE_KEY)).items():
            guild_id, role_id = (int(part) for part in key.removeprefix(ROLE_KEY).split(":"))
            rules = rules.with_role(guild_id, role_id, RoleRule.model_validate(value["rule"]))
        for key, value in (await self.store.settings_with_prefix(CHANNELS_KEY)).items():
            rules = rules.with_channels(
                int(key.removeprefix(CHANNELS_KEY)), ChannelRules.model_validate(value)
            )
        for key, value in (await self.store.settings_with_prefix(SERVER_KEY)).items():
            rules = rules.with_server_weight(int(key.removeprefix(SERVER_KEY)), float(value["weight"]))
        for key, value in (await self.store.settings_with_prefix(SERVER_LIMITS_KEY)).items():
            rules = rules.with_limits(int(key.removeprefix(SERVER_LIMITS_KEY)), value)
        for key, value in (await self.store.settings_with_prefix(SERVER_SAFETY_KEY)).items():
            rules = rules.with_flagged(int(key.removeprefix(SERVER_SAFETY_KEY)), str(value["flagged_action"]))
        for key, value in (await self.store.settings_with_prefix(SERVER_PRESET_KEY)).items():
            guild_id = int(key.removeprefix(SERVER_PRESET_KEY).split(":")[0])
            rules = rules.with_preset(guild_id, Preset.model_validate(value))
        for key, value in (await self.store.settings_with_prefix(SERVER_BLOCKLIST_KEY)).items():
            rules = rules.with_blocked(
                int(key.removeprefix(SERVER_BLOCKLIST_KEY)), BlockedTerms(tuple(value["terms"]))
            )
        self.studio.set_community(rules)

    # roles

    async def set_role(self, who: Requester, role_id: int, field: str, value: str) -> RoleRule:
        async with self._changing:
            return await self._set_role(who, role_id, field, value)

    async def _set_role(self, who: Requester, role_id: int, field: str, value: str) -> RoleRule:
        """One field of a role's rule in the asker's server; `value` "-" (or empty) unsets it."""
        guild_id = server_of(who)
        if (owner := self.rules.role_guilds.get(role_id)) is not None and owner != guild_id:
            raise NotFound("That role has no rule on this server.")  # a role belongs to one server
        if field not in RULE_FIELDS:
            raise UserError(
                "{field!r} is not a role rule field; one of: {fields}",
                field=field,
                fields=", ".join(RULE_FIELDS),
            )
        current = self.rules.roles.get(role_id) if self.rules.role_guilds.get(role_id) == guild_id else None
        data = (current or RoleRule()).model_dump()
        data[field] = _rule_value(field, value)
        try:
            rule = RoleRule.model_validate(data)
        except ValidationError as exc:
            raise UserError(first_problem(exc)) from exc
        self._check_names(field, rule)
        within_global(who, self.studio.limits, {field: getattr(rule, field)})
        key = f"{ROLE_KEY}{guild_id}:{role_id}"
        stored = None if rule.empty else {"rule": rule.model_dump(mode="json")}
        await self.store.put_setting(key, stored, who.user_id, guild_id, "role.set")
        self.studio.set_community(self.rules.with_role(guild_id, role_id, rule))
        return rule

    async def clear_role(self, who: Requester, role_id: int) -> None:
        async with self._changing:
            return await self._clear_role(who, role_id)

    async def _clear_role(self, who: Requester, role_id: int) -> None:
        guild_id = server_of(who)
        if self.rules.role_guilds.get(role_id) != guild_id:
            raise NotFound("That role has no rule on this server.")
        await self.store.put_setting(
            f"{ROLE_KEY}{guild_id}:{role_id}", None, who.user_id, guild_id, "role.clear"
        )
        self.studio.set_community(self.rules.with_role(guild_id, role_id, RoleRule()))

    def roles(self, who: Requester) -> dict[int, RoleRule]:
        return self.rules.roles_of(server_of(who))

    # channels

    async def set_drawing(self, who: Requester, channel_id: int, draws: bool) -> ChannelRules:
        async with self._changing:
            return await self._set_drawing(who, channel_id, draws)

    async def _set_drawing(self, who: Requester, channel_id: int, draws: bool) -> ChannelRules:
        """Add a channel to (or take it off) the server's drawing channels."""
        guild_id = server_of(who)
        current = self.rules.channels(guild_id)
        drawing = [c for c in current.drawing if c != channel_id] + ([channel_id] if draws else [])
        if len(drawing) > 50:
            raise UserError("At most 50 drawing channels per server.")
        updated = current.model_copy(update={"drawing": tuple(drawing)})
        await self._store_channels(who, guild_id, updated, "channel.draw" if draws else "channel.nodraw")
        return updated

    async def set_channel(self, who: Requester, channel_id: int, field: str, value: str) -> ChannelRule:
        async with self._changing:
            return await self._set_channel(who, channel_id, field, value)

    async def _set_channel(self, who: Requester, channel_id: int, field: str, value: str) -> ChannelRule:
        """A channel's default preset or allowed presets; `value` "-" (or empty) unsets it."""
        guild_id = server_of(who)
        if field not in CHANNEL_FIELDS:
            raise UserError(
                "{field!r} is not a channel rule field; one of: {fields}",
                field=field,
                fields=", ".join(CHANNEL_FIELDS),
            )
        current = self.rules.channels(guild_id)
        data = current.rule(channel_id).model_dump()
        data[field] = _channel_value(field, value)
        rule = ChannelRule.model_validate(data)
        presets = self.studio.rules.catalog.presets
        for name in ([rule.default_preset] if rule.default_preset else []) + list(rule.presets or ()):
            if name not in presets:
                raise NotFound("There is no preset {preset!r}.", preset=name)
        channels = {k: v for k, v in current.channels.items() if k != str(channel_id)}
        if rule != ChannelRule():
            channels[str(channel_id)] = rule
        if len(channels) > 100:
            raise UserError("At most 100 channels with rules per server.")
        await self._store_channels(
            who, guild_id, current.model_copy(update={"channels": channels}), "channel.set"
        )
        return rule

    async def _store_channels(self, who: Requester, guild_id: int, rules: ChannelRules, action: str) -> None:
        await self.store.put_setting(
            f"{CHANNELS_KEY}{guild_id}", rules.model_dump(mode="json"), who.user_id, guild_id, action
        )
        self.studio.set_community(self.rules.with_channels(guild_id, rules))

    # the content policy

    async def set_flagged(self, who: Requester, action: str) -> None:
        """What this server does with images the safety classifier flags: "withhold" them, or show
        them as a "spoiler" (looser than the host's choice: the operator's admins only)."""
        async with self._changing:
            guild_id = server_of(who)
            if action not in ("withhold", "spoiler"):
                raise UserError("Flagged images are withheld or shown as spoilers.")
            if action == "spoiler" and self.studio.flagged_default == "withhold" and not who.is_admin:
                raise UserError("A server's admins can make the safety filter stricter, not looser.")
            value = {"flagged_action": action}
            await self.store.put_setting(
                f"{SERVER_SAFETY_KEY}{guild_id}", value, who.user_id, guild_id, "safety.set"
            )
            self.studio.set_community(self.rules.with_flagged(guild_id, action))

    # servers (the operator's admins only: it is about sharing the GPU between servers)

    async def set_server_weight(self, who: Requester, guild_id: int, weight: float) -> None:
        async with self._changing:
            return await self._set_server_weight(who, guild_id, weight)

    async def _set_server_weight(self, who: Requester, guild_id: int, weight: float) -> None:
        if not 0 < weight <= 100:
            raise UserError("A server's weight is above 0 and at most 100.")
        await self.store.put_setting(
            f"{SERVER_KEY}{guild_id}", {"weight": weight}, who.user_id, who.guild_id, "server.weight"
        )
        self.studio.set_community(self.rules.with_server_weight(guild_id, weight))

    # what applies

    def explain(self, who: Requester) -> Explained:
        """The rules for `who` (a member, with their roles) in the channel `who` names."""
        drawing = self.rules.channels(who.guild_id).drawing
        here = not drawing or who.channel_id in drawing or who.parent_channel_id in drawing
        return Explained(
            self.studio.member_rule(who),
            self.studio.channel_rule(who),
            drawing,
            here,
            self.rules.server_weight(who.guild_id),
        )

    def _check_names(self, field: str, rule: RoleRule) -> None:
        names = getattr(rule, field)
        if field == "presets" and names:
            known = self.studio.rules.catalog.presets
            missing = [n for n in names if n != ALL and n not in known]
            if missing:
                raise NotFound("There is no preset {preset!r}.", preset=missing[0])
        if field == "loras" and names:
            known_loras = self.studio.rules.catalog.loras
            missing = [n for n in names if n != ALL and n not in known_loras]
            if missing:
                raise NotFound("LoRA {lora!r} is not on the whitelist.", lora=missing[0])


# Each value a server's own admins may set, against the global limit it may not go past, and which way
# is wider (+1: more is more generous; -1: a shorter rate window is).
_GLOBAL_BOUNDS = {
    "jobs_per_window": ("jobs_per_window", 1),
    "max_queued": ("max_queued_per_user", 1),
    "max_queued_per_user": ("max_queued_per_user", 1),
    "window_s": ("window_s", -1),
}


def within_global(who: Requester, limits: LimitSettings, values: Mapping[str, object]) -> None:
    """A server's own admins may narrow the global limits, not widen them: every server shares one
    queue (`max_queue`), so one server's generous rules would crowd the others out of it. The
    operator's admins (`who.is_admin`) may set anything."""
    if who.is_admin:
        return
    for field, value in values.items():
        if field not in _GLOBAL_BOUNDS or not isinstance(value, int | float):
            continue
        name, wider = _GLOBAL_BOUNDS[field]
        most = getattr(limits, name)
        if wider * (value - most) <= 0:
            continue
        if wider < 0:
            raise UserError(
                "A server's admins can set window_s down to the global value ({most}); "
                "less needs the operator.",
                most=most,
            )
        raise UserError(
            "A server's admins can set {field} up to the global value ({most}); more needs the operator.",
            field=field,
            most=most,
        )


def server_of(who: Requester) -> int:
    """The server a rules command is about: the one it is used in."""
    if who.guild_id is None:
        raise UserError("Rules belong to a server: use this command in one.")
    return who.guild_id


def _names(value: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in value.replace(";", ",").split(",") if name.strip())


def _rule_value(field: str, value: str) -> Any:
    value = value.strip()
    if value in ("", "-"):
        return None
    if field in ("presets", "loras", "kinds"):
        return _names(value)  # the model refuses unknown kinds by name
    try:
        return json.loads(value)
    except ValueError:
        return value


def _channel_value(field: str, value: str) -> Any:
    value = value.strip()
    if value in ("", "-"):
        return None
    return _names(value) if field == "presets" else value
