"""What the engine holds and how it was made: for recipes, logs, `doctor`, /metrics and /admin."""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.api import Recipe
from engine.hashing import FileHasher
from engine.quant import DeviceInfo, QuantPlan
from engine.sources import ModelSource
from engine.spec import DrawSpec
from engine.speed import NATIVE_ATTENTION, AttentionChoice

log = logging.getLogger(__name__)
WARMUP_FILE = "engine-warmup.json"  # in data_dir: the last start's compile and warm-up, for `doctor`


@dataclass(frozen=True)
class EngineInfo:
    """What the engine holds, for logs, `doctor` and the bot's /stats."""

    model_id: str
    family: str
    variant: str
    device: DeviceInfo
    plan: QuantPlan
    model_files: dict[str, str]
    attention: AttentionChoice = NATIVE_ATTENTION


def library_versions() -> dict[str, str]:
    names = ("fluxbot", "torch", "diffusers", "transformers", "peft")
    out = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "unknown"
    return out


def process_rss() -> int:
    """Resident memory of this process in bytes (Linux /proc; 0 where unknown)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


def model_hashes(source: ModelSource, hasher: FileHasher) -> dict[str, str]:
    if source.kind == "single_file":
        return {path.name: hasher.sha256(path) for path in source.files().values()}
    if source.kind in ("tiny", "diffusers"):
        root = Path(source.location)
        weights = sorted((root / "transformer").glob("*.safetensors"))
        return {f"transformer/{p.name}": hasher.sha256(p) for p in weights}
    return {}  # hub ids: the id (and the hub's own revision pinning) identify the weights


def make_recipe(
    info: EngineInfo,
    versions: dict[str, str],
    r: DrawSpec,
    seed: int,
    extra_files: dict[str, str] | None,
    cache: str,
    computed_steps: int,
    enhance_note: str | None = None,
    upscaler: tuple[dict[str, str], str] | None = None,
) -> Recipe:
    """Everything that made one image, for the PNG, the database and exact reruns."""
    return Recipe(
        model=info.model_id,
        family=info.family,
        variant=info.variant,
        model_files=info.model_files,
        quant=info.plan.transformer,
        text_encoder_quant=info.plan.text_encoder,
        device=info.device.device,
        dtype=str(info.plan.dtype).removeprefix("torch."),
        preset=r.preset,
        prompt=r.prompt,
        final_prompt=r.final_prompt,
        width=r.width,
        height=r.height,
        steps=r.steps,
        guidance=r.guidance,
        true_cfg=r.true_cfg,
        sampler=r.sampler,
        seed=seed,
        loras=r.loras,
        versions=versions,
        kind=r.origin if r.origin != "imagine" else r.mode,
        mode=r.mode,
        max_sequence_length=r.max_sequence_length,
        parent_job=r.parent_job,
        init_image_sha256=r.init_image,
        reference_sha256s=r.references,
        strength=r.strength,
        kontext_files=extra_files if r.mode == "edit" else None,
        fill_files=extra_files if r.mode == "inpaint" else None,
        mask_sha256=r.mask,
        cache=cache,
        computed_steps=computed_steps,
        enhanced_prompt=r.enhanced_prompt,
        enhance_note=enhance_note,
        upscaler_files=upscaler[0] if upscaler else None,
        upscaler=upscaler[1] if upscaler else None,
    )


def record_warmup(data_dir: Path, info: EngineInfo, seconds: float, graphs: int) -> None:
    """Written after the warm-up, so `fluxbot doctor` (which loads nothing) can show what it cost."""
    record = {
        "compile": info.plan.compile,
        "attention": info.attention.backend,
        "model": info.model_id,
        "warmup_s": round(seconds, 1),
        "graphs": graphs,
        "at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        (data_dir / WARMUP_FILE).write_text(json.dumps(record))
    except OSError as exc:  # a read-only data_dir costs the doctor a line, not the start
        log.warning("could not record the warm-up in %s: %s", data_dir, exc)


def last_warmup(data_dir: Path) -> dict[str, Any] | None:
    try:
        value = json.loads((data_dir / WARMUP_FILE).read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None
