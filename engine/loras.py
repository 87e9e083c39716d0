"""The LoRA whitelist (config/loras.toml) and the adapters kept resident on the pipeline."""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Protocol, Self

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from engine.errors import LoraError
from engine.hashing import FileHasher
from engine.lora_layout import read_lora
from engine.presets import Family
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


class LoraWhitelist:
    """The only LoRAs that may load. Looks names up; verifies each file's sha256 once."""

    def __init__(self, entries: dict[str, LoraEntry], lora_dir: Path, hasher: FileHasher) -> None:
        self.entries = entries
        self.lora_dir = lora_dir
        self._hasher = hasher
        self._verified: set[tuple[str, str]] = set()

    @classmethod
    def load(cls, path: Path, lora_dir: Path, hasher: FileHasher) -> LoraWhitelist:
        if not path.exists():
            log.info("no LoRA whitelist at %s: no LoRAs allowed", path)
            return cls({}, lora_dir, hasher)
        data = read_toml(path)
        entries: dict[str, LoraEntry] = {}
        for name, table in data.items():
            entries[name] = validate_entry(path, name, LoraEntry, table, name=name)
        return cls(entries, lora_dir, hasher)

    def names(self) -> list[str]:
        return sorted(self.entries)

    def get(self, name: str) -> LoraEntry:
        entry = self.entries.get(name)
        if entry is None:
            raise LoraError(f"LoRA {name[:64]!r} is not on the whitelist")
        return entry

    def path_of(self, entry: LoraEntry) -> Path:
        base = self.lora_dir.resolve()
        path = (base / entry.file).resolve()
        if not path.is_relative_to(base):  # a symlink pointing out of the folder
            raise LoraError(f"LoRA {entry.name}: its file resolves outside the LoRA folder")
        return path

    def verify(self, entry: LoraEntry) -> Path:
        """The file's path once its sha256 matches the whitelist (hashed at most once per process)."""
        path = self.path_of(entry)
        if (entry.name, entry.sha256) in self._verified:
            return path
        if not path.is_file():
            raise LoraError(f"LoRA {entry.name}: file {entry.file} is missing from {self.lora_dir}")
        actual = self._hasher.sha256(path)
        if actual != entry.sha256:
            raise LoraError(
                f"LoRA {entry.name}: sha256 of {entry.file} is {actual[:12]}..., whitelist says "
                f"{entry.sha256[:12]}...; refusing to load it"
            )
        self._verified.add((entry.name, entry.sha256))
        return path

    def check_all(self) -> list[LoraCheck]:
        checks = []
        for entry in self.entries.values():
            try:
                path = self.verify(entry)
                checks.append(LoraCheck(entry.name, path, True, None, entry.sha256))
            except LoraError as exc:
                checks.append(LoraCheck(entry.name, self.lora_dir / entry.file, False, str(exc), None))
        return checks


def adapter_name(entry: LoraEntry) -> str:
    # peft adapter names become module-dict keys: keep them to [A-Za-z0-9_], and tie them to the hash
    # so a re-pinned file is a different adapter.
    return "lora_" + re.sub(r"[^A-Za-z0-9_]", "_", entry.name) + "_" + entry.sha256[:8]


class LoraSwitch(Protocol):
    """What the engine needs of its LoRA manager: ResidentLoras, or LoraSlots on a compiled model."""

    loads: int
    hits: int

    @property
    def resident(self) -> list[str]: ...

    def activate(self, choices: Sequence[tuple[LoraEntry, float]]) -> None: ...

    def text_encoder_signature(self, choices: Sequence[tuple[LoraEntry, float]]) -> tuple[Any, ...]: ...


class ResidentLoras:
    """Adapters loaded into the pipeline stay there; a job only switches which are active."""

    def __init__(self, pipe: Any, whitelist: LoraWhitelist, max_resident: int) -> None:
        self._pipe = pipe
        self._whitelist = whitelist
        self._max_resident = max_resident
        self._loaded: OrderedDict[str, LoraEntry] = OrderedDict()  # adapter name -> entry, LRU first
        self.loads = 0
        self.hits = 0

    @property
    def resident(self) -> list[str]:
        return [entry.name for entry in self._loaded.values()]

    def activate(self, choices: Sequence[tuple[LoraEntry, float]]) -> None:
        """Make exactly these LoRAs active with these weights (none: all off)."""
        if not choices:
            if self._loaded:
                self._pipe.disable_lora()
            return
        names = [self._ensure_loaded(entry) for entry, _ in choices]
        self._evict(keep=set(names))
        self._pipe.enable_lora()
        self._pipe.set_adapters(names, adapter_weights=[weight for _, weight in choices])

    def text_encoder_signature(self, choices: Sequence[tuple[LoraEntry, float]]) -> tuple[Any, ...]:
        """Part of the embed-cache key: non-empty only when active LoRAs touch the text encoders."""
        touched = any(
            getattr(getattr(self._pipe, attr, None), "peft_config", None)
            for attr in ("text_encoder", "text_encoder_2")
        )
        return tuple((e.name, e.sha256, w) for e, w in choices) if touched else ()

    def _ensure_loaded(self, entry: LoraEntry) -> str:
        name = adapter_name(entry)
        if name in self._loaded:
            self._loaded.move_to_end(name)
            self.hits += 1
            return name
        path = self._whitelist.verify(entry)
        tensors = read_lora(path, self._pipe, entry.name)
        log.info(
            "loading LoRA %s (%s, %s layout) as resident adapter %s",
            entry.name,
            path.name,
            tensors.layout,
            name,
        )
        try:
            if tensors.text_encoder:
                load_text_encoder_lora(self._pipe.text_encoder, tensors.text_encoder, name)
            if tensors.transformer:
                self._pipe.load_lora_weights(tensors.transformer, adapter_name=name)
        except (ValueError, KeyError, RuntimeError) as exc:
            self._remove(name)  # a half-loaded LoRA would stay active in one component
            raise LoraError(f"LoRA {entry.name}: does not fit this model ({exc.__class__.__name__})") from exc
        self._loaded[name] = entry
        self.loads += 1
        return name

    def _evict(self, keep: set[str]) -> None:
        while len(self._loaded) > self._max_resident:
            victim = next((n for n in self._loaded if n not in keep), None)
            if victim is None:
                break
            log.info("unloading least recently used LoRA %s", self._loaded[victim].name)
            self._remove(victim)
            del self._loaded[victim]

    def _remove(self, adapter: str) -> None:
        if any(adapter in names for names in self._pipe.get_list_adapters().values()):
            self._pipe.delete_adapters(adapter)
        # diffusers deletes the text encoder's layers but leaves its peft_config entry behind.
        getattr(getattr(self._pipe, "text_encoder", None), "peft_config", {}).pop(adapter, None)


def load_text_encoder_lora(text_encoder: Any, tensors: dict[str, torch.Tensor], adapter: str) -> None:
    """CLIP-L LoRA layers through peft itself: transformers 5's `load_adapter` (what diffusers calls)
    demands peft >= 0.22, newer than diffusers 0.42 works with here. Alpha is folded into the tensors,
    so every module's alpha is its rank."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    ranks = {
        k.removesuffix(".lora_B.weight"): v.shape[1]
        for k, v in tensors.items()
        if k.endswith(".lora_B.weight")
    }
    config = LoraConfig(
        r=max(ranks.values()),
        lora_alpha=max(ranks.values()),
        target_modules=sorted(ranks),
        rank_pattern={re.escape(m): r for m, r in ranks.items()},
        alpha_pattern={re.escape(m): r for m, r in ranks.items()},
    )
    inject_adapter_in_model(config, text_encoder, adapter)
    result = set_peft_model_state_dict(text_encoder, tensors, adapter_name=adapter)
    if result.unexpected_keys:
        raise KeyError(f"text-encoder tensors not placed: {result.unexpected_keys[:1]}")
    text_encoder.eval()


def default_lora_dir(models_dir: Path | None, data_dir: Path) -> Path:
    if models_dir is not None:
        for sub in ("Lora", "loras", "lora"):
            if (models_dir / sub).is_dir():
                return models_dir / sub
    return data_dir / "loras"
