"""Read a TOML data file into a pydantic model, with errors that name the file, key and problem."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from engine.errors import ConfigError

ModelT = TypeVar("ModelT", bound=BaseModel)


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: file not found") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from exc


def validate_entry(path: Path, key: str, model: type[ModelT], data: Any, **extra: Any) -> ModelT:
    """Validate one table of a data file; the error says `file [key].field: problem`."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: [{key}] must be a table")
    try:
        return model.model_validate({**data, **extra})
    except ValidationError as exc:
        problems = "; ".join(
            f"[{key}].{'.'.join(str(p) for p in err['loc']) or '(table)'}: {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigError(f"{path}: {problems}") from exc
