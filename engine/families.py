"""What differs between model families: how prompts are encoded and what the pipeline call takes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from engine.spec import DrawSpec

Embeds = dict[str, torch.Tensor]  # keyword -> tensor with batch dimension 1


class FamilyAdapter(Protocol):
    def encode(self, pipe: Any, prompt: str, max_sequence_length: int) -> Embeds: ...

    def call_kwargs(self, resolved: DrawSpec, negative: Embeds | None) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Flux1:
    """FLUX.1 dev/schnell: CLIP-L pooled + T5-XXL sequence embeddings, distilled guidance."""

    name: str = "flux1"

    def encode(self, pipe: Any, prompt: str, max_sequence_length: int) -> Embeds:
        embeds, pooled, _ = pipe.encode_prompt(
            prompt=prompt, prompt_2=None, max_sequence_length=max_sequence_length
        )
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def call_kwargs(self, resolved: DrawSpec, negative: Embeds | None) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            # schnell ignores guidance (no guidance embedder); 0.0 keeps the recipe honest.
            "guidance_scale": resolved.guidance if resolved.guidance is not None else 0.0,
            "true_cfg_scale": resolved.true_cfg,
            "max_sequence_length": resolved.max_sequence_length,
        }
        if negative is not None:
            kwargs["negative_prompt_embeds"] = negative["prompt_embeds"]
            kwargs["negative_pooled_prompt_embeds"] = negative["pooled_prompt_embeds"]
        return kwargs


@dataclass(frozen=True)
class Flux2:
    """FLUX.2 (Flux2Pipeline / Flux2KleinPipeline): one LLM text encoder, sequence embeddings only."""

    name: str = "flux2"

    def encode(self, pipe: Any, prompt: str, max_sequence_length: int) -> Embeds:
        out = pipe.encode_prompt(prompt=prompt, max_sequence_length=max_sequence_length)
        embeds = out[0] if isinstance(out, tuple) else out
        return {"prompt_embeds": embeds}

    def call_kwargs(self, resolved: DrawSpec, negative: Embeds | None) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "guidance_scale": resolved.guidance if resolved.guidance is not None else 1.0,
            "max_sequence_length": resolved.max_sequence_length,
        }
        if negative is not None:
            kwargs["negative_prompt_embeds"] = negative["prompt_embeds"]
        return kwargs


@dataclass(frozen=True)
class Flux3:
    """FLUX.3 klein: eight stacked Qwen3-VL hidden states; the base model's guidance is real CFG
    (its guider, from the spec's true_cfg, with an empty prompt's embedding as the negative)."""

    name: str = "flux3"

    def encode(self, pipe: Any, prompt: str, max_sequence_length: int) -> Embeds:
        from engine.flux3 import encode_prompt

        return {"prompt_embeds": encode_prompt(pipe, prompt, max_sequence_length)}

    def call_kwargs(self, resolved: DrawSpec, negative: Embeds | None) -> dict[str, Any]:
        return {"negative_prompt_embeds": negative["prompt_embeds"]} if negative is not None else {}


def adapter_for(family: str) -> FamilyAdapter:
    adapters: dict[str, FamilyAdapter] = {"flux2": Flux2(), "flux3": Flux3()}
    return adapters.get(family, Flux1())


def repeat_embeds(embeds: Embeds, times: int) -> Embeds:
    return {k: v.repeat_interleave(times, dim=0) if times > 1 else v for k, v in embeds.items()}


def concat_embeds(parts: list[Embeds]) -> Embeds:
    return {k: torch.cat([p[k] for p in parts], dim=0) for k in parts[0]}
