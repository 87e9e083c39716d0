"""FLUX.3 klein, which diffusers 0.42 ships only as a modular pipeline (Flux3ModularPipeline and the
step-distilled, flow-map Flux3DistilledModularPipeline), driven as diffusers documents it.

What differs from the FLUX.1/FLUX.2 pipelines, and how the engine keeps its one contract:
- no `callback_on_step_end`: a block appended to each denoise loop calls the engine's step callback
  after every scheduler step (progress, previews, cancel by raising, the memory cap);
- the prompt upsampler step (a Qwen3.5 fine-tune) is taken out: prompts are enhanced by the engine's
  enhancer, and stored, so reruns do not ask again;
- the text-encoder step is taken out: the engine encodes prompts itself with diffusers' own
  `Flux3TextEncoderStep._get_qwen3_vl_prompt_embeds` (so its embedding cache works), and hands the
  pipeline `prompt_embeds`;
- the `tokenizer` component is a Qwen3-VL processor in the real checkpoint; the text step uses only
  its chat template and its tokenizer, so a plain tokenizer is wrapped to offer exactly that (the
  upsampler, which reads an edit's pictures, loads its whole processor).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from engine.errors import ModelLoadError, QuantizationError
from engine.quant import AutoTier, DeviceInfo, QuantPlan, sized_tier
from engine.settings import EngineSettings
from engine.sources import FLUX3_PIPELINES, ModelSource, folder_model

log = logging.getLogger(__name__)

HIDDEN_STATE_LAYERS = (4, 8, 12, 16, 20, 24, 28, 32)  # what FLUX.3 stacks into its prompt embedding
PAD_MULTIPLE = 80  # the prompt window rounds up to this; the transformer attends to the padding
StepHook = Callable[[Any, int, Any, torch.Tensor], None]  # (components, step index, timestep, latents)


class QwenChatProcessor:
    """What FLUX.3's text step uses of its processor: the chat template and the tokenizer."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def apply_chat_template(self, *args: Any, **kwargs: Any) -> Any:
        return self.tokenizer.apply_chat_template(*args, **kwargs)

    def decode(self, *args: Any, **kwargs: Any) -> Any:
        return self.tokenizer.decode(*args, **kwargs)


def flux3_class(location: Path) -> str | None:
    """The FLUX.3 pipeline class a folder's modular index names, or None when it is no FLUX.3 folder."""
    found = folder_model(location)
    return found.pipeline if found is not None and found.family == "flux3" else None


def _step_end_block() -> Any:
    from diffusers.modular_pipelines import InputParam, ModularPipelineBlocks

    class StepEnd(ModularPipelineBlocks):  # type: ignore[misc]
        """After each scheduler step: the engine's callback (raising stops the run; nothing decodes)."""

        model_name = "flux3"

        @property
        def description(self) -> str:
            return "Calls step_callback(components, i, t, latents) after each scheduler step."

        @property
        def inputs(self) -> list[Any]:
            return [InputParam("step_callback", required=False, description="the engine's step callback")]

        @property
        def intermediate_outputs(self) -> list[Any]:
            return []

        def __call__(self, components: Any, block_state: Any, i: int, t: torch.Tensor) -> Any:
            if block_state.step_callback is not None:
                block_state.step_callback(components, i, t, block_state.latents)
            return components, block_state

    return StepEnd()


def load_flux3(location: Path, plan: QuantPlan) -> tuple[Flux3Model, str]:
    """The FLUX.3 pipeline of a diffusers (modular) folder, and its variant (klein, klein-base); nf4
    tiers are quantized while loading, the torchao ones after (quantize_flux3)."""
    from diffusers import Flux3AutoBlocks, Flux3DistilledAutoBlocks
    from diffusers.modular_pipelines.flux3.encoders import Flux3TextEncoderStep
    from transformers import AutoTokenizer

    from engine.quant import text_encoder_quant_config, transformer_quant_config

    name = flux3_class(location)
    if name is None:
        raise ModelLoadError(f"{location} is not a FLUX.3 modular pipeline folder")
    variant = FLUX3_PIPELINES[name]  # the folder's index names one of them (flux3_class)
    blocks = Flux3DistilledAutoBlocks() if variant == "klein" else Flux3AutoBlocks()
    for step in ("prompt_upsampler", "text_encoder"):
        if step in blocks.sub_blocks:
            blocks.sub_blocks.pop(step)
    for workflow in ("image_conditioned", "text2image"):
        loop = blocks.sub_blocks["denoise"].sub_blocks[workflow].sub_blocks["denoise"]
        loop.sub_blocks.insert("step_end", _step_end_block(), len(loop.sub_blocks))
        loop.set_progress_bar_config(disable=True)  # the pipeline's own setting does not reach it
    # The blocks log an error with a traceback at every nesting level when a step raises, which a
    # cancelled job does on purpose: the engine logs what actually failed.
    logging.getLogger("diffusers.modular_pipelines.modular_pipeline").setLevel(logging.CRITICAL)
    try:
        dtype = plan.dtype
        pipe = blocks.init_pipeline(str(location))
        if plan.transformer == "nf4":
            nf4 = transformer_quant_config("nf4", dtype)
            # FLUX.3's linears have no biases: with every one packed in uint8, diffusers would take
            # uint8 for the model's dtype and cast the latents to it. The small embedders and the
            # output projection stay in `dtype` (what nf4 FLUX checkpoints keep unquantized too).
            nf4.llm_int8_skip_modules = list(NF4_KEPT)
            pipe.load_components(dtype=dtype, quantization_config={"transformer": nf4})
        else:
            pipe.load_components(dtype=dtype)
        # The text encoder is the text step's component, loaded by that step's own spec; its
        # processor's tokenizer and chat template are all the step uses (see the module's docstring).
        encoder = Flux3TextEncoderStep().init_pipeline(str(location))
        if plan.text_encoder == "nf4":
            nf4 = text_encoder_quant_config("nf4", dtype)
            encoder.load_components(names=["text_encoder"], dtype=dtype, quantization_config=nf4)
        else:
            encoder.load_components(names=["text_encoder"], dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(str(location), subfolder="tokenizer")
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"cannot load {location}: {str(exc).splitlines()[0][:300]}") from exc
    pipe.set_progress_bar_config(disable=True)
    return Flux3Model(pipe, encoder.text_encoder.eval(), QwenChatProcessor(tokenizer)), variant


class Flux3Model:
    """The FLUX.3 modular pipeline with its text encoder beside it: the pipeline takes prompt
    embeddings, which the engine makes (and caches). Everything else is the pipeline's own."""

    def __init__(self, pipe: Any, text_encoder: Any, tokenizer: QwenChatProcessor) -> None:
        self.pipe = pipe
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self._offload_hooks: list[Any] = []

    def __call__(self, **kwargs: Any) -> Any:
        try:
            return self.pipe(**kwargs)
        finally:
            self.maybe_free_model_hooks()

    @property
    def _models(self) -> list[Any]:
        """What runs, in the order it runs: the text encoder, the transformer, the VAE."""
        return [self.text_encoder, self.pipe.transformer, self.pipe.vae]

    def enable_model_cpu_offload(self, device: str) -> None:
        """Each model on `device` only while it runs, as DiffusionPipeline's model offload does it
        (accelerate's hooks, chained: the next model's forward sends the last one back to the CPU).
        The modular pipeline's own offload goes through a ComponentsManager, which sizes its moves
        from free CUDA memory and so could not run (or be tested) anywhere else."""
        from accelerate import cpu_offload_with_hook

        hook = None
        for model in self._models:
            model.to("cpu")
            _, hook = cpu_offload_with_hook(model, device, prev_module_hook=hook)
            self._offload_hooks.append(hook)

    def maybe_free_model_hooks(self) -> None:
        """After a run every offloaded model is back on the CPU (the chain moves the last one only
        when the first runs again)."""
        for hook in self._offload_hooks:
            hook.offload()

    def __getattr__(self, name: str) -> Any:  # transformer, vae, scheduler, LoRA methods, guider...
        return getattr(self.pipe, name)

    def to(self, device: str) -> Flux3Model:
        self.pipe.to(device)
        self.text_encoder.to(device)
        return self


def encode_prompt(pipe: Any, prompt: str, max_sequence_length: int) -> torch.Tensor:
    """FLUX.3's prompt embedding, by diffusers' own text step (chat template, the window rounded up to
    80 tokens, eight hidden states stacked)."""
    from diffusers.modular_pipelines.flux3.encoders import Flux3TextEncoderStep

    embeds: torch.Tensor = Flux3TextEncoderStep._get_qwen3_vl_prompt_embeds(
        pipe.text_encoder,
        pipe.tokenizer,
        prompt,
        execution_device(pipe.text_encoder),
        max_sequence_length=max(max_sequence_length, PAD_MULTIPLE),
        pad_multiple=PAD_MULTIPLE,
        hidden_states_layers=HIDDEN_STATE_LAYERS,
    )
    return embeds


def execution_device(model: Any) -> torch.device:
    """Where `model` computes: its offload hook's device when offloaded (its weights wait on the CPU
    between runs), else where its weights are."""
    device = getattr(getattr(model, "_hf_hook", None), "execution_device", None)
    return torch.device(device) if device is not None else model.device


def set_guidance(pipe: Any, guidance: float | None) -> None:
    """The base model's classifier-free guidance (its guider component); the distilled one has none."""
    if "guider" not in pipe.component_names or guidance is None:
        return
    from diffusers import ClassifierFreeGuidance

    if getattr(pipe.guider, "guidance_scale", None) != guidance:
        pipe.update_components(guider=ClassifierFreeGuidance(guidance_scale=guidance))


# What FLUX.3 can be held as: torchao's 8-bit tiers, applied to the loaded modules (what diffusers'
# TorchAoConfig does after loading), and bitsandbytes nf4, given to the modular loader's
# from_pretrained per component (bitsandbytes quantizes while loading); model CPU offload by
# accelerate's hooks (Flux3Model.enable_model_cpu_offload). Sequential offload is not wired: it could
# not be tested here (accelerate's layer offload runs on CUDA only, FLUX.1's too).
FLUX3_TRANSFORMER_TIERS = ("bf16", "int8", "fp8", "fp8dq", "nf4")
NF4_KEPT = ("timestep_embedder", "target_timestep_embedder", "x_embedders", "context_embedder", "proj_out")
FLUX3_TEXT_ENCODER_TIERS = ("none", "int8", "fp8", "nf4")


def flux3_plan(plan: QuantPlan, settings: EngineSettings) -> QuantPlan:
    """The plan for FLUX.3: what the operator set that FLUX.3 lacks (a GGUF tier) is refused, never
    silently dropped; `auto`'s plans it takes as they are."""
    refused = []
    if settings.quant not in ("auto", *FLUX3_TRANSFORMER_TIERS):
        refused.append(f"quant = {settings.quant!r}")
    if settings.text_encoder_quant not in ("auto", *FLUX3_TEXT_ENCODER_TIERS):
        refused.append(f"text_encoder_quant = {settings.text_encoder_quant!r}")
    if settings.cpu_offload == "sequential":
        refused.append("cpu_offload = 'sequential'")
    if refused:
        raise QuantizationError(
            f"FLUX.3 does not take {', '.join(refused)} yet: its tiers are bf16, int8, fp8, fp8dq and "
            "nf4 (text encoder none, int8, fp8, nf4), with model CPU offload or none"
        )
    return plan


def weight_params(folder: Path) -> int:
    """The parameters in a folder's safetensors files, from their headers (nothing is loaded)."""
    from safetensors import safe_open

    total = 0
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as opened:
            for name in opened.keys():  # noqa: SIM118 (safe_open is not a mapping)
                total += math.prod(opened.get_slice(name).get_shape())
    return total


def auto_for(source: ModelSource, device: DeviceInfo, settings: EngineSettings) -> AutoTier | None:
    """`auto` for a FLUX.3 folder, sized by its transformer's and text encoder's own parameter
    counts (klein comes in several sizes, beside a Qwen3-VL encoder of its own size), with room
    for its prompt upsampler, which stays on the device in bf16; None for other models, which keep
    the hand-picked table."""
    folder = _flux3_folder(source)
    if folder is None:
        return None
    reserved_gb = 0.0
    if settings.prompt_upsampler not in (None, "tiny") and Path(settings.prompt_upsampler).is_dir():
        reserved_gb = weight_params(Path(settings.prompt_upsampler)) * 2 / 1024**3
    return sized_tier(
        device, weight_params(folder / "transformer"), weight_params(folder / "text_encoder"), reserved_gb
    )


def plan_for(plan: QuantPlan, settings: EngineSettings, source: ModelSource) -> QuantPlan:
    """`plan` as the located model can be held: flux3_plan for a FLUX.3 folder, else unchanged."""
    return flux3_plan(plan, settings) if _flux3_folder(source) is not None else plan


def _flux3_folder(source: ModelSource) -> Path | None:
    """The located model's folder when it is a FLUX.3 (modular) one."""
    if source.kind in ("tiny", "diffusers") and flux3_class(Path(source.location)) is not None:
        return Path(source.location)
    return None


def quantize_flux3(model: Flux3Model, plan: QuantPlan) -> None:
    """The plan's torchao tiers applied to the loaded transformer and text encoder (nf4 was
    quantized while loading)."""
    from engine.quant import text_encoder_quant_config, transformer_quant_config

    torchao = {"int8", "fp8", "fp8dq"}
    if plan.transformer in torchao or plan.text_encoder in torchao:
        from torchao.quantization import quantize_
    if plan.transformer in torchao:
        quantize_(model.transformer, transformer_quant_config(plan.transformer, plan.dtype).quant_type)
    if plan.text_encoder in torchao:
        quantize_(model.text_encoder, text_encoder_quant_config(plan.text_encoder, plan.dtype).quant_type)


def has_processor(folder: Path) -> bool:
    """The folder holds an image processor's config beside its tokenizer (transformers 5 writes
    processor_config.json, older releases and hub checkpoints preprocessor_config.json)."""
    return any((folder / name).is_file() for name in ("processor_config.json", "preprocessor_config.json"))


class Flux3Upsampler:
    """FLUX.3's own prompt upsampler (black-forest-labs/flux-3-image-klein-pup, a Qwen3.5 fine-tune)
    as the engine's enhancer: diffusers' `upsample_prompt`, with BFL's system prompts and greedy
    decoding, what the pipeline's upsampler step runs. Text-to-image prompts, and edit instructions
    with their reference images (prepared as diffusers prepares them) where the folder has the
    Qwen3-VL processor; a folder with only a tokenizer expands text-to-image prompts."""

    def __init__(self, model: Any, processor: Any, location: str, max_new_tokens: int = 512) -> None:
        self.model = model
        self.processor = processor
        self.location = location
        self.max_new_tokens = max_new_tokens
        self.sees_images = getattr(processor, "image_processor", None) is not None

    @property
    def name(self) -> str:
        return f"FLUX.3's prompt upsampler ({self.location})"

    @classmethod
    def load(cls, location: Path, device: str, dtype: torch.dtype) -> Flux3Upsampler:
        from transformers import AutoProcessor, AutoTokenizer, Qwen3_5ForConditionalGeneration

        try:
            model = Qwen3_5ForConditionalGeneration.from_pretrained(str(location), dtype=dtype).to(device)
            if has_processor(location):
                processor: Any = AutoProcessor.from_pretrained(str(location))
            else:
                processor = QwenChatProcessor(AutoTokenizer.from_pretrained(str(location)))
        except (OSError, ValueError) as exc:
            raise ModelLoadError(
                f"engine.prompt_upsampler: cannot load {location}: {str(exc).splitlines()[0][:200]}"
            ) from exc
        return cls(model.eval(), processor, location.name)

    def enhance(self, prompt: str, images: Sequence[Image.Image] = ()) -> str:
        from diffusers.modular_pipelines.flux3.prompt_upsampler import prepare_references, upsample_prompt

        from engine.enhancer import EnhancerError, tidy

        if images and not self.sees_images:
            raise EnhancerError("this prompt upsampler has no image processor, so it cannot read an edit")
        try:
            references = prepare_references(list(images)) if images else None
            with torch.inference_mode():
                caption = upsample_prompt(
                    self.model, self.processor, prompt, images=references, max_new_tokens=self.max_new_tokens
                )
        except (RuntimeError, ValueError) as exc:  # an empty caption is a RuntimeError in diffusers
            raise EnhancerError("the prompt upsampler failed: {problem}", problem=type(exc).__name__) from exc
        return tidy(caption)
