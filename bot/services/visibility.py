"""Whose jobs a user may see: one rule, behind /rerun, the result buttons, 🔁 reactions, /history and
the /admin views (Studio and AdminService call it for every job reference; nothing else reads jobs
for a user).

- The owner may always see, and rerun, their own job, wherever it was made.
- Anyone else only a job that was posted publicly in a channel of the same guild (its message is
  there: queued, drawing or delivered; results are never ephemeral), and only while they can view
  that channel: Discord's permissions for them now (`can_view`, from discord.py's
  cache), not the stored guild id alone.
- A DM job is its owner's alone.
- Admins moderate their own guild: /admin queue lists and /admin cancel reaches the jobs asked there
  (never another guild's, never a DM's).

Everything else is "not found": a refusal never confirms that a job exists.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from bot.store.models import Job

ChannelCheck = Callable[[int], bool]


def no_channel(channel_id: int) -> bool:
    """The check for a viewer outside any guild (a DM, a test): no channel is theirs to view."""
    return False


class Viewer(Protocol):
    @property
    def user_id(self) -> int: ...

    @property
    def guild_id(self) -> int | None: ...

    @property
    def can_view(self) -> ChannelCheck: ...


def may_see(job: Job, viewer: Viewer) -> bool:
    if job.user_id == viewer.user_id:
        return True
    return (
        job.guild_id is not None
        and job.guild_id == viewer.guild_id
        and job.posted
        and job.channel_id is not None
        and viewer.can_view(job.channel_id)
    )


def may_moderate(job_guild_id: int | None, admin: Viewer) -> bool:
    """An admin's reach: the jobs asked in the guild they are admin in."""
    return job_guild_id is not None and job_guild_id == admin.guild_id
