"""A small fake Discord on 127.0.0.1: the REST routes and the gateway that discord.py uses.

The real discord.py client talks to it through FLUXBOT_DISCORD_API_BASE / _GATEWAY_URL. It records
every REST call so tests can assert on what a user would see (messages, edits, files, reactions),
and it can push gateway events (slash commands, button clicks, reactions) and drop the socket.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import MultipartReader, WSMsgType, web

BOT_ID = 900000000000000001
APP_ID = 900000000000000002
GUILD_ID = 800000000000000001
CHANNEL_ID = 800000000000000002  # "images": everyone can view it
PRIVATE_CHANNEL_ID = 800000000000000003  # "mods": hidden from @everyone, open to ADMIN_ROLE
NSFW_CHANNEL_ID = 800000000000000004  # "after-dark": age-restricted
OTHER_GUILD_ID = 810000000000000001  # a second server the bot is in
OTHER_CHANNEL_ID = 810000000000000002
EVERYONE = GUILD_ID
ADMIN_ROLE = 777000000000000001  # a role that exists in the fake guild, for admin tests
BOOSTER_ROLE = 777000000000000002  # a plain role of the fake guild (community rules)
# What @everyone may do in both fake guilds: view channels, send, react, read history, use commands.
MEMBER_PERMISSIONS = (1 << 10) | (1 << 11) | (1 << 6) | (1 << 16) | (1 << 31)
VIEW_CHANNEL = 1 << 10
_ids = itertools.count(1_100_000_000_000_000_000)


def snowflake() -> str:
    return str(next(_ids))


def user_payload(user_id: int, name: str, bot: bool = False) -> dict[str, Any]:
    return {
        "id": str(user_id),
        "username": name,
        "discriminator": "0",
        "global_name": name,
        "avatar": None,
        "bot": bot,
        "public_flags": 0,
    }


@dataclass
class Call:
    method: str
    path: str
    query: dict[str, str]
    json: Any
    files: list[tuple[str, bytes]]
    at: float = field(default_factory=time.monotonic)

    @property
    def carries_result(self) -> bool:
        """An upload of result images (not only the preview of a picture forming)."""
        return any(not name.endswith("-preview.jpg") for name, _ in self.files)


class FakeDiscord:
    def __init__(self, keep_payloads: bool = True) -> None:
        # keep_payloads=False (the soak bench): record calls without bodies or file bytes, so the fake's
        # own memory does not grow in the same process whose RSS is being watched.
        self.keep_payloads = keep_payloads
        self.callbacks: dict[str, Call] = {}  # interaction token -> its ack
        self.calls: list[Call] = []
        self.messages: dict[str, dict[str, Any]] = {}
        self.originals: dict[str, str] = {}  # interaction token -> message id
        self.commands: list[dict[str, Any]] = []
        self.sockets: list[web.WebSocketResponse] = []
        self.identified = asyncio.Event()
        self.interaction_sent_at: dict[str, float] = {}
        self.interaction_channels: dict[str, int] = {}  # interaction token -> the channel it came from
        self.attachment_bytes: dict[str, bytes] = {}
        self._seq = 0
        self._changed = asyncio.Condition()
        self.runner: web.AppRunner | None = None
        self.port = 0
        self.fail_next: list[tuple[str, int]] = []  # (path fragment, status) to answer once
        self.expired: set[str] = set()  # interaction tokens Discord no longer knows (> 15 min)
        # Uploads (requests that carry files): a storm answers them all with an error until a moment,
        # a delay holds each one that long before it is applied (a slow link).
        self.upload_storm: tuple[int, float] | None = None  # (status, until monotonic)
        self.upload_delay_s = 0.0
        # Discord's per-file limit where interactions come from (interaction.attachment_size_limit);
        # a larger file is answered 413, as Discord does.
        self.upload_limit = 25 * 1024 * 1024
        self.guild_locale = "en-US"  # the fake servers' language (guild_locale, preferred_locale)
        self.refused_uploads = 0
        self.cdn_files: dict[str, bytes] = {}  # what users attached: served at /attachments/<id>/<name>

    # --- server life -------------------------------------------------------------------------
    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/gateway-ws", self._gateway)
        app.router.add_get("/attachments/{id}/{name}", self._cdn)
        app.router.add_route("*", "/api/v10/{tail:.*}", self._rest)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        for ws in list(self.sockets):
            await ws.close()
        if self.runner is not None:
            await self.runner.cleanup()

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/v10"

    @property
    def gateway_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/gateway-ws"

    # --- gateway -----------------------------------------------------------------------------
    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.sockets.append(ws)
        await ws.send_str(json.dumps({"op": 10, "d": {"heartbeat_interval": 30000}}))
        try:
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                payload = json.loads(msg.data)
                op = payload.get("op")
                if op == 1:
                    await ws.send_str(json.dumps({"op": 11}))
                elif op == 2:
                    await self._dispatch_to(ws, "READY", self._ready())
                    await self._dispatch_to(ws, "GUILD_CREATE", self._guild())
                    await self._dispatch_to(ws, "GUILD_CREATE", self._other_guild())
                    self.identified.set()
                elif op == 6:
                    await self._dispatch_to(ws, "RESUMED", {})
                    self.identified.set()
        finally:
            if ws in self.sockets:
                self.sockets.remove(ws)
        return ws

    async def _dispatch_to(self, ws: web.WebSocketResponse, event: str, data: dict[str, Any]) -> None:
        self._seq += 1
        await ws.send_str(json.dumps({"op": 0, "t": event, "s": self._seq, "d": data}))

    async def dispatch(self, event: str, data: dict[str, Any]) -> None:
        await asyncio.wait_for(self.identified.wait(), 30)
        await self._dispatch_to(self.sockets[-1], event, data)

    def storm_uploads(self, status: int, seconds: float) -> None:
        """Every upload is answered `status` for the next `seconds` (a Discord outage on attachments)."""
        self.upload_storm = (status, time.monotonic() + seconds)

    async def drop_gateway(self) -> None:
        """Close the websocket the way a network blip does; discord.py reconnects."""
        self.identified.clear()
        for ws in list(self.sockets):
            await ws.close(code=4000)

    def _ready(self) -> dict[str, Any]:
        return {
            "v": 10,
            "user": user_payload(BOT_ID, "fluxbot", bot=True),
            "guilds": [{"id": str(g), "unavailable": True} for g in (GUILD_ID, OTHER_GUILD_ID)],
            "session_id": "session-1",
            "resume_gateway_url": self.gateway_url,
            "shard": [0, 1],
            "application": {"id": str(APP_ID), "flags": 0},
        }

    def _guild(self) -> dict[str, Any]:
        return {
            "id": str(GUILD_ID),
            "name": "Test Guild",
            "icon": None,
            "owner_id": "1",
            "afk_timeout": 300,
            "verification_level": 0,
            "default_message_notifications": 0,
            "explicit_content_filter": 0,
            "mfa_level": 0,
            "system_channel_flags": 0,
            "premium_tier": 0,
            "preferred_locale": self.guild_locale,
            "nsfw_level": 0,
            "features": [],
            "emojis": [],
            "stickers": [],
            "large": False,
            "member_count": 3,
            "unavailable": False,
            "joined_at": _now(),
            "threads": [],
            "stage_instances": [],
            "guild_scheduled_events": [],
            "voice_states": [],
            "presences": [],
            "members": [],
            "roles": [
                _role(EVERYONE, "@everyone", 0, MEMBER_PERMISSIONS),
                _role(ADMIN_ROLE, "fluxbot-admins", 1),
                _role(BOOSTER_ROLE, "boosters", 2),
            ],
            "channels": [self._channel(c) for c in (CHANNEL_ID, PRIVATE_CHANNEL_ID, NSFW_CHANNEL_ID)],
        }

    def _other_guild(self) -> dict[str, Any]:
        guild = self._guild()
        guild.update(
            id=str(OTHER_GUILD_ID),
            name="Other Guild",
            roles=[_role(OTHER_GUILD_ID, "@everyone", 0, MEMBER_PERMISSIONS)],
            channels=[self._channel(OTHER_CHANNEL_ID)],
        )
        return guild

    @staticmethod
    def guild_of(channel_id: int) -> int | None:
        """The fake guild a channel is in; None: a DM channel."""
        if channel_id in (CHANNEL_ID, PRIVATE_CHANNEL_ID, NSFW_CHANNEL_ID):
            return GUILD_ID
        return OTHER_GUILD_ID if channel_id == OTHER_CHANNEL_ID else None

    @staticmethod
    def dm_channel(user_id: int) -> int:
        """The DM channel between the bot and a user (any id outside the fake guilds)."""
        return 700000000000000000 + user_id % 10**15

    def _channel(self, channel_id: int = CHANNEL_ID) -> dict[str, Any]:
        guild_id = self.guild_of(channel_id)
        if guild_id is None:
            return {"id": str(channel_id), "type": 1, "last_message_id": None, "recipients": []}
        names = {CHANNEL_ID: "images", PRIVATE_CHANNEL_ID: "mods", NSFW_CHANNEL_ID: "after-dark"}
        overwrites: list[dict[str, Any]] = []
        if channel_id == PRIVATE_CHANNEL_ID:
            overwrites = [
                {"id": str(EVERYONE), "type": 0, "allow": "0", "deny": str(VIEW_CHANNEL)},
                {"id": str(ADMIN_ROLE), "type": 0, "allow": str(VIEW_CHANNEL), "deny": "0"},
            ]
        return {
            "id": str(channel_id),
            "type": 0,
            "name": names.get(channel_id, "general"),
            "position": 0,
            "guild_id": str(guild_id),
            "permission_overwrites": overwrites,
            "nsfw": channel_id == NSFW_CHANNEL_ID,
            "parent_id": None,
        }

    # --- events a user causes -----------------------------------------------------------------
    def member(
        self, user_id: int, name: str, roles: list[int] | None = None, admin: bool = False
    ) -> dict[str, Any]:
        return {
            "user": user_payload(user_id, name),
            "roles": [str(r) for r in roles or []],
            "joined_at": _now(),
            "deaf": False,
            "mute": False,
            "flags": 0,
            "permissions": "8" if admin else "0",
        }

    def _interaction(
        self,
        kind: int,
        data: dict[str, Any],
        member: dict[str, Any],
        channel_id: int,
        locale: str = "en-US",
        **extra: Any,
    ) -> dict[str, Any]:
        """`locale`: the user's Discord language; the server's is `self.guild_locale` (absent in DMs)."""
        interaction_id = snowflake()
        guild_id = self.guild_of(channel_id)
        token = f"token-{interaction_id}"
        self.interaction_channels[token] = channel_id
        where: dict[str, Any] = (
            {"user": member["user"], "context": 1}
            if guild_id is None
            else {"guild_id": str(guild_id), "member": member, "context": 0}
        )
        return {
            "id": interaction_id,
            "application_id": str(APP_ID),
            "type": kind,
            "data": data,
            "channel_id": str(channel_id),
            "channel": self._channel(channel_id),
            **where,
            "token": token,
            "version": 1,
            "app_permissions": "2147483647",
            "locale": locale,
            **({"guild_locale": self.guild_locale} if guild_id is not None else {}),
            "entitlements": [],
            "authorizing_integration_owners": {"0": str(guild_id or GUILD_ID)},
            "attachment_size_limit": self.upload_limit,
            **extra,
        }

    async def slash(
        self,
        name: str,
        options: list[dict[str, Any]],
        member: dict[str, Any],
        channel_id: int = CHANNEL_ID,
        users: list[dict[str, Any]] = (),  # type: ignore[assignment]
        attachments: list[dict[str, Any]] = (),  # type: ignore[assignment]
        locale: str = "en-US",
        roles: list[int] = (),  # type: ignore[assignment]
        channels: list[int] = (),  # type: ignore[assignment]
    ) -> str:
        """Send a slash command (in `channel_id`: a guild channel, or a dm_channel); returns its token.
        `users`: member payloads that user options name (Discord sends them as resolved data);
        `attachments`: what `attach()` made, named by attachment options (type 11, value: the id)."""
        command = next((c for c in self.commands if c["name"] == name), None)
        data: dict[str, Any] = {
            "id": command["id"] if command else snowflake(),
            "name": name,
            "type": 1,
            "options": options,
        }
        if (guild_id := self.guild_of(channel_id)) is not None:
            data["guild_id"] = str(guild_id)
        if users:
            data["resolved"] = {
                "users": {u["user"]["id"]: u["user"] for u in users},
                "members": {u["user"]["id"]: {k: v for k, v in u.items() if k != "user"} for u in users}
                if guild_id is not None
                else {},
            }
        if attachments:
            data.setdefault("resolved", {})["attachments"] = {a["id"]: a for a in attachments}
        if roles:  # role options: Discord sends the roles they name as resolved data
            known = {int(r["id"]): r for r in self._guild()["roles"]}
            data.setdefault("resolved", {})["roles"] = {
                str(r): known.get(r, _role(r, "unknown", 0)) for r in roles
            }
        if channels:  # channel options: the partial channels
            data.setdefault("resolved", {})["channels"] = {
                str(c): {**self._channel(c), "permissions": "2147483647"} for c in channels
            }
        payload = self._interaction(2, data, member, channel_id, locale)
        self.interaction_sent_at[payload["token"]] = time.monotonic()
        await self.dispatch("INTERACTION_CREATE", payload)
        return str(payload["token"])

    def attach(self, data: bytes, filename: str, content_type: str | None) -> dict[str, Any]:
        """A file a user attaches to a command: its attachment object, its bytes on the fake CDN."""
        attachment_id = snowflake()
        self.cdn_files[attachment_id] = data
        payload: dict[str, Any] = {
            "id": attachment_id,
            "filename": filename,
            "size": len(data),
            "url": f"http://127.0.0.1:{self.port}/attachments/{attachment_id}/{filename}",
            "proxy_url": f"http://127.0.0.1:{self.port}/attachments/{attachment_id}/{filename}",
        }
        if content_type is not None:
            payload["content_type"] = content_type
        return payload

    async def _cdn(self, request: web.Request) -> web.Response:
        data = self.cdn_files.get(request.match_info["id"])
        if data is None:
            return web.Response(status=404)
        return web.Response(body=data, content_type="application/octet-stream")

    async def click(
        self, message_id: str, custom_id: str, member: dict[str, Any], locale: str = "en-US"
    ) -> str:
        """Press a button on a message, in the message's channel."""
        data = {"custom_id": custom_id, "component_type": 2}
        message = self.messages[message_id]
        payload = self._interaction(3, data, member, int(message["channel_id"]), locale, message=message)
        self.interaction_sent_at[payload["token"]] = time.monotonic()
        await self.dispatch("INTERACTION_CREATE", payload)
        return str(payload["token"])

    async def submit_modal(
        self, opened_by: str, values: list[str], member: dict[str, Any], locale: str = "en-US"
    ) -> str:
        """Fill in and send the modal the bot answered interaction `opened_by` with (its text inputs
        in order); returns the submit interaction's token."""
        call = self.callbacks.get(opened_by)
        assert call is not None and call.json["type"] == 9, "that interaction was not answered with a modal"
        modal = call.json["data"]
        inputs = [c for row in modal["components"] for c in row["components"]]
        rows = [
            {"type": 1, "components": [{"type": 4, "custom_id": c["custom_id"], "value": v}]}
            for c, v in zip(inputs, values, strict=True)
        ]
        data = {"custom_id": modal["custom_id"], "components": rows}
        payload = self._interaction(5, data, member, self.interaction_channels[opened_by], locale)
        self.interaction_sent_at[payload["token"]] = time.monotonic()
        await self.dispatch("INTERACTION_CREATE", payload)
        return str(payload["token"])

    async def react(self, message_id: str, emoji: str, member: dict[str, Any]) -> None:
        """React to a message, in the message's channel (no member in a DM, as Discord sends it)."""
        message = self.messages.get(message_id)
        channel_id = int(message["channel_id"]) if message else CHANNEL_ID
        guild_id = self.guild_of(channel_id)
        event: dict[str, Any] = {
            "user_id": member["user"]["id"],
            "channel_id": str(channel_id),
            "message_id": message_id,
            "emoji": {"id": None, "name": emoji},
            "burst": False,
            "type": 0,
            "message_author_id": str(BOT_ID),
        }
        if guild_id is not None:
            event.update(guild_id=str(guild_id), member=member)
        await self.dispatch("MESSAGE_REACTION_ADD", event)

    # --- REST ----------------------------------------------------------------------------------
    async def _rest(self, request: web.Request) -> web.Response:
        path = "/" + request.match_info["tail"]
        body, files = await _read_body(request)
        call = Call(request.method, path, dict(request.query), body, files)
        if path.endswith("/callback"):
            self.callbacks.setdefault(path.strip("/").split("/")[2], call)
        if not self.keep_payloads:
            call = Call(request.method, path, {}, None, [])
        self.calls.append(call)
        async with self._changed:
            self._changed.notify_all()
        if files and self.upload_storm is not None and time.monotonic() < self.upload_storm[1]:
            return _json({"message": "fake storm", "code": 0}, self.upload_storm[0])
        if files and self.upload_delay_s:
            await asyncio.sleep(self.upload_delay_s)
        if any(len(blob) > self.upload_limit for _, blob in files):
            self.refused_uploads += 1
            return _json({"message": "Request entity too large", "code": 40005}, 413)
        for i, (fragment, status) in enumerate(self.fail_next):
            if fragment in path:
                del self.fail_next[i]
                return _json(
                    {"message": "fake failure", "code": 0, "retry_after": 0.05},
                    status,
                    {"Retry-After": "0.05", "X-RateLimit-Scope": "user"} if status == 429 else None,
                )
        parts = path.strip("/").split("/")
        if parts[0] == "webhooks" and len(parts) > 2 and parts[2] in self.expired:
            return _json({"message": "Unknown Webhook", "code": 10015}, 404)
        handler = self._route(request.method, path)
        if handler is None:
            return _json({"message": f"404: not in the fake ({request.method} {path})", "code": 0}, 404)
        return handler(path, body, files)

    def _route(
        self, method: str, path: str
    ) -> Callable[[str, Any, list[tuple[str, bytes]]], web.Response] | None:
        parts = path.strip("/").split("/")
        if method == "GET" and path == "/users/@me":
            return lambda *_: _json(user_payload(BOT_ID, "fluxbot", bot=True))
        if method == "GET" and path == "/oauth2/applications/@me":
            return lambda *_: _json(
                {
                    "id": str(APP_ID),
                    "name": "fluxbot",
                    "icon": None,
                    "description": "",
                    "summary": "",
                    "bot_public": True,
                    "bot_require_code_grant": False,
                    "verify_key": "0" * 64,
                    "flags": 0,
                    "owner": user_payload(1, "owner"),
                    "team": None,
                    "rpc_origins": [],
                    "tags": [],
                    "approximate_guild_count": 1,
                    "interactions_endpoint_url": None,
                    "redirect_uris": [],
                }
            )
        if method == "GET" and path.startswith("/gateway"):
            return lambda *_: _json(
                {
                    "url": self.gateway_url,
                    "shards": 1,
                    "session_start_limit": {
                        "total": 1000,
                        "remaining": 1000,
                        "reset_after": 0,
                        "max_concurrency": 1,
                    },
                }
            )
        if method == "PUT" and parts[0] == "applications" and parts[-1] == "commands":
            return self._sync_commands
        if method == "POST" and parts[0] == "interactions":
            return self._callback
        if parts[0] == "webhooks" and parts[-1] == "@original":
            return {
                "PATCH": self._edit_original,
                "GET": self._get_original,
                "DELETE": self._delete_original,
            }.get(method)
        if method == "PATCH" and parts[0] in ("webhooks", "channels") and parts[-2] == "messages":
            return self._edit_by_id
        if method == "POST" and parts[0] == "webhooks":
            return self._followup
        if method == "POST" and parts[0] == "channels" and parts[-1] == "messages":
            return self._channel_message
        if method in ("PUT", "DELETE") and "reactions" in parts:  # add ours, remove someone's
            return lambda *_: web.Response(status=204)
        return None

    def _sync_commands(self, path: str, body: Any, files: list[tuple[str, bytes]]) -> web.Response:
        problems = [p for command in body for p in command_problems(command)]
        if problems:  # what Discord answers a bulk overwrite it cannot take
            return _json({"message": "Invalid Form Body", "code": 50035, "errors": problems}, 400)
        self.commands = [
            {**c, "id": snowflake(), "application_id": str(APP_ID), "version": snowflake()} for c in body
        ]
        return _json(self.commands)

    def _callback(self, path: str, body: Any, files: list[tuple[str, bytes]]) -> web.Response:
        interaction_id, token = path.strip("/").split("/")[1:3]
        kind = body.get("type")
        data = body.get("data") or {}
        resource: dict[str, Any] = {"type": kind}
        if kind in (4, 5, 7):
            ephemeral = bool(data.get("flags", 0) & 64)
            channel_id = self.interaction_channels.get(token)
            message = self._new_message(data, files, ephemeral=ephemeral, channel_id=channel_id)
            self.originals[token] = message["id"]
            resource["message"] = message
        return _json(
            {
                "interaction": {
                    "id": interaction_id,
                    "type": 2,
                    "response_message_id": self.originals.get(token),
                    "response_message_loading": kind == 5,
                    "response_message_ephemeral": bool(data.get("flags", 0) & 64),
                },
                "resource": resource,
            }
        )

    def _edit_original(self, path: str, body: Any, files: list[tuple[str, bytes]]) -> web.Response:
        token = path.strip("/").split("/")[2]
        message_id = self.originals.get(token)
        if message_id is None:
            return _json({"message": "Unknown interaction", "code": 10062}, 404)
        message = self.messages[message_id]
        self._apply(message, body, files)
        return _json(message)

    def _edit_by_id(self, path: str, body: Any, files: list[tuple[str, bytes]]) -> web.Response:
        parts = path.strip("/").split("/")
        if parts[0] == "webhooks" and parts[2] not in self.originals:
            return _json({"message": "Unknown Webhook", "code": 10015}, 404)
        message = self.messages.get(parts[-1])
        if message is None:
            return _json({"message": "Unknown Message", "code": 10008}, 404)
        self._apply(message, body or {}, files)
        return _json(message)

    def _get_original(self, path: str, body: Any, files: list[tuple[str, bytes]]) -> web.Response:
        token = path.strip("/").split("/")[2]
        return _json(self.messages[self.originals[token]])

    def _delete_original(self, path: str, body: Any, files: list[tuple[str, bytes]]) -> web.Response:
        token = path.strip("/").split("/")[2]
        self.messages.pop(self.originals.pop(token, ""), None)
        return web.Response(status=204)

    def _followup(self, path: str, body: Any, files: list[tuple[str, bytes]]) -> web.Response:
        token = path.strip("/").split("/")[2]
        return _json(
            self._new_message(
                body or {},
                files,
                ephemeral=bool((body or {}).get("flags", 0) & 64),
                channel_id=self.interaction_channels.get(token),
            )
        )

    def _channel_message(self, path: str, body: Any, files: list[tuple[str, bytes]]) -> web.Response:
        channel_id = int(path.strip("/").split("/")[1])
        return _json(self._new_message(body or {}, files, ephemeral=False, channel_id=channel_id))

    def _new_message(
        self,
        data: dict[str, Any],
        files: list[tuple[str, bytes]],
        ephemeral: bool,
        channel_id: int | None = None,
    ) -> dict[str, Any]:
        channel_id = channel_id or CHANNEL_ID
        guild_id = self.guild_of(channel_id)
        message = {
            "id": snowflake(),
            "channel_id": str(channel_id),
            **({"guild_id": str(guild_id)} if guild_id is not None else {}),
            "author": user_payload(BOT_ID, "fluxbot", bot=True),
            "content": "",
            "timestamp": _now(),
            "edited_timestamp": None,
            "tts": False,
            "mention_everyone": False,
            "mentions": [],
            "mention_roles": [],
            "attachments": [],
            "embeds": [],
            "pinned": False,
            "type": 0,
            "flags": 64 if ephemeral else 0,
            "components": [],
        }
        self._apply(message, data, files)
        self.messages[message["id"]] = message
        return message

    def _apply(self, message: dict[str, Any], data: dict[str, Any], files: list[tuple[str, bytes]]) -> None:
        for key in ("content", "embeds", "components"):
            if key in data and data[key] is not None:
                message[key] = data[key]
        if files:
            message["attachments"] = []
            for name, blob in files:
                attachment_id = snowflake()
                if self.keep_payloads:
                    self.attachment_bytes[attachment_id] = blob
                message["attachments"].append(
                    {
                        "id": attachment_id,
                        "filename": name,
                        "size": len(blob),
                        "url": f"http://cdn.invalid/{name}",
                        "proxy_url": f"http://cdn.invalid/{name}",
                        "content_type": "image/png",
                    }
                )
        elif data.get("attachments") == []:
            message["attachments"] = []
        message["edited_timestamp"] = _now()

    # --- what tests wait for ------------------------------------------------------------------
    async def wait_for(self, predicate: Callable[[], Any], timeout: float = 30) -> Any:
        async def until() -> Any:
            async with self._changed:
                while not (result := predicate()):
                    await self._changed.wait()
                return result

        return await asyncio.wait_for(until(), timeout)

    def calls_to(self, method: str, fragment: str) -> list[Call]:
        return [c for c in self.calls if c.method == method and fragment in c.path]

    def original(self, token: str) -> dict[str, Any] | None:
        message_id = self.originals.get(token)
        return self.messages.get(message_id) if message_id else None

    def response_to(self, token: str) -> dict[str, Any] | None:
        """The first callback body the bot sent for this interaction (its ack)."""
        call = self.callbacks.get(token)
        return call.json if call else None


async def _read_body(request: web.Request) -> tuple[Any, list[tuple[str, bytes]]]:
    if request.content_type.startswith("multipart/"):
        reader: MultipartReader = await request.multipart()
        body: Any = None
        files: list[tuple[str, bytes]] = []
        while (part := await reader.next()) is not None:
            if part.name == "payload_json":
                body = json.loads(await part.text())  # type: ignore[union-attr]
            else:
                files.append((part.filename or "file", bytes(await part.read())))  # type: ignore[union-attr]
        return body, files
    raw = await request.read()
    return (json.loads(raw) if raw else None), []


# Discord's rules for application commands (discord-api-spec: ApplicationCommand*): names and their
# localizations 1-32 lowercase word characters, descriptions 1-100 (a subcommand's too), at most 25
# options and 25 choices, choice names 1-100.
_NAME = re.compile(r"^[-_\w]{1,32}$")


def command_problems(command: dict[str, Any], where: str = "") -> list[str]:
    """What real Discord refuses in one command (or option) payload; [] when it takes it."""
    here = f"{where}/{command.get('name')}"
    problems = []
    names = [command.get("name", ""), *(command.get("name_localizations") or {}).values()]
    problems += [f"{here}: bad name {n!r}" for n in names if not _NAME.match(n) or n != n.lower()]
    if command.get("type", 1) in (1, 2) or "description" in command:
        descriptions = [
            command.get("description", ""),
            *(command.get("description_localizations") or {}).values(),
        ]
        problems += [
            f"{here}: description of {len(d)} characters" for d in descriptions if not 1 <= len(d) <= 100
        ]
    options = command.get("options") or []
    choices = command.get("choices") or []
    if len(options) > 25 or len(choices) > 25:
        problems.append(f"{here}: more than 25 options or choices")
    for choice in choices:
        labels = [choice["name"], *(choice.get("name_localizations") or {}).values()]
        problems += [f"{here}: choice name {n!r}" for n in labels if not 1 <= len(n) <= 100]
    for option in options:
        problems += command_problems(option, here)
    shown: dict[str, list[str]] = {}  # what each locale shows as the option names: unique per command
    for option in options:
        for locale, name in {"": option["name"], **(option.get("name_localizations") or {})}.items():
            shown.setdefault(locale, []).append(name)
    for locale, names in shown.items():
        if locale and len(names) < len(options):  # names a locale lacks fall back to the default
            names += [o["name"] for o in options if locale not in (o.get("name_localizations") or {})]
        if len(set(names)) != len(names):
            problems.append(f"{here}: two options named alike in {locale or 'the default locale'}")
    return problems


def _role(role_id: int, name: str, position: int, permissions: int = 0) -> dict[str, Any]:
    return {
        "id": str(role_id),
        "name": name,
        "permissions": str(permissions),
        "position": position,
        "color": 0,
        "hoist": False,
        "managed": False,
        "mentionable": False,
        "flags": 0,
    }


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    # discord.py parses a body as JSON only when Content-Type is exactly application/json.
    return web.Response(
        body=json.dumps(data).encode(),
        status=status,
        headers={"Content-Type": "application/json", **(headers or {})},
    )


def _now() -> str:
    return datetime.now(UTC).isoformat()
