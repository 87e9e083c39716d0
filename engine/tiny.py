"""The embedded default model: a tiny random-weight FLUX pipeline built from config, offline, in seconds.

Same component classes and latent layout as the real FLUX.1 (16-channel VAE with 8x downsampling,
2x2 patch packing, CLIP pooled + T5 sequence embeddings), so every code path runs on it; only the
widths are tiny. Weights are random with a fixed seed, so pictures are noise-like but reproducible.
`tiny-flux2` is the same for FLUX.2 klein (Qwen3 text encoder), `tiny-flux3` for FLUX.3 klein
(Qwen3-VL text encoder, step-distilled).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

TINY_SEED = 20240801
# A closed word list: the tokenizers are WordLevel models built in memory (no vocab download).
_WORDS = (  # noqa: SIM905
    "a an the of on in with and at by for from to under over near behind "
    "cat dog fox owl bird horse robot person woman man child dragon castle tree forest mountain river "
    "lake sea ocean beach city street house room garden field sky cloud sun moon star night day "
    "red orange yellow green blue purple pink black white gold silver "
    "photo painting portrait drawing sketch render illustration poster "
    "cinematic detailed sharp soft bright dark neon vintage futuristic cozy misty sunny rainy snowy"
).split()


def _word_level(words: tuple[str, ...]) -> Any:
    """A WordLevel tokenizers backend over `words` (ids in order), lower-cased, split on whitespace."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    vocab: dict[str, int] = {}
    for word in words:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return backend


def word_tokenizer(max_length: int, bos: str | None) -> Any:
    """A WordLevel tokenizer over a closed list of words, built in memory (no vocabulary download)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=_word_level(("<pad>", "<s>", "</s>", "<unk>", *_WORDS)),
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token=bos,
        eos_token="</s>",
        model_max_length=max_length,
    )


def build_tiny_flux1(guidance_embeds: bool = True) -> Any:
    """A FluxPipeline with random weights, a few MB, in eval mode (dropout off: runs are deterministic)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(TINY_SEED)
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=128,
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            projection_dim=32,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
            max_position_embeddings=77,
        )
    )
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=128,
            d_model=32,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=0,
            eos_token_id=2,
            decoder_start_token_id=0,
        )
    )
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[8, 8, 8, 8],
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=4,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=False,
        scaling_factor=0.3611,
        shift_factor=0.1159,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256,
        base_shift=0.5,
        max_image_seq_len=4096,
        max_shift=1.15,
        shift=3.0,
        use_dynamic_shifting=guidance_embeds,
    )
    for module in (clip, t5, transformer, vae):
        module.eval()
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=clip,
        tokenizer=word_tokenizer(77, "<s>"),
        text_encoder_2=t5,
        tokenizer_2=word_tokenizer(512, None),
        transformer=transformer,
    )


def tiny_flux2_vae() -> Any:
    """FLUX.2's 32-channel VAE (8x down, then 2x2 packing) at tiny widths; FLUX.3 shares it."""
    from diffusers import AutoencoderKLFlux2

    return AutoencoderKLFlux2(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=32,
        norm_num_groups=4,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=False,
    )


def build_tiny_flux2_klein() -> Any:
    """A Flux2KleinPipeline (Qwen3 text encoder, 32-channel VAE) with random weights, step-distilled."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(TINY_SEED)
    tokenizer = word_tokenizer(512, None)
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|> {% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
    )
    # 28 layers, like Qwen3-4B, so the pipeline's default hidden-state taps (9, 18, 27) exist.
    text_encoder = Qwen3ForCausalLM(
        Qwen3Config(
            intermediate_size=16,
            hidden_size=16,
            num_hidden_layers=28,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=8,
            vocab_size=128,
            max_position_embeddings=512,
        )
    )
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=128,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=48,
        timestep_guidance_channels=256,
        axes_dims_rope=[4, 4, 4, 4],
        guidance_embeds=False,
    )
    vae = tiny_flux2_vae()
    for module in (text_encoder, transformer, vae):
        module.eval()
    return Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        is_distilled=True,
    )


# Qwen's chat and vision special tokens: FLUX.3's text encoder reads a chat-templated prompt.
QWEN_SPECIAL = (
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<|endoftext|>",
)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)


def qwen_word_tokenizer() -> Any:
    """A WordLevel tokenizer with Qwen's special tokens (matched before the whitespace split)."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_word_level(
            ("<pad>", "<unk>", *QWEN_SPECIAL, *_WORDS, "user", "assistant", "system")
        ),
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="<|im_end|>",
        additional_special_tokens=list(QWEN_SPECIAL),
        model_max_length=8192,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_flux3_klein(distilled: bool = True) -> Any:
    """A FLUX.3 klein modular pipeline (Qwen3-VL text encoder with the 32 layers whose hidden states
    FLUX.3 stacks, FLUX.2's 32-channel VAE) with random weights; step-distilled (flow map) or base."""
    from diffusers import (
        Flux3AutoBlocks,
        Flux3DistilledAutoBlocks,
        Flux3Transformer2DModel,
    )
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    torch.manual_seed(TINY_SEED)
    tokenizer = qwen_word_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    hidden = 16
    text_encoder = Qwen3VLForConditionalGeneration(
        Qwen3VLConfig(
            text_config={
                "vocab_size": 256,
                "hidden_size": hidden,
                "intermediate_size": 16,
                "num_hidden_layers": 32,
                "num_attention_heads": 2,
                "num_key_value_heads": 2,
                "head_dim": 8,
                "max_position_embeddings": 8192,
                "rope_parameters": {
                    "rope_type": "default",
                    "rope_theta": 1e6,
                    "mrope_section": [2, 1, 1],
                    "mrope_interleaved": True,
                },
                "pad_token_id": 0,
            },
            vision_config={
                "depth": 1,
                "hidden_size": 16,
                "intermediate_size": 16,
                "num_heads": 2,
                "out_hidden_size": hidden,
                "patch_size": 16,
                "num_position_embeddings": 16,
                "deepstack_visual_indexes": [0],
            },
            image_token_id=ids("<|image_pad|>"),
            video_token_id=ids("<|video_pad|>"),
            vision_start_token_id=ids("<|vision_start|>"),
            vision_end_token_id=ids("<|vision_end|>"),
        )
    )
    transformer = Flux3Transformer2DModel(
        in_channels=128,
        cond_in_channels=128,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=8 * hidden,  # eight stacked hidden states
        timestep_channels=32,
        axes_dims_rope=(4, 4, 4, 4),
        flow_map=distilled,
    )
    vae = tiny_flux2_vae()  # FLUX.3 uses FLUX.2's VAE
    for module in (text_encoder, transformer, vae):
        module.eval()
    blocks = Flux3DistilledAutoBlocks() if distilled else Flux3AutoBlocks()
    blocks.sub_blocks.pop("prompt_upsampler")
    pipe = blocks.init_pipeline()
    pipe.update_components(text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer, vae=vae)
    return pipe


# The upsampler's chat template: its messages carry content as lists of parts.
PARTS_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }} "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'text' %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)


# The upsampler's processor template: image parts become Qwen's vision placeholder, which the
# processor widens to the image's patch tokens (edits: the references come before the text).
VISION_PARTS_CHAT_TEMPLATE = PARTS_CHAT_TEMPLATE.replace(
    "{% endif %}{% endfor %}{% endif %}<|im_end|>",
    "{% elif p['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>",
)


def build_tiny_prompt_upsampler() -> tuple[Any, Any]:
    """FLUX.3's prompt upsampler in miniature: a random Qwen3.5 (hybrid linear/full attention, as
    flux-3-image-klein-pup is, with a vision tower) and its Qwen3-VL processor (tokenizer, image and
    video processors), for the offline tests of the family's own enhancer, edits included."""
    from transformers import (
        Qwen2VLImageProcessor,
        Qwen3_5Config,
        Qwen3_5ForConditionalGeneration,
        Qwen3VLProcessor,
    )
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    tokenizer = qwen_word_tokenizer()
    tokenizer.chat_template = PARTS_CHAT_TEMPLATE
    ids = tokenizer.convert_tokens_to_ids
    torch.manual_seed(TINY_SEED + 1)
    model = Qwen3_5ForConditionalGeneration(
        Qwen3_5Config(
            text_config={
                "vocab_size": len(tokenizer),
                "hidden_size": 16,
                "intermediate_size": 16,
                "num_hidden_layers": 2,
                "layer_types": ["linear_attention", "full_attention"],
                "num_attention_heads": 2,
                "num_key_value_heads": 1,
                "head_dim": 8,
                "linear_conv_kernel_dim": 2,
                "linear_key_head_dim": 4,
                "linear_value_head_dim": 4,
                "linear_num_key_heads": 2,
                "linear_num_value_heads": 2,
                "max_position_embeddings": 4096,
                "rope_parameters": {
                    "rope_type": "default",
                    "rope_theta": 1e6,
                    "mrope_section": [1, 1, 0],
                    "mrope_interleaved": True,
                    "partial_rotary_factor": 0.5,
                },
                "pad_token_id": 0,
                "eos_token_id": ids("<|im_end|>"),
            },
            vision_config={
                "depth": 1,
                "hidden_size": 16,
                "intermediate_size": 16,
                "num_heads": 2,
                "out_hidden_size": 16,
                "patch_size": 16,
                "num_position_embeddings": 16,
            },
            image_token_id=ids("<|image_pad|>"),
            video_token_id=ids("<|video_pad|>"),
            vision_start_token_id=ids("<|vision_start|>"),
            vision_end_token_id=ids("<|vision_end|>"),
        )
    ).eval()
    model.generation_config.eos_token_id = ids("<|im_end|>")
    model.generation_config.pad_token_id = 0
    # Small pictures: the vision tower sees at most 64x64 (16 patches of 16, merged 2x2).
    pixels = {"shortest_edge": 32 * 32, "longest_edge": 64 * 64}
    processor = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(
            patch_size=16, merge_size=2, temporal_patch_size=2, size=pixels
        ),
        tokenizer=tokenizer,
        video_processor=Qwen3VLVideoProcessor(patch_size=16, merge_size=2, temporal_patch_size=2),
        chat_template=VISION_PARTS_CHAT_TEMPLATE,
    )
    return model, processor


def ensure_tiny_upsampler(directory: Path) -> Path:
    """The tiny prompt upsampler's folder (model and processor), built and saved there on first use
    (again where an older build saved no image processor)."""
    from engine.flux3 import has_processor

    if (directory / "config.json").is_file() and has_processor(directory):
        return directory
    model, processor = build_tiny_prompt_upsampler()
    shutil.rmtree(directory, ignore_errors=True)
    return save_atomically(directory, model.save_pretrained, processor.save_pretrained)


TINY_BUILDERS = {
    "flux1": build_tiny_flux1,
    "flux2": build_tiny_flux2_klein,
    "flux3": build_tiny_flux3_klein,
}
INDEX_FILES = ("model_index.json", "modular_model_index.json")  # FLUX.3 is a modular pipeline


def ensure_tiny_model(directory: Path, family: str = "flux1") -> Path:
    """The tiny model's diffusers folder, built and saved there on first use."""
    if any((directory / name).is_file() for name in INDEX_FILES):
        return directory
    log.info("building the tiny random-weight %s model in %s", family, directory)
    pipe = TINY_BUILDERS[family]()
    if family == "flux3":
        return save_atomically(
            directory, lambda tmp: pipe.save_pretrained(str(tmp), overwrite_modular_index=True)
        )
    return save_atomically(directory, pipe.save_pretrained)


def save_atomically(directory: Path, *writers: Callable[[Path], object]) -> Path:
    """`directory` written by `writers` into a side folder first, then renamed into place: a
    half-written model (a crash, a second process) is never mistaken for a whole one."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(directory.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    for write in writers:
        write(tmp)
    tmp.replace(directory)
    return directory
