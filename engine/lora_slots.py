"""LoRAs on a compiled transformer: a few fixed adapter slots that LoRAs are hot-swapped into.

A compiled graph holds the adapters it was traced with: switching adapters the usual way (load,
`set_adapters` with new weights) changes what the graph checks, and every new combination compiles
again (seconds each, and past torch's recompile limit the model silently runs uncompiled). diffusers'
hotswap (`enable_lora_hotswap`, then `load_lora_weights(..., hotswap=True)`) copies a LoRA's tensors
into an adapter that already exists, padded to one rank, so nothing the graph checks changes. Two
things make that hold for every whitelisted LoRA:

- each slot starts as a zero LoRA over the union of the layers any whitelisted LoRA changes, at the
  whitelist's largest rank (hotswap cannot add layers: a LoRA is swapped into a slot that covers it);
- a LoRA's alpha / rank and its job weight are folded into its `lora_B`, so every scale stays 1.0
  (a changed scale is a changed graph too).

The LoRA tensors stay in memory (up to `max_resident`, least recently used dropped), so a switch is a
copy, not a file read. CLIP-L parts are not compiled: they load as named adapters as usual.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch

from engine.catalog import Catalog
from engine.errors import LoraError
from engine.lora_layout import LoraTensors, read_lora
from engine.loras import LoraSwitch, ResidentLoras, load_text_encoder_lora
from engine.quant import QuantPlan
from engine.settings import EngineSettings
from engine.whitelist import LoraEntry, LoraFiles, LoraUse

log = logging.getLogger(__name__)
SLOT = "slot{}"

LoraKey = tuple[str, str, float]  # name, sha256, weight: what a slot holds


class LoraSlots:
    """Same duties as ResidentLoras (activate a job's LoRAs, report what is resident), for a compiled
    transformer: the slots are set up before compiling and stay active; only their tensors change."""

    def __init__(
        self,
        pipe: Any,
        files: LoraFiles,
        max_resident: int,
        slots: int,
        layers: dict[str, torch.nn.Linear],
        rank: int,
    ) -> None:
        self._pipe = pipe
        self._files = files
        self._max_resident = max_resident
        self._layers = layers  # peft module name ("transformer.x.y") -> the layer a slot covers there
        self.rank = rank
        self._names = [SLOT.format(i) for i in range(slots)]
        self._held: list[LoraKey | None] = [None] * slots
        # adapter name -> (LoRA name, its tensors), least recently used first
        self._tensors: OrderedDict[str, tuple[str, LoraTensors]] = OrderedDict()
        self._zero = _zero_lora(layers, rank)
        self._text_adapters: set[str] = set()
        self.loads = 0
        self.hits = 0

    @classmethod
    def prepare(
        cls, pipe: Any, files: LoraFiles, entries: dict[str, LoraEntry], max_resident: int, slots: int
    ) -> LoraSlots | None:
        """Read the whitelisted LoRAs, then give the transformer its slots. Call before compiling.
        None when no whitelisted LoRA is readable here (nothing to swap: no slot costs anything)."""
        layers: dict[str, torch.nn.Linear] = {}
        rank = 0
        modules = dict(pipe.transformer.named_modules())
        for entry in entries.values():
            try:
                tensors = read_lora(files.verify(entry.name, entry.file, entry.sha256), pipe, entry.name)
            except LoraError as exc:  # it fails the same way when a job asks for it
                log.warning("compiled LoRA slots: %s is left out (%s)", entry.name, exc)
                continue
            for key, tensor in _lora_pairs(tensors.transformer, entry.name):
                module = key.removeprefix("transformer.")
                layer = modules.get(module)
                if isinstance(layer, torch.nn.Linear):
                    layers[module] = layer
                rank = max(rank, tensor.shape[0])
        if not layers or slots == 0:
            return None
        pipe.enable_lora_hotswap(target_rank=rank)
        for name in (SLOT.format(i) for i in range(slots)):
            # Fresh tensors for each slot: the loader may keep the ones it is given as the slot's own.
            pipe.load_lora_weights(_zero_lora(layers, rank), adapter_name=name)
        pipe.set_adapters([SLOT.format(i) for i in range(slots)], adapter_weights=[1.0] * slots)
        log.info(
            "compiled LoRA slots: %d slots of rank %d over %d layers (%d whitelisted LoRAs)",
            slots,
            rank,
            len(layers),
            len(entries),
        )
        return cls(pipe, files, max_resident, slots, layers, rank)

    @property
    def resident(self) -> list[str]:
        return [name for name, _ in self._tensors.values()]

    def activate(self, uses: Sequence[LoraUse]) -> None:
        """Exactly these LoRAs at these weights in the slots, the other slots zero."""
        if len(uses) > len(self._names):
            raise LoraError(f"at most {len(self._names)} LoRAs per image on this compiled engine")
        wanted: list[LoraKey] = [(use.name, use.sha256, use.weight) for use in uses]
        keep = [key if key in wanted else None for key in self._held]
        missing = [key for key in wanted if key not in keep]
        tensors = {key: self._load(use) for use, key in zip(uses, wanted, strict=True)}
        for slot, held in enumerate(keep):
            target = held if held is not None else (missing.pop(0) if missing else None)
            if target != self._held[slot]:
                self._swap(slot, None if target is None else (tensors[target], target[2]))
                self._held[slot] = target
        self._activate_text_encoder(uses)

    def text_encoder_signature(self, uses: Sequence[LoraUse]) -> tuple[Any, ...]:
        """Part of the embed-cache key: non-empty only when active LoRAs change CLIP-L."""
        touched = any(use.adapter in self._text_adapters for use in uses)
        return tuple((u.name, u.sha256, u.weight) for u in uses) if touched else ()

    def _load(self, use: LoraUse) -> LoraTensors:
        name = use.adapter
        if name in self._tensors:
            self._tensors.move_to_end(name)
            self.hits += 1
            return self._tensors[name][1]
        tensors = read_lora(self._files.verify(use.name, use.file, use.sha256), self._pipe, use.name)
        for key, tensor in _lora_pairs(tensors.transformer, use.name):
            module = key.removeprefix("transformer.")
            if module not in self._layers or tensor.shape[0] > self.rank:
                raise LoraError(
                    "LoRA {lora} changes layers (or has a rank) the compiled engine did not prepare "
                    "at start: it can be used after fluxbot restarts",
                    lora=use.name,
                )
        if tensors.text_encoder:
            load_text_encoder_lora(self._pipe.text_encoder, tensors.text_encoder, name)
            self._text_adapters.add(name)
        self._tensors[name] = (use.name, tensors)
        self.loads += 1
        while len(self._tensors) > self._max_resident:
            self._drop(next(iter(self._tensors)))
        return tensors

    def _drop(self, name: str) -> None:
        del self._tensors[name]
        if name in self._text_adapters:
            from peft.tuners.tuners_utils import BaseTunerLayer

            for module in self._pipe.text_encoder.modules():
                if isinstance(module, BaseTunerLayer):
                    module.delete_adapter(name)
            getattr(self._pipe.text_encoder, "peft_config", {}).pop(name, None)
            self._text_adapters.discard(name)

    def _swap(self, slot: int, lora: tuple[LoraTensors, float] | None) -> None:
        """Copy a LoRA (or zeros) into a slot: diffusers' hotswap, alpha and weight folded into B."""
        state = dict(self._zero) if lora is None else _folded(*lora)
        try:
            self._pipe.load_lora_weights(state, adapter_name=self._names[slot], hotswap=True)
        except (RuntimeError, ValueError, KeyError) as exc:
            self._held[slot] = None
            raise LoraError(f"a LoRA could not be swapped into the compiled engine ({exc})") from exc

    def _activate_text_encoder(self, uses: Sequence[LoraUse]) -> None:
        from diffusers.loaders.lora_base import (
            disable_lora_for_text_encoder,
            enable_lora_for_text_encoder,
            set_adapters_for_text_encoder,
        )

        text_encoder = getattr(self._pipe, "text_encoder", None)
        active = [(u.adapter, u.weight) for u in uses if u.adapter in self._text_adapters]
        if text_encoder is None or not self._text_adapters:
            return
        if not active:
            disable_lora_for_text_encoder(text_encoder)
            return
        enable_lora_for_text_encoder(text_encoder)
        set_adapters_for_text_encoder([n for n, _ in active], text_encoder, [w for _, w in active])


def _lora_pairs(state: dict[str, torch.Tensor], name: str) -> list[tuple[str, torch.Tensor]]:
    """(module, lora_A) of every layer the LoRA changes; refused where hotswap cannot take it."""
    pairs = []
    for key, tensor in state.items():
        if key.endswith(".lora_A.weight"):
            pairs.append((key.removesuffix(".lora_A.weight"), tensor))
        elif not key.endswith((".lora_B.weight", ".alpha")):
            raise LoraError(
                "LoRA {lora}: its tensor {key} cannot be hot-swapped into a compiled engine (set "
                "engine.compile = 'off' to use it)",
                lora=name,
                key=key,
            )
    return pairs


def _folded(tensors: LoraTensors, weight: float) -> dict[str, torch.Tensor]:
    """The transformer part with alpha / rank and the job's weight in lora_B, and no alphas: loaded
    so, every module's scale is 1.0 (diffusers' convention without alphas)."""
    state = tensors.transformer
    out: dict[str, torch.Tensor] = {}
    for module, down in _lora_pairs(state, "?"):
        up = state[f"{module}.lora_B.weight"]
        alpha = state.get(f"{module}.alpha")
        scale = weight * (float(alpha) / down.shape[0] if alpha is not None else 1.0)
        out[f"{module}.lora_A.weight"] = down
        out[f"{module}.lora_B.weight"] = up * scale
    return out


def _zero_lora(layers: dict[str, torch.nn.Linear], rank: int) -> dict[str, torch.Tensor]:
    """A LoRA of zeros over `layers` at `rank`: what an empty slot holds."""
    out: dict[str, torch.Tensor] = {}
    for module, layer in layers.items():
        out[f"transformer.{module}.lora_A.weight"] = torch.zeros(rank, layer.in_features)
        out[f"transformer.{module}.lora_B.weight"] = torch.zeros(layer.out_features, rank)
    return out


def lora_switch(
    pipe: Any, files: LoraFiles, catalog: Catalog, settings: EngineSettings, plan: QuantPlan
) -> LoraSwitch:
    """Resident adapters switched per job; on a compiled transformer, slots that LoRAs are swapped
    into (see above), one per LoRA a job can carry (the preset's included)."""
    if plan.compile != "off" and catalog.loras:
        preset_loras = max((len(p.loras) for p in catalog.presets.values()), default=0)
        slots = LoraSlots.prepare(
            pipe,
            files,
            dict(catalog.loras),
            settings.max_resident_loras,
            settings.max_loras_per_job + preset_loras,
        )
        if slots is not None:
            return slots
    return ResidentLoras(pipe, files, settings.max_resident_loras)
