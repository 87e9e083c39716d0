"""Logging set-up: plain lines for people, or one JSON object per line for log shippers."""

from __future__ import annotations

import json
import logging
import re
from datetime import UTC, datetime
from typing import Any

# Attributes every LogRecord has; anything else was passed with `extra=` and belongs in the JSON.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


# Interaction tokens are 15-minute webhook credentials: anyone holding one can post as the bot in that
# channel. discord.py writes them at DEBUG (gateway events, webhook URLs); so could an exception's text.
_SECRETS = (
    (re.compile(r"(/(?:webhooks|interactions)/\d+/)[^/\s?'\"]+"), r"\1[redacted]"),
    (re.compile(r"""((?:'|")token(?:'|")\s*:\s*(?:'|"))[^'"]+"""), r"\1[redacted]"),
    (re.compile(r"(\bBot )[A-Za-z0-9_.\-]{20,}"), r"\1[redacted]"),
    # Discord's interaction tokens are base64 of "interaction:…", wherever they turn up.
    (re.compile(r"aW50ZXJhY3Rpb246[A-Za-z0-9_.\-]+"), "[redacted]"),
)
# Loggers that write every SQL statement with its parameters at DEBUG (interaction tokens among them,
# in a form no pattern can recognise): kept at INFO whatever the level.
PARAMETER_LOGGERS = ("aiosqlite",)


def redact(text: str) -> str:
    """`text` with interaction/webhook tokens and bot tokens replaced by [redacted]."""
    for pattern, replacement in _SECRETS:
        text = pattern.sub(replacement, text)
    return text


class RedactingFormatter(logging.Formatter):
    """Formats with `inner`, then redacts: every line, traceback included, at every level."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        return redact(self.inner.format(record))


def configure(level: int | str, json_lines: bool) -> None:
    handler = logging.StreamHandler()
    inner = (
        JsonFormatter()
        if json_lines
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    handler.setFormatter(RedactingFormatter(inner))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in PARAMETER_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.INFO, logging.getLogger(name).getEffectiveLevel()))


# torchao, imported by diffusers, warns about CUDA-only kernels it cannot load on a CPU host; torch's
# pytree warns about enum registration. Neither is anything an operator can act on.
IMPORT_NOISE = ("torchao", "torch.utils._pytree")


def quiet(*extra: str) -> None:
    """Raise these loggers (and the import noise) to ERROR: the CLI, the tests and the benches use it."""
    for name in (*IMPORT_NOISE, *extra):
        logging.getLogger(name).setLevel(logging.ERROR)
