"""Typed errors whose message is what the user (or operator) reads."""

from __future__ import annotations

from pydantic import ValidationError

from engine.messages import N_, Message


class EngineError(Exception):
    """Base of every error the engine raises on purpose; the message is user-facing.

    `EngineError("steps must be between {lo} and {hi}", lo=1, hi=50)`: the template is the message id the
    bot translates (`.message`), `str()` is the English text (logs, the database, the CLI)."""

    def __init__(self, template: str | Message = "", /, **values: object) -> None:
        self.message = template if isinstance(template, Message) else Message(template, **values)
        super().__init__(str(self.message))


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
        super().__init__("cancelled after step {step} of {total}", step=step, total=total)
        self.step = step
        self.total = total


# pydantic's wording for the problems users meet, as templates over the error's context, so the bot can
# show them translated; used only where the template gives back pydantic's own English exactly.
_PYDANTIC_TEMPLATES = {
    "string_too_long": N_("String should have at most {max_length} characters"),
    "string_too_short": N_("String should have at least {min_length} characters"),
    "less_than_equal": N_("Input should be less than or equal to {le}"),
    "greater_than_equal": N_("Input should be greater than or equal to {ge}"),
    "less_than": N_("Input should be less than {lt}"),
    "greater_than": N_("Input should be greater than {gt}"),
    "finite_number": N_("Input should be a finite number"),
    "int_parsing": N_("Input should be a valid integer, unable to parse string as an integer"),
    "float_parsing": N_("Input should be a valid number, unable to parse string as a number"),
    "missing": N_("Field required"),
}


def first_problem(exc: ValidationError, prefix: str = "") -> Message:
    """pydantic's first error as one line a user can act on: `field: problem` (`str()` it for English)."""
    err = exc.errors()[0]
    where = ".".join(str(p) for p in (prefix, *err["loc"]) if p != "")
    msg = err["msg"].removeprefix("Value error, ")
    ctx = err.get("ctx") or {}
    template = _PYDANTIC_TEMPLATES.get(err["type"])
    problem: str | Message = msg
    if template is not None:
        try:
            if template.format(**ctx) == msg:
                problem = Message(template, **ctx) if ctx else Message(template)
        except (KeyError, IndexError, ValueError):
            pass
    return (
        Message("{where}: {problem}", where=where, problem=problem)
        if where
        else Message("{problem}", problem=problem)
    )


def last_line(exc: BaseException) -> str:
    """The line of a library's (often multi-line) error message that says what went wrong."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1][:200] if lines else exc.__class__.__name__
