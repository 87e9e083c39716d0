"""Typed errors whose message is what the user (or operator) reads."""

from __future__ import annotations

from pydantic import ValidationError


class EngineError(Exception):
    """Base of every error the engine raises on purpose; the message is user-facing."""


class RequestError(EngineError):
    """The request is outside what the preset, the whitelist or the model allows."""


class ConfigError(EngineError):
    """A config file (presets, LoRA whitelist, settings) is malformed; names file, key and problem."""


class ModelLoadError(EngineError):
    """The model files cannot be found or loaded; says which setting to change."""


class QuantizationError(EngineError):
    """The requested quantization cannot run on this host (e.g. nf4 without CUDA)."""


class LoraError(RequestError):
    """A LoRA is unknown, unsafe, missing on disk, or its hash does not match the whitelist."""


class OutOfMemory(EngineError):
    """The job did not fit in (GPU or capped CPU) memory; the message suggests a lighter request."""


class GenerationCancelled(EngineError):
    """The caller cancelled the job between two denoising steps."""

    def __init__(self, step: int, total: int) -> None:
        super().__init__(f"cancelled after step {step} of {total}")
        self.step = step
        self.total = total


def first_problem(exc: ValidationError, prefix: str = "") -> str:
    """pydantic's first error as one line a user can act on: `field: problem`."""
    err = exc.errors()[0]
    where = ".".join(str(p) for p in (prefix, *err["loc"]) if p != "")
    msg = err["msg"].removeprefix("Value error, ")
    return f"{where}: {msg}" if where else msg


def last_line(exc: BaseException) -> str:
    """The line of a library's (often multi-line) error message that says what went wrong."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1][:200] if lines else exc.__class__.__name__
