"""The LoRA whitelist (config/loras.toml) as data, and the LoRA files it pins (torch-free: the bot
checks requests against the entries; whoever loads a file checks its sha256 first)."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from engine.errors import LoraError
from engine.hashing import FileHasher
from engine.settings import EngineSettings
from engine.spec import Family
from engine.tomlfile import read_toml, validate_entry

log = logging.getLogger(__name__)
LORA_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class LoraEntry(BaseModel):
    """One whitelisted LoRA. `file` is relative to the LoRA folder; the name is never a path."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    file: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    trigger_words: list[str] = Field(default_factory=list)
    default_weight: float = 1.0
    max_weight: float = Field(1.5, gt=0, le=4.0)
    families: list[Family] = Field(default_factory=lambda: list[Family](["flux1"]))
    description: str = ""
    # Made for sexual content: the bot serves it only in age-restricted channels and DMs.
    nsfw: bool = False

    @field_validator("name")
    @classmethod
    def _name_is_a_name(cls, value: str) -> str:
        if not LORA_NAME.match(value) or ".." in value:
            raise ValueError("names use letters, digits, '.', '_' and '-' only (at most 64)")
        return value

    @field_validator("file")
    @classmethod
    def _file_stays_inside(cls, value: str) -> str:
        posix, windows = PurePosixPath(value), PureWindowsPath(value)
        if (
            posix.is_absolute()
            or windows.is_absolute()
            or windows.drive
            or ".." in posix.parts + windows.parts
        ):
            raise ValueError("must be a path inside the LoRA folder (no absolute paths, no '..')")
        if not value.endswith(".safetensors"):
            raise ValueError("must be a .safetensors file")
        return value

    @model_validator(mode="after")
    def _weights_make_sense(self) -> Self:
        if abs(self.default_weight) > self.max_weight:
            raise ValueError(f"default_weight {self.default_weight} exceeds max_weight {self.max_weight}")
        return self


@dataclass(frozen=True)
class LoraCheck:
    """What `doctor` reports for one whitelist entry."""

    name: str
    path: Path
    ok: bool
    problem: str | None
    sha256: str | None


def load_whitelist(path: Path) -> dict[str, LoraEntry]:
    """Every [name] table of the whitelist file; a missing file is an empty whitelist."""
    if not path.exists():
        log.info("no LoRA whitelist at %s: no LoRAs allowed", path)
        return {}
    return {
        name: validate_entry(path, name, LoraEntry, table, name=name)
        for name, table in read_toml(path).items()
    }


@dataclass(frozen=True)
class LoraUse:
    """One LoRA as a job loads it: which file (inside the LoRA folder), pinned by sha256, at what weight."""

    name: str
    file: str
    sha256: str
    weight: float

    @property
    def adapter(self) -> str:
        # peft adapter names become module-dict keys: keep them to [A-Za-z0-9_], and tie them to the
        # hash so a re-pinned file is a different adapter.
        return "lora_" + re.sub(r"[^A-Za-z0-9_]", "_", self.name) + "_" + self.sha256[:8]


class LoraFiles:
    """The LoRA folder: a file is handed out only once its sha256 matches the pin (hashed at most once
    per process and pin; the hasher also remembers across restarts by size and mtime)."""

    def __init__(self, lora_dir: Path, hasher: FileHasher) -> None:
        self.lora_dir = lora_dir
        self._hasher = hasher
        self._verified: set[tuple[str, str]] = set()

    def path_of(self, name: str, file: str) -> Path:
        base = self.lora_dir.resolve()
        path = (base / file).resolve()
        if not path.is_relative_to(base):  # a symlink pointing out of the folder
            raise LoraError("LoRA {lora}: its file resolves outside the LoRA folder", lora=name)
        return path

    def verify(self, name: str, file: str, sha256: str) -> Path:
        """The file's path once its sha256 matches `sha256`. Blocking (hashing): not on an event loop."""
        path = self.path_of(name, file)
        if (file, sha256) in self._verified:
            return path
        if not path.is_file():
            raise LoraError(
                "LoRA {lora}: file {file} is missing from {folder}",
                lora=name,
                file=file,
                folder=str(self.lora_dir),
            )
        actual = self._hasher.sha256(path)
        if actual != sha256:
            raise LoraError(
                "LoRA {lora}: sha256 of {file} is {actual}..., whitelist says {pinned}...; "
                "refusing to load it",
                lora=name,
                file=file,
                actual=actual[:12],
                pinned=sha256[:12],
            )
        self._verified.add((file, sha256))
        return path

    def check(self, entries: dict[str, LoraEntry] | None) -> list[LoraCheck]:
        """What `doctor` reports: every entry's file, verified."""
        checks = []
        for entry in (entries or {}).values():
            try:
                path = self.verify(entry.name, entry.file, entry.sha256)
                checks.append(LoraCheck(entry.name, path, True, None, entry.sha256))
            except LoraError as exc:
                checks.append(LoraCheck(entry.name, self.lora_dir / entry.file, False, str(exc), None))
        return checks


def bot_lora_dir(settings: EngineSettings, data_dir: Path) -> Path:
    """Where a bot without an engine (scale-out) finds LoRA files to hash-check what admins add: the
    LoRA folder setting, else a models/ folder's own, else <data_dir>/loras."""
    if settings.lora_dir is not None:
        return settings.lora_dir
    model = Path(settings.model).expanduser()
    return default_lora_dir(model if model.is_dir() else None, data_dir)


def default_lora_dir(models_dir: Path | None, data_dir: Path) -> Path:
    if models_dir is not None:
        for sub in ("Lora", "loras", "lora"):
            if (models_dir / sub).is_dir():
                return models_dir / sub
    return data_dir / "loras"
