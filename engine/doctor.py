"""`fluxbot doctor`: what this host has, what `auto` would pick, and what is wrong with the model files."""

from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from engine.checkpoints import describe_layout, inspect_checkpoint
from engine.errors import EngineError, LoraError
from engine.flux3 import auto_for, plan_for
from engine.hashing import FileHasher
from engine.info import last_warmup
from engine.lora_layout import lora_layout
from engine.presets import Preset, load_presets
from engine.quant import DeviceInfo, auto_tier, plan_quant, probe_device
from engine.settings import EngineSettings
from engine.sources import ModelSource, folder_model, locate_model
from engine.speed import choose_attention
from engine.whitelist import LoraFiles, default_lora_dir, load_whitelist

Status = Literal["ok", "warn", "fail"]


@dataclass(frozen=True)
class Check:
    status: Status
    label: str
    detail: str


@dataclass
class DoctorReport:
    checks: list[Check] = field(default_factory=list)

    def add(self, status: Status, label: str, detail: str) -> None:
        self.checks.append(Check(status, label, detail))

    @property
    def ok(self) -> bool:
        return all(c.status != "fail" for c in self.checks)

    def render(self) -> str:
        marks = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL"}
        width = max(len(c.label) for c in self.checks)
        return "\n".join(f"[{marks[c.status]}] {c.label:<{width}}  {c.detail}" for c in self.checks)


def run_doctor(settings: EngineSettings, data_dir: Path) -> DoctorReport:
    """Every check runs even when an earlier one fails, so one run shows every problem."""
    report = DoctorReport()
    cuda = torch.version.cuda or "none (CPU build)"
    report.add("ok", "torch", f"{torch.__version__}, CUDA {cuda}, GPU visible: {torch.cuda.is_available()}")
    device = _device(report, settings)
    source = _model(report, settings, data_dir)
    if device is not None:
        _quant(report, settings, device, source)
        _speed(report, settings, device, data_dir)
    presets = _presets(report, settings)
    _loras(report, settings, data_dir, source, presets)
    _images(report, settings)
    _upscaler(report, settings, data_dir, source)
    _enhancer(report, settings)
    _packages(report)
    return report


def _enhancer(report: DoctorReport, settings: EngineSettings) -> None:
    """The prompt enhancer as configured (not called: doctor asks no one anything). FLUX.3's own
    upsampler, where set, is named first: it serves enhance:true on a FLUX.3 host."""
    if settings.prompt_upsampler is not None:
        where = settings.prompt_upsampler
        if where != "tiny" and not (Path(where) / "config.json").is_file():
            report.add("fail", "upsampler", f"engine.prompt_upsampler: no model folder at {where}")
        else:
            report.add(
                "ok", "upsampler", f"FLUX.3's own prompt upsampler: {where} (greedy, BFL's system prompt)"
            )
    if not settings.prompt_enhancer:
        report.add("ok", "enhancer", "off (engine.prompt_enhancer unset: enhance:true is refused)")
        return
    try:
        import openai  # noqa: F401
    except ImportError:
        report.add("fail", "enhancer", "engine.prompt_enhancer needs the openai package: pip install openai")
        return
    report.add(
        "ok",
        "enhancer",
        f"{settings.prompt_enhancer_model} at {settings.prompt_enhancer} "
        f"(timeout {settings.prompt_enhancer_timeout_s:g} s; a failure draws the prompt as written)",
    )


def _upscaler(
    report: DoctorReport, settings: EngineSettings, data_dir: Path, source: ModelSource | None
) -> None:
    """The upscaler model: found, and read by spandrel on the CPU (its architecture and scale)."""
    where = settings.upscaler
    if where is None:
        report.add("ok", "upscaler", "off: Upscale resizes with Lanczos, then redraws (engine.upscaler)")
        return
    if where == "tiny":
        report.add("ok", "upscaler", "the tiny random Real-ESRGAN-shaped x4 (offline tests)")
        return
    from engine.upscaler import Upscaler, locate_upscaler

    try:
        file = locate_upscaler(where, source.models_dir if source else None, data_dir)
        upscaler = Upscaler.load(file, "cpu", FileHasher(None))
    except EngineError as exc:
        report.add("fail", "upscaler", str(exc))
        return
    report.add("ok", "upscaler", f"{file.name}: {upscaler.description}, tiles of {settings.upscaler_tile} px")


def _images(report: DoctorReport, settings: EngineSettings) -> None:
    """Kontext edits, Fill inpainting and previews: what is configured, and whether its files are
    there (not loaded)."""
    for name, where, command in (("kontext", settings.kontext, "/edit"), ("fill", settings.fill, "/inpaint")):
        if where is None:
            report.add(
                "ok",
                name,
                f'off: {command} says how to enable it (engine.{name} = "<folder, .safetensors or .gguf>")',
            )
        elif where == "tiny":
            report.add("ok", name, f"the tiny random {name} transformer (offline tests)")
        else:
            path = Path(where).expanduser()
            if not path.exists():
                report.add("fail", name, f"engine.{name}: {path} does not exist")
            elif path.is_dir():
                report.add("ok", name, f"diffusers folder {path}")
            else:
                try:
                    report.add("ok", name, f"{path.name}: {describe_layout(path)}")
                except EngineError as exc:
                    report.add("fail", name, str(exc))
    if settings.kontext or settings.fill:
        report.add(
            "ok", "extra models", f"{settings.extra_models} (Kontext and Fill beside the resident model)"
        )
    preview = settings.preview
    if preview.startswith("taef1:") and not Path(preview.removeprefix("taef1:")).expanduser().is_dir():
        report.add("fail", "preview", f"engine.preview: {preview.removeprefix('taef1:')} is not a folder")
    else:
        report.add(
            "ok", "preview", {"latent": "latent-to-RGB projection", "off": "off"}.get(preview, preview)
        )


def _device(report: DoctorReport, settings: EngineSettings) -> DeviceInfo | None:
    try:
        info = probe_device(settings.device)
    except EngineError as exc:
        report.add("fail", "device", str(exc))
        return None
    if info.is_cuda:
        report.add(
            "ok",
            "gpu",
            f"{info.name} (sm_{''.join(map(str, info.compute_capability or ()))}), "
            f"{info.free_gb:.1f} GB free of {info.total_gb:.1f} GB",
        )
    else:
        report.add("warn" if torch.cuda.is_available() else "ok", "gpu", "none in use: running on CPU")
    *_, reason = auto_tier(info)
    report.add("ok", "auto tier", reason)
    return info


def _model(report: DoctorReport, settings: EngineSettings, data_dir: Path) -> ModelSource | None:
    try:
        source = locate_model(settings, data_dir, build=False)  # the doctor changes nothing on disk
    except EngineError as exc:
        report.add("fail", "model", str(exc))
        return None
    report.add("ok", "model", f"{source.kind}: {source.location}")
    if source.kind in ("tiny", "diffusers") and (found := folder_model(Path(source.location))) is not None:
        names = {"flux1": "FLUX.1", "flux2": "FLUX.2", "flux3": "FLUX.3"}
        variant = f" {found.variant}" if found.variant else ""
        report.add("ok", "family", f"{names[found.family]}{variant} ({found.pipeline})")
    for note in source.notes:
        report.add("ok", "model file", note)
    if source.kind == "single_file":
        try:
            facts = inspect_checkpoint(source, settings)
            inside = [role for role, yes in facts.embedded.items() if yes]
            family = "FLUX.2" if source.family == "flux2" else "FLUX.1"
            detail = f"{family} {facts.variant}" + (f", carries {', '.join(inside)}" if inside else "")
            report.add("ok", "checkpoint", detail)
            assert source.transformer is not None
            report.add("ok", "layout", describe_layout(source.transformer))
        except EngineError as exc:
            report.add("fail", "checkpoint", str(exc))
    return source


def _quant(
    report: DoctorReport, settings: EngineSettings, device: DeviceInfo, source: ModelSource | None
) -> None:
    try:
        auto = auto_for(source, device, settings) if source is not None else None
        plan = plan_quant(settings, device, source is not None and source.is_gguf, auto)
        if source is not None:
            plan = plan_for(plan, settings, source)
    except EngineError as exc:
        report.add("fail", "quant", str(exc))
        return
    report.add("ok", "quant", f"{plan.describe()}: {plan.reason}")


def _speed(report: DoctorReport, settings: EngineSettings, device: DeviceInfo, data_dir: Path) -> None:
    """Attention backend and compilation: what the engine will use, and what the last warm-up cost."""
    try:
        choice = choose_attention(settings.attention, device)
        report.add("ok", "attention", f"{choice.backend}: {choice.why}")
    except EngineError as exc:
        report.add("fail", "attention", str(exc))
    if settings.compile == "off":
        report.add("ok", "compile", 'off (engine.compile = "regional" compiles at start, then warms up)')
        return
    last = last_warmup(data_dir)
    seen = (
        f"; last start ({last.get('at')}): {last.get('warmup_s')} s, {last.get('graphs')} graphs"
        if last is not None and last.get("compile") == settings.compile
        else "; not measured here yet"
    )
    report.add("ok", "compile", f"{settings.compile}: compiled and warmed up at start, before any job{seen}")


def _presets(report: DoctorReport, settings: EngineSettings) -> dict[str, Preset]:
    try:
        presets = load_presets(settings.presets_path)
    except EngineError as exc:
        report.add("fail", "presets", str(exc))
        return {}
    cached = [f"{p.name} ({p.cache})" for p in presets.values() if p.cache.on]
    steps = f"; step caches: {', '.join(cached)}" if cached else ""
    report.add("ok", "presets", f"{settings.presets_path}: {', '.join(presets)}{steps}")
    return presets


def _loras(
    report: DoctorReport,
    settings: EngineSettings,
    data_dir: Path,
    source: ModelSource | None,
    presets: dict[str, Preset],
) -> None:
    lora_dir = settings.lora_dir or default_lora_dir(source.models_dir if source else None, data_dir)
    try:
        entries = load_whitelist(settings.loras_path)
    except EngineError as exc:
        report.add("fail", "loras", str(exc))
        return
    report.add("ok", "loras", f"{len(entries)} whitelisted in {settings.loras_path}, folder {lora_dir}")
    for check in LoraFiles(lora_dir, FileHasher(data_dir / "hashes.json")).check(entries):
        if check.ok:
            readable, layout = _layout_of(check.path)
            report.add(
                "ok" if readable else "fail",
                f"lora {check.name}",
                f"{check.path.name} sha256 {check.sha256}, {layout}",
            )
        else:
            report.add("fail", f"lora {check.name}", check.problem or "unusable")
    for preset in presets.values():
        for pl in preset.loras:
            if pl.name not in entries:
                report.add(
                    "warn",
                    f"preset {preset.name}",
                    f"needs LoRA {pl.name!r}, not whitelisted: preset unusable",
                )


def _packages(report: DoctorReport) -> None:
    for name, purpose in (
        ("torchao", "fp8/int8"),
        ("optimum-quanto", "int8 (alt)"),
        ("bitsandbytes", "nf4"),
        ("gguf", "GGUF files"),
    ):
        module = name.replace("optimum-quanto", "optimum.quanto")
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        version = importlib.metadata.version(name) if found else None
        report.add(
            "ok" if found else "warn",
            f"pkg {name}",
            f"{version} ({purpose})" if found else f"missing ({purpose})",
        )


def _layout_of(path: Path) -> tuple[bool, str]:
    """The LoRA's layout from its header alone (the tensors stay on disk)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return True, f"{lora_layout(handle.keys())} layout"
    except LoraError as exc:
        return False, str(exc)
    except Exception as exc:  # safetensors' own error types for damaged files
        return False, f"not a readable .safetensors file ({exc.__class__.__name__})"
