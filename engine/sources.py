"""Find the model the operator named: tiny, a diffusers folder, a hub id, single files, a models/ folder."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from engine.errors import ModelLoadError
from engine.settings import EngineSettings
from engine.tiny import ensure_tiny_model

SourceKind = Literal["tiny", "diffusers", "hub", "single_file"]
TRANSFORMER_SUFFIXES = (".safetensors", ".sft", ".gguf")
# Sub-folders of a Forge (first) or ComfyUI (after) models/ folder, by role.
CHECKPOINT_DIRS = ("Stable-diffusion", "unet", "diffusion_models", "checkpoints")
VAE_DIRS = ("VAE", "vae")
TEXT_ENCODER_DIRS = ("text_encoder", "text_encoders", "clip")
LORA_DIRS = ("Lora", "loras", "lora")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
NO_TEXT_ENCODERS = "this checkpoint has no text encoders: set engine.clip_l / engine.t5xxl"


@dataclass(frozen=True)
class ModelSource:
    """Where each part of the model comes from."""

    kind: SourceKind
    location: str  # folder, hub id or transformer file
    transformer: Path | None = None
    vae: Path | None = None
    clip_l: Path | None = None
    t5xxl: Path | None = None
    models_dir: Path | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def is_gguf(self) -> bool:
        return self.transformer is not None and self.transformer.suffix == ".gguf"

    def files(self) -> dict[str, Path]:
        named = {"transformer": self.transformer, "vae": self.vae, "clip_l": self.clip_l, "t5xxl": self.t5xxl}
        return {role: path for role, path in named.items() if path is not None}


def locate_model(settings: EngineSettings, data_dir: Path) -> ModelSource:
    """Decide what `engine.model` names; raises ModelLoadError with the setting to fix."""
    model = settings.model.strip()
    if model in ("tiny", "tiny-flux1", "tiny-flux2"):
        family = "flux2" if model == "tiny-flux2" else "flux1"
        return ModelSource("tiny", str(ensure_tiny_model(data_dir / "models" / f"tiny-{family}", family)))
    path = Path(model).expanduser()
    if path.is_dir() and (path / "model_index.json").is_file():
        return ModelSource("diffusers", str(path))
    if path.is_dir():
        return _from_models_dir(path, settings)
    if path.is_file():
        if path.suffix not in TRANSFORMER_SUFFIXES:
            raise ModelLoadError(f"{path.name}: a transformer checkpoint must be .safetensors, .sft or .gguf")
        return _single_file(path, settings, models_dir=None)
    if _HUB_ID.match(model) and not path.exists() and not model.startswith((".", "/")):
        return ModelSource("hub", model)
    raise ModelLoadError(
        f"model {model!r} not found: set FLUXBOT_MODEL to 'tiny', a folder, a file or a hub id"
    )


def _from_models_dir(root: Path, settings: EngineSettings) -> ModelSource:
    checkpoint_dirs = _subdirs(root, CHECKPOINT_DIRS)
    if not checkpoint_dirs:
        raise ModelLoadError(
            f"{root} is neither a diffusers folder (no model_index.json) nor a models/ folder "
            f"(no {', '.join(CHECKPOINT_DIRS)} inside)"
        )
    candidates = sorted(p for d in checkpoint_dirs for p in d.iterdir() if p.suffix in TRANSFORMER_SUFFIXES)
    if settings.checkpoint:
        chosen = [p for p in candidates if p.name == settings.checkpoint]
        if not chosen:
            raise ModelLoadError(
                f"engine.checkpoint {settings.checkpoint!r} is not in {_names(checkpoint_dirs)}"
            )
    else:
        chosen = candidates
    if not chosen:
        raise ModelLoadError(f"no .safetensors/.gguf checkpoint in {_names(checkpoint_dirs)}")
    if len(chosen) > 1:
        raise ModelLoadError(
            f"several checkpoints in {_names(checkpoint_dirs)}: set engine.checkpoint to one of "
            + ", ".join(p.name for p in chosen)
        )
    return _single_file(chosen[0], settings, models_dir=root)


def _single_file(transformer: Path, settings: EngineSettings, models_dir: Path | None) -> ModelSource:
    search = [transformer.parent]
    if models_dir is not None:
        search = _subdirs(models_dir, VAE_DIRS + TEXT_ENCODER_DIRS) + search
    notes: list[str] = []
    vae = settings.vae or _find(search, ("ae.safetensors", "ae.sft"), ("ae", "vae"))
    clip_l = settings.clip_l or _find(search, ("clip_l.safetensors",), ("clip_l",))
    t5xxl = settings.t5xxl or _find(search, (), ("t5xxl", "t5_xxl", "t5-v1_1-xxl"))
    for role, path in (("vae", vae), ("clip_l", clip_l), ("t5xxl", t5xxl)):
        if path is not None and not path.is_file():
            raise ModelLoadError(f"engine.{role} = {path} does not exist")
        if path is not None:
            notes.append(f"{role}: {path}")
    return ModelSource(
        "single_file", str(transformer), transformer, vae, clip_l, t5xxl, models_dir=models_dir, notes=notes
    )


def _subdirs(root: Path, names: Iterable[str]) -> list[Path]:
    return [root / n for n in names if (root / n).is_dir()]


def _names(dirs: list[Path]) -> str:
    return ", ".join(str(d) for d in dirs)


def _find(dirs: list[Path], exact: tuple[str, ...], stems: tuple[str, ...]) -> Path | None:
    files = [p for d in dirs for p in sorted(d.iterdir()) if p.suffix in (".safetensors", ".sft")]
    for name in exact:
        for path in files:
            if path.name == name:
                return path
    for stem in stems:
        for path in files:
            if path.stem.lower() == stem or path.stem.lower().startswith(stem + "_"):
                return path
    return None
