"""Masks from words ("the sky", "the red car"): CLIPSeg (transformers' CLIPSegForImageSegmentation,
CIDAS/clipseg-rd64-refined) scores each pixel against the words; the pixels above a threshold, grown
and feathered so Fill redraws a little around them, are the mask (white: repaint).

`engine.segmenter` = a folder of CLIPSeg (model, tokenizer, image processor) or "tiny" (random, built
from config, offline). It runs on the CPU in the process that stores the job (the bot), before
anything is stored: the mask is an input image like an uploaded one, so reruns use the same pixels.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageFilter

from engine.errors import ModelLoadError, RequestError

log = logging.getLogger(__name__)
THRESHOLD = 0.4  # of CLIPSeg's sigmoid score: what counts as "the sky"
GROW = 0.02  # the mask grows by this share of the picture's shorter side...
FEATHER = 0.01  # ...then its edge is blurred over this share: the seam is drawn, not cut
TINY_SEGMENTER_SEED = 20251205


@dataclass
class Segmenter:
    model: Any  # CLIPSegForImageSegmentation
    tokenizer: Any
    image_processor: Any
    name: str

    @classmethod
    def load(cls, where: str, data_dir: Path) -> Segmenter:
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPSegForImageSegmentation

        folder = (
            ensure_tiny_segmenter(data_dir / "models" / "tiny-clipseg") if where == "tiny" else Path(where)
        )
        try:
            model = CLIPSegForImageSegmentation.from_pretrained(str(folder)).eval()
            tokenizer = AutoTokenizer.from_pretrained(str(folder))
            # The PIL image processor: the fast one needs torchvision.
            processor = AutoImageProcessor.from_pretrained(str(folder), backend="pil")
        except (OSError, ValueError) as exc:
            raise ModelLoadError(
                f"engine.segmenter: cannot load {folder}: {str(exc).splitlines()[0][:200]}"
            ) from exc
        log.info("segmenter %s loaded", folder.name)
        return cls(model, tokenizer, processor, folder.name)

    def mask(self, picture: Image.Image, words: str) -> Image.Image:
        """The mask (L, picture-sized) of what `words` name in `picture`. Blocking."""
        inputs = self.tokenizer([words], padding=True, return_tensors="pt")
        pixels = self.image_processor(images=[picture.convert("RGB")], return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            logits = self.model(input_ids=inputs["input_ids"], pixel_values=pixels).logits
        scores = torch.sigmoid(logits.reshape(1, 1, *logits.shape[-2:]))
        scores = torch.nn.functional.interpolate(
            scores, size=(picture.height, picture.width), mode="bilinear", align_corners=False
        )[0, 0]
        hard = Image.fromarray(((scores > THRESHOLD).to(torch.uint8) * 255).numpy(), mode="L")
        if hard.getbbox() is None:
            raise RequestError(
                "nothing in the picture matched {words!r}: name what to repaint", words=words[:80]
            )
        side = min(picture.size)
        grow = max(3, int(side * GROW) // 2 * 2 + 1)  # MaxFilter takes an odd size
        grown = hard.filter(ImageFilter.MaxFilter(grow))
        return grown.filter(ImageFilter.GaussianBlur(max(1.0, side * FEATHER)))


def ensure_tiny_segmenter(directory: Path) -> Path:
    """A tiny random CLIPSeg with a word-level tokenizer and a 64-pixel image processor, saved once."""
    from transformers import CLIPImageProcessor, CLIPSegConfig, CLIPSegForImageSegmentation

    from engine.tiny import save_atomically, word_tokenizer

    if (directory / "config.json").is_file():
        return directory
    tokenizer = word_tokenizer(77, "<s>")
    ids = tokenizer.convert_tokens_to_ids
    torch.manual_seed(TINY_SEGMENTER_SEED)
    model = CLIPSegForImageSegmentation(
        CLIPSegConfig(
            text_config={
                "vocab_size": len(tokenizer),
                "hidden_size": 16,
                "intermediate_size": 16,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "max_position_embeddings": 77,
                "bos_token_id": ids("<s>"),
                "eos_token_id": ids("</s>"),
                "pad_token_id": ids("<pad>"),
            },
            vision_config={
                "hidden_size": 16,
                "intermediate_size": 16,
                "num_hidden_layers": 3,
                "num_attention_heads": 2,
                "image_size": 64,
                "patch_size": 16,
            },
            projection_dim=16,
            reduce_dim=8,
            extract_layers=[1, 2],
            decoder_num_attention_heads=2,
            decoder_intermediate_size=16,
        )
    ).eval()
    # Random weights score every pixel near even odds, so every mask would be the whole picture:
    # a low output bias makes a few per cent of pixels pass, as real words select a part.
    with torch.no_grad():
        model.decoder.transposed_convolution.bias.fill_(-5.0)
    processor = CLIPImageProcessor(do_resize=True, size={"height": 64, "width": 64}, do_center_crop=False)
    return save_atomically(
        directory, model.save_pretrained, tokenizer.save_pretrained, processor.save_pretrained
    )
