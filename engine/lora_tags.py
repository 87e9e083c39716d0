"""`<lora:name:weight>` tags in a prompt, as Forge and A1111 users write them: each selects a LoRA
from the whitelist and is taken out of the text the model reads. The recipe writes them back
(engine/png.py), so a prompt copied from a PNG's `parameters` draws the same LoRAs again."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath

from engine.api import LoraChoice
from engine.errors import LoraError, RequestError
from engine.whitelist import LoraEntry

# Anything between `<lora:` and `>`: what is inside is checked below, so a broken tag is refused
# by name instead of being drawn as text.
_TAG = re.compile(r"<\s*lora\s*:([^<>]*)>", re.IGNORECASE)
_SPACES = re.compile(r"[ \t]{2,}")
_TAG_SHOWN = 80  # a tag is quoted at most this long in a refusal


@dataclass(frozen=True)
class TaggedPrompt:
    text: str  # the prompt without its tags: what the model reads and people are shown
    loras: tuple[LoraChoice, ...]


def take_lora_tags(prompt: str, whitelist: Mapping[str, LoraEntry]) -> TaggedPrompt:
    """The prompt's `<lora:...>` tags as whitelisted LoRA choices, and the prompt without them.
    A tag names a LoRA by its whitelist name or its file's name (Forge writes the file's stem), in
    any case; its weight is optional (the whitelist's default). Refuses, naming the tag: an unknown
    LoRA, a weight that is not a finite number, more than one weight."""
    choices: list[LoraChoice] = []
    for match in _TAG.finditer(prompt):
        tag = match.group(0)
        parts = [p.strip() for p in match.group(1).split(":")]
        if not parts[0] or len(parts) > 2:
            raise LoraError(
                "{tag} is not a LoRA tag fluxbot reads: write <lora:name> or <lora:name:weight>",
                tag=tag[:_TAG_SHOWN],
            )
        entry = _entry(parts[0], whitelist)
        if entry is None:
            raise LoraError(
                "{tag}: no LoRA called {lora!r} is on the whitelist (see the lora option's list)",
                tag=tag[:_TAG_SHOWN],
                lora=parts[0][:64],
            )
        weight = _weight(parts[1], tag) if len(parts) == 2 and parts[1] else None
        if weight is not None and abs(weight) > entry.max_weight:
            raise LoraError(
                "{tag}: the weight of LoRA {lora} must be within ±{most}",
                tag=tag[:_TAG_SHOWN],
                lora=entry.name,
                most=entry.max_weight,
            )
        choices.append(LoraChoice(name=entry.name, weight=weight))
    if not choices:
        return TaggedPrompt(prompt, ())
    text = _TAG.sub(" ", prompt)
    # What the tags leave behind: doubled spaces and commas around the hole (`a cat, , at night`).
    text = ",".join(part for part in text.split(",") if part.strip())
    text = "\n".join(_SPACES.sub(" ", line).strip() for line in text.splitlines()).strip()
    if not text:
        raise RequestError("the prompt is empty once its <lora:...> tags are taken out")
    return TaggedPrompt(text, tuple(choices))


def _entry(name: str, whitelist: Mapping[str, LoraEntry]) -> LoraEntry | None:
    if name in whitelist:
        return whitelist[name]
    wanted = name.lower()
    for entry in whitelist.values():
        file = PurePosixPath(entry.file)
        if wanted in (entry.name.lower(), file.stem.lower(), file.name.lower()):
            return entry
    return None


def _weight(text: str, tag: str) -> float:
    try:
        weight = float(text)
    except ValueError:
        weight = math.nan
    if not math.isfinite(weight):
        raise LoraError("{tag}: the weight must be a number such as 0.8", tag=tag[:_TAG_SHOWN])
    return weight
