"""The presets and the LoRA whitelist as one immutable snapshot (torch-free).

Admins change presets and the whitelist from Discord: each change makes a new Catalog and the bot swaps
it in at once, so a request is always resolved against one consistent snapshot, and nothing that
draws ever reads a dict someone else is changing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from engine.errors import LoraError
from engine.presets import Preset, load_presets
from engine.settings import EngineSettings
from engine.spec import DrawSpec
from engine.whitelist import LoraEntry, LoraUse, load_whitelist


def _frozen(values: Mapping[str, object]) -> Mapping[str, object]:
    return MappingProxyType(dict(values))


@dataclass(frozen=True)
class Catalog:
    presets: Mapping[str, Preset] = field(default_factory=lambda: MappingProxyType({}))
    loras: Mapping[str, LoraEntry] = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        # Read-only views of private copies: a snapshot stays what it was when it was made.
        object.__setattr__(self, "presets", _frozen(self.presets))
        object.__setattr__(self, "loras", _frozen(self.loras))

    @classmethod
    def load(cls, settings: EngineSettings) -> Catalog:
        """The operator's files (or the shipped ones); errors name the file, key and problem."""
        return cls(load_presets(settings.presets_path), load_whitelist(settings.loras_path))

    @classmethod
    def from_files(cls, presets: Path, loras: Path) -> Catalog:
        return cls(load_presets(presets), load_whitelist(loras))

    def as_json(self) -> dict[str, dict[str, object]]:
        """Plain data (what database migrations that convert stored jobs are given)."""
        return {
            "presets": {name: p.model_dump(mode="json") for name, p in self.presets.items()},
            "loras": {name: e.model_dump(mode="json") for name, e in self.loras.items()},
        }

    def with_preset(self, preset: Preset) -> Catalog:
        return Catalog({**self.presets, preset.name: preset}, self.loras)

    def with_lora(self, entry: LoraEntry) -> Catalog:
        return Catalog(self.presets, {**self.loras, entry.name: entry})

    def without_lora(self, name: str) -> Catalog:
        return Catalog(self.presets, {k: v for k, v in self.loras.items() if k != name})

    def lora(self, name: str) -> LoraEntry:
        entry = self.loras.get(name)
        if entry is None:
            raise LoraError("LoRA {lora!r} is not on the whitelist", lora=name[:64])
        return entry

    def lora_uses(self, spec: DrawSpec) -> list[LoraUse]:
        """The files a spec's LoRAs are in, as the whitelist has them now. A LoRA removed since the
        job was stored, or pinned to another file, is refused: a whitelist change applies to reruns."""
        uses = []
        for lora in spec.loras:
            entry = self.loras.get(lora.name)
            if entry is None:
                raise LoraError("LoRA {lora} was removed from the whitelist", lora=lora.name)
            if entry.sha256 != lora.sha256:
                raise LoraError(
                    "LoRA {lora} was re-pinned to another file since this job was made", lora=lora.name
                )
            uses.append(LoraUse(entry.name, entry.file, entry.sha256, lora.weight))
        return uses
