"""Errors whose message a Discord user reads (ephemeral)."""

from __future__ import annotations


class UserError(Exception):
    """Something the user can fix or wait out; the message is shown to them as is."""


class NotAllowed(UserError):
    """The user may not do this (banned, not an admin)."""


class LimitReached(UserError):
    """A rate limit or queue cap; try again later."""


class NotFound(UserError):
    """No such job (or not one of yours)."""


class StoreBusy(UserError):
    """The database failed while storing the request: nothing was queued; try again."""
