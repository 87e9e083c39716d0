"""The engine's subtree of fluxbot's settings (the root lives in fluxbot.settings)."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, SecretStr

QuantSetting = Literal["auto", "bf16", "fp8dq", "fp8", "int8", "nf4", "gguf"]
TextEncoderQuantSetting = Literal["auto", "none", "fp8", "int8", "nf4"]


def _compile_mode(value: object) -> object:
    """The old boolean keeps working: true is "regional" (the run time of a full compile for a
    fraction of its compile time), false is "off"."""
    if isinstance(value, bool):
        return "regional" if value else "off"
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return "regional" if value.strip().lower() == "true" else "off"
    return value


# The random-weight models fluxbot builds itself, by name -> family ("tiny" is tiny-flux1).
TINY_MODELS = {"tiny-flux1": "flux1", "tiny-flux2": "flux2", "tiny-flux3": "flux3"}

CompileMode = Annotated[Literal["off", "regional", "full"], BeforeValidator(_compile_mode)]


class EngineSettings(BaseModel):
    """Where the model is, how it is quantized, and the data files that bound what users may ask."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        "tiny",
        description="'tiny' (random-weight FLUX.1 built offline; 'tiny-flux2' for FLUX.2 klein, "
        "'tiny-flux3' for FLUX.3 klein), "
        "a diffusers folder, a hub id, a single .safetensors/.gguf transformer file, "
        "or a Forge/ComfyUI models/ folder.",
    )
    checkpoint: str | None = Field(
        None, description="File name of the transformer inside a models/ folder when it holds several."
    )
    vae: Path | None = Field(None, description="ae.safetensors for single-file checkpoints.")
    clip_l: Path | None = Field(None, description="clip_l.safetensors for single-file checkpoints.")
    t5xxl: Path | None = Field(None, description="t5xxl_fp16/fp8 .safetensors for single-file checkpoints.")
    text_encoder: Path | None = Field(
        None,
        description="FLUX.2 klein single files: the Qwen3 text encoder (qwen_3_4b.safetensors, qwen_3_8b).",
    )
    tokenizers: str | None = Field(
        None,
        description="Folder (or hub id) holding tokenizer/ and tokenizer_2/ for single-file checkpoints; "
        "default: looked for beside the model, then black-forest-labs/FLUX.1-dev.",
    )
    configs: Path | None = Field(
        None,
        description="Diffusers-layout config folder (transformer/, vae/, text_encoder*/, scheduler/) for "
        "single-file checkpoints of a non-standard shape; default: the bundled FLUX.1 configs.",
    )
    variant: Literal["auto", "dev", "schnell", "klein", "klein-base"] = Field(
        "auto",
        description="auto: from the file (FLUX.1: a guidance embedder means dev; FLUX.2 klein: 'base' in "
        "its file name means the undistilled base model)",
    )
    quant: QuantSetting = "auto"
    text_encoder_quant: TextEncoderQuantSetting = "auto"
    device: str = Field("auto", description="'auto', 'cpu', 'cuda' or 'cuda:N'.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    compile: CompileMode = Field(
        "off",
        description='"regional" (each repeated block: diffusers\' compile_repeated_blocks), "full" (the '
        'whole transformer) or "off"; compiled and warmed up at start, before any job (true = "regional")',
    )
    attention: str = Field(
        "auto",
        description='"auto" (FlashAttention 3 on Hopper when installed, else PyTorch SDPA), "native", or a '
        "diffusers attention backend name (flash, _flash_3, sage, xformers, flex, ...)",
    )
    cpu_offload: Literal["auto", "none", "model", "sequential"] = "auto"
    vae_tiling: Literal["auto", "on", "off"] = "auto"
    presets_file: Path | None = Field(
        None, description="The operator's presets; default: the shipped ones (the repository's config/)"
    )
    loras_file: Path | None = Field(
        None, description="The operator's LoRA whitelist; default: the shipped example (no LoRAs enabled)"
    )
    lora_dir: Path | None = Field(
        None, description="Folder of the whitelisted LoRA files; default: models/Lora or <data_dir>/loras."
    )
    max_resident_loras: int = Field(4, ge=1, le=64)
    max_loras_per_job: int = Field(3, ge=0, le=8)
    embed_cache_size: int = Field(64, ge=0, le=10_000)
    max_batch_size: int = Field(4, ge=1, le=16)
    memory_cap_gb: float | None = Field(
        None, gt=0, description="CPU: fail a job (not the process) when RSS passes this many GB"
    )
    kontext: str | None = Field(
        None,
        description="FLUX.1 Kontext transformer for /edit: a diffusers folder, a single .safetensors/.gguf "
        "file, or 'tiny' (random, offline); unset: no edits",
    )
    fill: str | None = Field(
        None,
        description="FLUX.1 Fill transformer for /inpaint: a diffusers folder, a single .safetensors/.gguf "
        "file (flux1-fill-dev), or 'tiny' (random, offline); unset: no inpainting",
    )
    extra_models: Literal["auto", "resident", "swap", "off"] = Field(
        "auto",
        description="Kontext and Fill beside the resident model: 'resident' (both on the GPU), 'swap' (the "
        "idle one waits in CPU RAM and moves to the GPU when a job needs it), 'off' (not loaded: no /edit "
        "on FLUX.1, no /inpaint); auto: resident where free VRAM holds them, else swap",
    )
    segmenter: str | None = Field(
        None,
        description='CLIPSeg for /inpaint where:"the sky" (masks from words): a folder of '
        "CIDAS/clipseg-rd64-refined, or 'tiny' (random, offline); runs on the bot's CPU",
    )
    upscaler: str | None = Field(
        None,
        description="Upscaler model for Upscale (read by spandrel: Real-ESRGAN, 4x-UltraSharp, SwinIR, HAT, "
        "DAT, ...): a .pth/.safetensors file, its name in a Forge models/ESRGAN or ComfyUI "
        "models/upscale_models folder, or 'tiny' (random, offline); unset: Upscale resizes with Lanczos",
    )
    upscaler_tile: int = Field(
        512, ge=64, le=4096, description="Input pixels per tile side when upscaling: less is less memory"
    )
    preview: str = Field(
        "latent",
        description='live previews: "latent" (a fixed latent-to-RGB projection, microseconds), '
        '"taef1:<folder>" (madebyollin/taef1, sharper) or "off"',
    )
    prompt_enhancer: str | None = Field(
        None,
        description="OpenAI-compatible endpoint that expands prompts for /imagine enhance:true "
        '(Ollama: "http://127.0.0.1:11434/v1"; LM Studio, vLLM, llama.cpp server); unset: no enhancer',
    )
    prompt_upsampler: str | None = Field(
        None,
        description="FLUX.3 only: its own prompt upsampler for enhance:true, a folder of "
        "black-forest-labs/flux-3-image-klein-pup (or 'tiny', random, offline); preferred over the endpoint",
    )
    prompt_enhancer_model: str = Field(
        "llama3.2", min_length=1, max_length=200, description="The model name the endpoint serves"
    )
    prompt_enhancer_key: SecretStr | None = Field(None, description="API key, if the endpoint wants one")
    prompt_enhancer_timeout_s: float = Field(
        30.0, gt=0, le=600, description="How long a job waits for an enhancement before drawing as written"
    )
    vae_tiling_above_megapixels: float = Field(
        1.6, gt=0, description="Decode images larger than this in VAE tiles (upscales): less peak memory"
    )

    @property
    def kontext_in_use(self) -> str | None:
        """engine.kontext, unless extra_models is off."""
        return None if self.extra_models == "off" else self.kontext

    @property
    def fill_in_use(self) -> str | None:
        """engine.fill, unless extra_models is off."""
        return None if self.extra_models == "off" else self.fill

    @property
    def presets_path(self) -> Path:
        return self.presets_file or shipped("presets.toml")

    @property
    def loras_path(self) -> Path:
        return self.loras_file or shipped("loras.toml")


def shipped(name: str) -> Path:
    """A default file shipped inside the package: the repository's config/ folder, installed as the
    package `engine.defaults` (pyproject's package-dir), so a wheel finds it from any folder."""
    return Path(str(files("engine.defaults") / name))
