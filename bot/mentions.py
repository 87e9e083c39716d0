"""Who a bot message may ping. Nobody, unless we mean the job's owner.

The client's default is `NOBODY` (FluxBot passes it to discord.py, which sends it with every message,
edit, followup and interaction response that does not name its own); messages that mention the owner
pass `owner_only`. `discord.AllowedMentions(users=[...])` alone is not enough: its other fields default
to True, so an echoed `@everyone` or `<@&role>` would ping.
"""

from __future__ import annotations

import discord

NOBODY = discord.AllowedMentions.none()


def owner_only(user_id: int) -> discord.AllowedMentions:
    return discord.AllowedMentions(
        everyone=False, users=[discord.Object(user_id)], roles=False, replied_user=False
    )
