"""Errors whose message a Discord user reads (ephemeral), in their language.

`UserError("The queue is full ({limit} jobs).", limit=20)`: the template is the catalog's message id
(bot/locale), shown translated by the Discord layer (`bot.i18n.Language.message(exc.message)`);
`str(exc)` is the English text, for logs and the CLI.
"""

from __future__ import annotations

from engine.errors import EngineError
from engine.messages import Message


class UserError(Exception):
    """Something the user can fix or wait out; the message is shown to them as is."""

    def __init__(self, template: str | Message, /, **values: object) -> None:
        self.message = template if isinstance(template, Message) else Message(template, **values)
        super().__init__(str(self.message))

    @classmethod
    def of(cls, exc: EngineError) -> UserError:
        """The engine's refusal (a bad size, an unknown LoRA), as this kind of error, same message."""
        return cls(exc.message)


class NotAllowed(UserError):
    """The user may not do this (banned, not an admin)."""


class LimitReached(UserError):
    """A rate limit or queue cap; try again later."""


class NotFound(UserError):
    """No such job (or not one of yours)."""


class StoreBusy(UserError):
    """The database failed while storing the request: nothing was queued; try again."""
