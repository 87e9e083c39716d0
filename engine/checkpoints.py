"""What a checkpoint file is, from its tensor names alone: one table of layout traits, read by the
loader (what to refuse, what to convert) and by `fluxbot doctor` (what to say), as diffusers' own
single_file_utils keys its checkpoint types on tensor names. Nothing here loads a tensor."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from engine.errors import ModelLoadError
from engine.settings import EngineSettings
from engine.sources import NO_TEXT_ENCODERS, ModelSource

# Comfy/Forge all-in-one checkpoints carry these prefixes beside the transformer.
EMBEDDED_PREFIXES = {
    "clip_l": ("text_encoders.clip_l.transformer.", "text_encoders.clip_l."),
    "t5xxl": ("text_encoders.t5xxl.transformer.", "text_encoders.t5xxl."),
    "vae": ("vae.", "first_stage_model."),
}
# Keys of an all-in-one file that belong to other components than the transformer.
EMBEDDED_KEY_PREFIXES = (
    *(p for prefixes in EMBEDDED_PREFIXES.values() for p in prefixes),
    "text_encoders.",
    "conditioner.",
    "cond_stage_model.",
)


# Scale tensors of other fp8 schemes (ModelOpt, DeepSeek-style block scales): not applied by the
# loader, so a file carrying them is refused.
UNSUPPORTED_SCALES = ("weight_scale", "input_scale", "weight_scale_inv", ".scale_inv")


@dataclass(frozen=True)
class Trait:
    """One thing a checkpoint's tensor names can say, and what doctor says about it."""

    name: str
    test: Callable[[Sequence[str]], bool]
    says: str


def _any(test: Callable[[str], bool]) -> Callable[[Sequence[str]], bool]:
    return lambda keys: any(test(k) for k in keys)


TRAITS: tuple[Trait, ...] = (
    Trait("flux2", _any(lambda k: k.endswith("single_stream_modulation.lin.weight")), "FLUX.2"),
    Trait("flux", _any(lambda k: "double_blocks." in k or "transformer_blocks." in k), "FLUX"),
    Trait("bfl", lambda keys: any("double_blocks." in k for k in keys), "BFL layout"),
    Trait(
        "fp8_scaled",
        lambda keys: any(k.endswith(".scale_weight") or k == "scaled_fp8" for k in keys),
        "fp8_scaled: its per-tensor scales are multiplied in on load",
    ),
    Trait(
        "bnb_4bit",
        lambda keys: any(k.endswith(".absmax") for k in keys),
        "bitsandbytes NF4: dequantized on load, then quantized per the plan",
    ),
    Trait(
        "foreign_scales",
        lambda keys: any(k.endswith(UNSUPPORTED_SCALES) for k in keys),
        "fp8 scales fluxbot cannot apply: refused",
    ),
    Trait("guidance", lambda keys: any("guidance_in" in k or "guidance_embedder" in k for k in keys), "dev"),
)


@dataclass(frozen=True)
class Layout:
    """The traits a file's tensor names show."""

    path: Path
    keys: tuple[str, ...]
    traits: frozenset[str]

    def has(self, trait: str) -> bool:
        return trait in self.traits

    def embeds(self, role: str) -> bool:
        return any(k.startswith(p) for k in self.keys for p in EMBEDDED_PREFIXES[role])

    def foreign_scale(self) -> str | None:
        return next((k for k in self.keys if k.endswith(UNSUPPORTED_SCALES)), None)


def read_layout(path: Path) -> Layout:
    keys = tuple(checkpoint_keys(path))
    return Layout(path, keys, frozenset(t.name for t in TRAITS if t.test(keys)))


def checkpoint_keys(path: Path) -> list[str]:
    """Tensor names of a .safetensors or .gguf file, without loading the tensors."""
    try:
        if path.suffix == ".gguf":
            from gguf import GGUFReader

            return [t.name for t in GGUFReader(str(path)).tensors]
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            return list(fh.keys())
    except Exception as exc:  # any parser error means the same thing to the operator
        raise ModelLoadError(f"{path.name} is not a readable {path.suffix} checkpoint: {exc}") from exc


def describe_layout(path: Path) -> str:
    """What `fluxbot doctor` says about a transformer file: its layout and what loading will do."""
    layout = read_layout(path)
    if path.suffix == ".gguf":
        kind = "GGUF (city96), loaded quantized"
    else:
        kind = "BFL layout" if layout.has("bfl") else "diffusers layout"
        loading = ("fp8_scaled", "bnb_4bit", "foreign_scales")
        kind += "".join(f", {t.says}" for t in TRAITS if t.name in loading and layout.has(t.name))
        if path.suffix == ".sft":
            kind += ", .sft (read as safetensors)"
    keys = layout.keys
    doubles = {k.split(".")[1] for k in keys if k.startswith(("double_blocks.", "transformer_blocks."))}
    singles = {
        k.split(".")[1] for k in keys if k.startswith(("single_blocks.", "single_transformer_blocks."))
    }
    return f"{kind}; {len(doubles)} double + {len(singles)} single blocks (the config follows the file)"


@dataclass(frozen=True)
class CheckpointFacts:
    variant: str  # dev | schnell
    embedded: dict[str, bool]  # role -> carried inside the checkpoint


def inspect_checkpoint(source: ModelSource, settings: EngineSettings) -> CheckpointFacts:
    """Read a single-file checkpoint's tensor names and refuse what cannot load, before loading anything."""
    assert source.transformer is not None
    layout = read_layout(source.transformer)
    if layout.has("flux2"):
        return _flux2_facts(source, settings)
    if not layout.has("flux"):
        raise ModelLoadError(f"{source.transformer.name} does not look like a FLUX transformer checkpoint")
    embedded = {role: layout.embeds(role) for role in EMBEDDED_PREFIXES}
    lacking = [role for role in ("clip_l", "t5xxl") if getattr(source, role) is None and not embedded[role]]
    if len(lacking) == 2:
        raise ModelLoadError(f"{source.transformer.name}: {NO_TEXT_ENCODERS}")
    if lacking:
        raise ModelLoadError(
            f"{source.transformer.name}: no {lacking[0]} text encoder found (the other one is): "
            f"set engine.{lacking[0]} to its file (.safetensors, or .gguf for T5)"
        )
    if source.vae is None and not embedded["vae"]:
        raise ModelLoadError(f"{source.transformer.name}: no VAE found: set engine.vae to ae.safetensors")
    variant = settings.variant
    if variant in ("klein", "klein-base"):
        raise ModelLoadError(f"engine.variant = {variant!r} is FLUX.2's; {source.transformer.name} is FLUX.1")
    if variant == "auto":
        variant = "dev" if layout.has("guidance") else "schnell"
    return CheckpointFacts(variant, embedded)


def _flux2_facts(source: ModelSource, settings: EngineSettings) -> CheckpointFacts:
    """A FLUX.2 klein transformer file: what must be beside it, and which klein it is. Distilled and
    base klein have the same tensors: the file name says which (BFL names the base one
    `flux-2-klein-base-4b`), unless engine.variant does."""
    assert source.transformer is not None
    name = source.transformer.name
    if source.transformer.suffix == ".gguf":
        raise ModelLoadError(
            f"{name}: FLUX.2 GGUF files are not read yet; use a .safetensors file (bf16 or fp8)"
        )
    if source.text_encoder is None:
        raise ModelLoadError(
            f"{name}: no Qwen3 text encoder found: set engine.text_encoder to qwen_3_4b.safetensors "
            "(qwen_3_8b for klein 9B)"
        )
    if source.vae is None:
        raise ModelLoadError(f"{name}: no FLUX.2 VAE found: set engine.vae to flux2-vae.safetensors")
    variant = settings.variant
    if variant in ("dev", "schnell"):
        raise ModelLoadError(
            f"engine.variant = {variant!r} is FLUX.1's; {name} is a FLUX.2 klein transformer"
        )
    if variant == "auto":
        variant = "klein-base" if "base" in name.lower() else "klein"
    return CheckpointFacts(variant, {"clip_l": False, "t5xxl": False, "vae": False})
