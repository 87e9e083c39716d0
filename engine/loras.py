"""LoRA adapters kept resident on the pipeline: a job switches which are active, it does not reload them."""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Protocol

import torch

from engine.errors import LoraError
from engine.lora_layout import read_lora
from engine.whitelist import LoraFiles, LoraUse

log = logging.getLogger(__name__)


class LoraSwitch(Protocol):
    """What the engine needs of its LoRA manager: ResidentLoras, or LoraSlots on a compiled model."""

    loads: int
    hits: int

    @property
    def resident(self) -> list[str]: ...

    def activate(self, uses: Sequence[LoraUse]) -> None: ...

    def text_encoder_signature(self, uses: Sequence[LoraUse]) -> tuple[Any, ...]: ...


class ResidentLoras:
    """Adapters loaded into the pipeline stay there; a job only switches which are active."""

    def __init__(self, pipe: Any, files: LoraFiles, max_resident: int) -> None:
        self._pipe = pipe
        self._files = files
        self._max_resident = max_resident
        self._loaded: OrderedDict[str, str] = OrderedDict()  # adapter name -> LoRA name, LRU first
        self.loads = 0
        self.hits = 0

    @property
    def resident(self) -> list[str]:
        return list(self._loaded.values())

    def activate(self, uses: Sequence[LoraUse]) -> None:
        """Make exactly these LoRAs active with these weights (none: all off)."""
        if not uses:
            if self._loaded:
                self._pipe.disable_lora()
            return
        names = [self._ensure_loaded(use) for use in uses]
        self._evict(keep=set(names))
        self._pipe.enable_lora()
        self._pipe.set_adapters(names, adapter_weights=[use.weight for use in uses])

    def text_encoder_signature(self, uses: Sequence[LoraUse]) -> tuple[Any, ...]:
        """Part of the embed-cache key: non-empty only when active LoRAs touch the text encoders."""
        touched = any(
            getattr(getattr(self._pipe, attr, None), "peft_config", None)
            for attr in ("text_encoder", "text_encoder_2")
        )
        return tuple((u.name, u.sha256, u.weight) for u in uses) if touched else ()

    def _ensure_loaded(self, use: LoraUse) -> str:
        name = use.adapter
        if name in self._loaded:
            self._loaded.move_to_end(name)
            self.hits += 1
            return name
        path = self._files.verify(use.name, use.file, use.sha256)
        tensors = read_lora(path, self._pipe, use.name)
        log.info(
            "loading LoRA %s (%s, %s layout) as resident adapter %s",
            use.name,
            path.name,
            tensors.layout,
            name,
        )
        try:
            if tensors.text_encoder:
                load_text_encoder_lora(self._pipe.text_encoder, tensors.text_encoder, name)
            if tensors.transformer:
                self._pipe.load_lora_weights(tensors.transformer, adapter_name=name)
            if not any(name in names for names in self._pipe.get_list_adapters().values()):
                # diffusers only warns when no key of a file fits the model (a kohya file for FLUX.3):
                # such a LoRA would change nothing, so it is refused.
                raise KeyError("none of its tensors fit the model's layers")
        except (ValueError, KeyError, RuntimeError) as exc:
            self._remove(name)  # a half-loaded LoRA would stay active in one component
            raise LoraError(
                "LoRA {lora}: does not fit this model ({problem})",
                lora=use.name,
                problem=exc.__class__.__name__,
            ) from exc
        self._loaded[name] = use.name
        self.loads += 1
        return name

    def _evict(self, keep: set[str]) -> None:
        while len(self._loaded) > self._max_resident:
            victim = next((n for n in self._loaded if n not in keep), None)
            if victim is None:
                break
            log.info("unloading least recently used LoRA %s", self._loaded[victim])
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
