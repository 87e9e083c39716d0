"""One client pointed at another Discord API (a proxy, or the tests' fake server), discord.py left as
it is for the rest of the process.

discord.py builds every REST URL from the class attribute `Route.BASE` and opens the gateway at
`DiscordWebSocket.DEFAULT_GATEWAY`; interaction answers and webhooks build their URLs from the same
base and send them on the client's aiohttp session. That session is the one place all three pass
through for a given client, so this client's HTTPClient wraps it and rewrites Discord's addresses to
`api_base` and `gateway_url`. discord.py keeps the session in a private attribute
(`_HTTPClient__session`, which its own interaction and webhook code reads the same way): pinned to
discord.py 2.x in pyproject, and every Discord test runs through here, so a change shows at once.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import discord
import yarl
from discord.gateway import DiscordWebSocket
from discord.http import HTTPClient, Route

DISCORD_API = Route.BASE  # read, never written
DISCORD_GATEWAY_HOST = DiscordWebSocket.DEFAULT_GATEWAY.host


class _RebasedSession:
    """discord.py's aiohttp session, sending what was meant for Discord to another address."""

    def __init__(self, session: aiohttp.ClientSession, api_base: str, gateway: yarl.URL) -> None:
        self._session, self._api_base, self._gateway = session, api_base, gateway

    def request(self, method: str, url: Any, **kwargs: Any) -> Any:
        text = str(url)
        if text.startswith(DISCORD_API):
            text = self._api_base + text[len(DISCORD_API) :]
        return self._session.request(method, text, **kwargs)

    def ws_connect(self, url: Any, **kwargs: Any) -> Any:
        target = yarl.URL(str(url))
        if target.host == DISCORD_GATEWAY_HOST:
            target = self._gateway.with_query(target.query)
        return self._session.ws_connect(str(target), **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)


class RebasedHTTPClient(HTTPClient):
    def __init__(self, template: HTTPClient, api_base: str, gateway_url: str) -> None:
        super().__init__(
            template.loop,
            template.connector or None,
            proxy=template.proxy,
            proxy_auth=template.proxy_auth,
            unsync_clock=not template.use_clock,
            http_trace=template.http_trace,
            max_ratelimit_timeout=template.max_ratelimit_timeout,
        )
        self._api_base, self._gateway = api_base.rstrip("/"), yarl.URL(gateway_url)

    def _rebase(self) -> None:
        session = self._HTTPClient__session  # type: ignore[has-type]  # discord.py's, see above
        if session and not isinstance(session, _RebasedSession):
            self._HTTPClient__session = _RebasedSession(session, self._api_base, self._gateway)

    async def request(self, route: Route, **kwargs: Any) -> Any:
        self._rebase()
        return await super().request(route, **kwargs)

    async def ws_connect(self, url: str, *, compress: int = 0) -> aiohttp.ClientWebSocketResponse:
        self._rebase()
        return await super().ws_connect(url, compress=compress)


def point_client_at(client: discord.Client, api_base: str, gateway_url: str) -> None:
    """Call in the client's __init__, before anything holds its HTTPClient (a CommandTree does)."""
    if api_base.rstrip("/") == DISCORD_API and yarl.URL(gateway_url).host == DISCORD_GATEWAY_HOST:
        return
    http = RebasedHTTPClient(client.http, api_base, gateway_url)
    client.http = http
    client._connection.http = http  # the connection state sends through the same client
