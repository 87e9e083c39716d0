"""Find the model the operator named: tiny, a diffusers folder, a hub id, single files, a models/ folder."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from engine.errors import ModelLoadError
from engine.file_roles import FileRole, find_by_contents, read_contents
from engine.settings import TINY_MODELS, EngineSettings
from engine.tiny import INDEX_FILES, ensure_tiny_model

SourceKind = Literal["tiny", "diffusers", "hub", "single_file"]
TRANSFORMER_SUFFIXES = (".safetensors", ".sft", ".gguf")
ENCODER_SUFFIXES = (".safetensors", ".sft", ".gguf")
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
    text_encoder: Path | None = None  # FLUX.2: the Qwen3 text encoder file
    family: str = "flux1"  # of a single-file transformer (what its tensors say)

    @property
    def is_gguf(self) -> bool:
        return self.transformer is not None and self.transformer.suffix == ".gguf"

    def files(self) -> dict[str, Path]:
        named = {
            "transformer": self.transformer,
            "vae": self.vae,
            "clip_l": self.clip_l,
            "t5xxl": self.t5xxl,
            "text_encoder": self.text_encoder,
        }
        return {role: path for role, path in named.items() if path is not None}


def locate_model(settings: EngineSettings, data_dir: Path, build: bool = True) -> ModelSource:
    """Decide what `engine.model` names; raises ModelLoadError with the setting to fix.
    build=False (doctor) only says where the tiny model would be built: nothing is written."""
    model = settings.model.strip()
    if model in ("tiny", *TINY_MODELS):
        family = TINY_MODELS.get(model, "flux1")
        folder = data_dir / "models" / f"tiny-{family}"
        if not build:
            built = any((folder / name).is_file() for name in INDEX_FILES)
            note = [] if built else [f"not built yet: the first run builds it in {folder} (about 5 MB)"]
            return ModelSource("tiny", str(folder), notes=note)
        return ModelSource("tiny", str(ensure_tiny_model(folder, family)))
    path = Path(model).expanduser()
    if path.is_dir() and any((path / name).is_file() for name in INDEX_FILES):
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
    # Forge and ComfyUI users sort checkpoints into sub-folders (Stable-diffusion/FLUX/...): all of
    # them are searched, and each is named by its path inside its checkpoint folder.
    candidates = {
        path.relative_to(folder).as_posix(): path
        for folder in checkpoint_dirs
        for path in _files_under(folder, TRANSFORMER_SUFFIXES)
    }
    if settings.checkpoint:
        wanted = settings.checkpoint.replace("\\", "/").strip("/")
        chosen = [p for rel, p in candidates.items() if wanted in (rel, p.name)]
        if not chosen:
            raise ModelLoadError(
                f"engine.checkpoint {settings.checkpoint!r} is not in {_names(checkpoint_dirs)} "
                "(give its file name, or its path inside that folder such as FLUX/name.gguf)"
            )
    else:
        chosen = list(candidates.values())
    if not chosen:
        raise ModelLoadError(f"no .safetensors/.gguf checkpoint in {_names(checkpoint_dirs)}")
    if len(chosen) > 1:
        names = [rel for rel, p in candidates.items() if p in chosen]
        raise ModelLoadError(
            f"several checkpoints in {_names(checkpoint_dirs)}: set engine.checkpoint to one of "
            + ", ".join(names)
        )
    return _single_file(chosen[0], settings, models_dir=root)


def _files_under(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """Files with these suffixes in `folder` and its sub-folders (hidden ones skipped), sorted."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.suffix in suffixes
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


# The parts beside a transformer file, per family: (setting, what the file holds, exact names, name
# stems). The name only breaks ties between files that hold the same part.
_PARTS: dict[str, tuple[tuple[str, FileRole, tuple[str, ...], tuple[str, ...]], ...]] = {
    "flux1": (
        ("vae", "vae", ("ae.safetensors", "ae.sft"), ("ae", "vae")),
        ("clip_l", "clip_l", ("clip_l.safetensors",), ("clip_l",)),
        ("t5xxl", "t5xxl", (), ("t5xxl", "t5_xxl", "t5-v1_1-xxl")),
    ),
    "flux2": (
        ("vae", "flux2_vae", ("flux2-vae.safetensors", "ae.safetensors"), ("flux2-vae", "flux2_vae", "ae")),
        ("text_encoder", "qwen3", (), ("qwen_3_4b", "qwen_3_8b", "qwen3", "qwen_3")),
    ),
}


_OTHER_MODELS = re.compile(r"(^|[^a-z0-9])(sd3|sd35|sdxl|sd_xl|sd15|sd21|wan|hunyuan|ltx)([^a-z0-9]|$)")


def _single_file(transformer: Path, settings: EngineSettings, models_dir: Path | None) -> ModelSource:
    search = [transformer.parent]
    if models_dir is not None:
        search = _subdirs(models_dir, VAE_DIRS + TEXT_ENCODER_DIRS) + search
    family = "flux2" if read_contents(transformer).role == "flux2_transformer" else "flux1"
    notes: list[str] = []
    # Each part is found by what its file holds; the name only breaks ties (fp16 before fp8 when both
    # are there) and names a file nothing can be read from, so its load says what is wrong with it.
    contents = {path: read_contents(path) for path in _candidates(search) if path != transformer}
    # SD3's VAE has FLUX.1's shape (16 latent channels) but other weights: no tensor tells them
    # apart, so a file whose name says it belongs to another model is never taken for FLUX's.
    contents = {p: c for p, c in contents.items() if not _OTHER_MODELS.search(p.name.lower())}
    found: dict[str, Path | None] = {}
    for setting, role, exact, stems in _PARTS[family]:
        path = getattr(settings, setting) or find_by_contents(contents, role, _name_rank(exact, stems))
        if path is not None and not path.is_file():
            raise ModelLoadError(f"engine.{setting} = {path} does not exist")
        if path is not None:
            held = contents.get(path)
            notes.append(f"{setting}: {path}" + (f" ({held.says})" if held and held.role == role else ""))
        found[setting] = path
    return ModelSource(
        "single_file",
        str(transformer),
        transformer,
        found["vae"],
        found.get("clip_l"),
        found.get("t5xxl"),
        models_dir=models_dir,
        notes=notes,
        text_encoder=found.get("text_encoder"),
        family=family,
    )


def _subdirs(root: Path, names: Iterable[str]) -> list[Path]:
    return [root / n for n in names if (root / n).is_dir()]


def _names(dirs: list[Path]) -> str:
    return ", ".join(str(d) for d in dirs)


def _candidates(dirs: list[Path]) -> list[Path]:
    # The transformer's own folder is searched flat (it may be a big download folder); the VAE and
    # text-encoder folders of a models/ tree with their sub-folders (text_encoder/flux/...).
    return [
        p
        for d in dirs
        for p in (
            sorted(d.iterdir())
            if d.name not in VAE_DIRS + TEXT_ENCODER_DIRS
            else _files_under(d, ENCODER_SUFFIXES)
        )
        if p.suffix in ENCODER_SUFFIXES and p.is_file()
    ]


def _name_rank(exact: tuple[str, ...], stems: tuple[str, ...]) -> Callable[[Path], int | None]:
    """How well a file name points to a part: an exact name first, then a known stem followed by
    `_`, `-` or `.` (t5xxl_fp16, t5-v1_1-xxl-encoder-Q8_0), None when it does not."""

    def rank(path: Path) -> int | None:
        if path.name in exact:
            return 0
        stem = path.stem.lower()
        for i, known in enumerate(stems):
            if stem == known or stem.startswith((known + "_", known + "-", known + ".")):
                return 1 + i
        return None

    return rank


# FLUX.3 comes as modular pipelines only (modular_model_index.json): class -> variant.
FLUX3_PIPELINES = {"Flux3ModularPipeline": "klein-base", "Flux3DistilledModularPipeline": "klein"}


@dataclass(frozen=True)
class FolderModel:
    """What a diffusers folder's index says it holds (nothing loaded)."""

    family: str
    variant: str | None
    pipeline: str


def folder_model(folder: Path) -> FolderModel | None:
    """A diffusers folder's family, variant and pipeline class, from its index files."""
    import json

    def read(path: Path) -> dict[str, object]:
        try:
            value = json.loads(path.read_text())
        except (OSError, ValueError):
            return {}
        return value if isinstance(value, dict) else {}

    modular = read(folder / "modular_model_index.json")
    name = str(modular.get("_class_name", ""))
    if name in FLUX3_PIPELINES:
        return FolderModel("flux3", FLUX3_PIPELINES[name], name)
    index = read(folder / "model_index.json")
    name = str(index.get("_class_name", ""))
    if name == "Flux2KleinPipeline":
        return FolderModel("flux2", "klein" if index.get("is_distilled") else "klein-base", name)
    if name == "Flux2Pipeline":
        return FolderModel("flux2", "dev", name)
    if name == "FluxPipeline":
        guidance = read(folder / "transformer" / "config.json").get("guidance_embeds")
        return FolderModel("flux1", None if guidance is None else "dev" if guidance else "schnell", name)
    return None


def model_family(source: ModelSource) -> str:
    """The family of a located model, from its files alone: what requests are checked against
    before anything loads (the CLI). A hub id is taken by its name; FLUX.1 where nothing says more."""
    if source.kind == "single_file":
        return source.family
    if source.kind == "tiny":
        return TINY_MODELS.get(Path(source.location).name, "flux1")
    if source.kind == "diffusers" and (found := folder_model(Path(source.location))) is not None:
        return found.family
    name = source.location.lower()
    return (
        "flux3"
        if "flux-3" in name or "flux.3" in name
        else "flux2"
        if "flux.2" in name or "flux-2" in name
        else "flux1"
    )
