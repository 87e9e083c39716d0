"""Image-in benchmark: prints figures, asserts nothing. Run: python bench/images.py [--quick]

1. Preview cost: one live preview (flow-matching x0, the fixed latent-to-RGB projection, JPEG) at
   1024x1024, against one denoising step of the tiny model at the same size, and the same job with a
   preview every step vs none, interleaved (goal < 1 % of a step).
2. img2img and upscale through FluxEngine.generate vs the equivalent direct diffusers
   FluxImg2ImgPipeline call on the same components, seed and size, interleaved (goal <= 1.03x).
3. Inpaint and Zoom Out (FLUX.1 Fill, the tiny random Fill transformer) through the engine vs the
   direct FluxFillPipeline call on the same components and inputs (goal <= 1.03x); the engine's time
   includes pasting the input's own pixels back outside the mask.
4. Upscale with an upscaler model (a random ESRGAN of RealESRGAN_x4plus_anime_6B's shape: 64 filters,
   6 blocks, x4, written in Real-ESRGAN's layout and read by spandrel) through the engine vs the direct
   spandrel call on the same picture, alone and followed by the light redraw (direct: spandrel, then
   FluxImg2ImgPipeline) (goal <= 1.03x).
"""

from __future__ import annotations

import argparse
import io
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fluxbot.logs import quiet

quiet()

from PIL import Image  # noqa: E402

from bench.timing import interleaved  # noqa: E402
from engine.api import GenerationRequest  # noqa: E402
from engine.engine import FluxEngine  # noqa: E402
from engine.input_image import normalize_input_image  # noqa: E402
from engine.preview import PreviewEvery, PreviewMaker  # noqa: E402
from engine.settings import EngineSettings  # noqa: E402

PRESETS = """
[bench]
steps = 8
steps_range = [1, 50]
guidance = 3.5
guidance_range = [1.0, 10.0]
width = 768
height = 768
megapixels_range = [0.01, 2.1]

[fill]
steps = 8
steps_range = [1, 50]
guidance = 30.0
guidance_range = [1.0, 30.0]
width = 768
height = 768
megapixels_range = [0.01, 2.1]
"""
PROMPT = "a red fox in a snowy forest"


def preview_cost(engine: FluxEngine, repeats: int) -> None:
    height = width = 1024
    tokens = (height // 16) * (width // 16)
    sigmas = torch.linspace(1.0, 0.0, 29)
    latents = [torch.randn(1, tokens, 64) for _ in range(3)]
    maker = PreviewMaker(height, width, every=PreviewEvery(seconds=0.0))
    maker.after_step(latents[0], sigmas, 1, now=0.0)
    costs = []
    for i in range(max(20, repeats * 5)):
        start = time.perf_counter()
        maker.after_step(latents[1 + i % 2], sigmas, 2 + i % 20, now=float(i + 1))
        costs.append(time.perf_counter() - start)
    preview_s = statistics.median(costs)
    steps: list[float] = []

    def on_step(progress: object) -> None:
        steps.append(time.perf_counter())

    request = GenerationRequest(prompt=PROMPT, preset="bench", seed=1, steps=8, size=f"{width}x{height}")
    engine.generate(request, on_step=on_step)
    step_s = statistics.median(b - a for a, b in itertools.pairwise(steps))
    job = interleaved(
        {
            "none": lambda: engine.generate(request, on_step=lambda p: None),
            "every": lambda: engine.generate(
                request, on_step=lambda p: None, preview=PreviewEvery(seconds=0.0)
            ),
        },
        repeats,
    )
    per_step = (job["every"] - job["none"]) / 8
    print(
        f"1. preview cost at {width}x{height}, median of {len(costs)} previews / {repeats} interleaved jobs"
    )
    print(f"   one preview (x0 + projection + JPEG)  {preview_s * 1000:8.2f} ms")
    print(f"   one denoising step, tiny model         {step_s * 1000:8.2f} ms")
    print(f"   job, no previews                       {job['none'] * 1000:8.1f} ms")
    every = job["every"] * 1000
    print(f"   job, a preview every step              {every:8.1f} ms  ({per_step * 1000:+.2f} ms/step)")
    print(f"   preview / tiny step                    {100 * preview_s / step_s:8.2f} %")
    # Not measured here (no GPU, no real weights): the usual FLUX.1-dev bf16 step times at 1 MP.
    for name, real_step_s in (("assumed H100 step of 0.25 s", 0.25), ("assumed RTX 4090 step of 0.6 s", 0.6)):
        print(f"   preview / an {name:<35} {100 * preview_s / real_step_s:6.3f} %   (goal < 1 %)")


def image_jobs(engine: FluxEngine, repeats: int) -> None:
    from diffusers import FluxImg2ImgPipeline

    drawn = engine.generate(GenerationRequest(prompt=PROMPT, preset="bench", seed=3, size="384x384")).images[
        0
    ]
    buffer = io.BytesIO()
    drawn.save(buffer, format="PNG")
    source = normalize_input_image(buffer.getvalue(), max_bytes=10**8, max_pixels=10**8)
    picture = Image.open(io.BytesIO(source.png)).convert("RGB")
    direct_pipe = FluxImg2ImgPipeline.from_pipe(engine.pipe)
    direct_pipe.set_progress_bar_config(disable=True)

    def direct(size: int, strength: float) -> object:
        image = picture.resize((size, size), Image.Resampling.LANCZOS)
        with torch.inference_mode():
            return direct_pipe(
                PROMPT,
                image=image,
                strength=strength,
                height=size,
                width=size,
                num_inference_steps=8,
                guidance_scale=3.5,
                generator=[torch.Generator("cpu").manual_seed(7)],
            )

    def via_engine(size: int, strength: float) -> object:
        request = GenerationRequest(
            prompt=PROMPT,
            preset="bench",
            seed=7,
            size=f"{size}x{size}",
            init_image=source.sha256,
            strength=strength,
        )
        return engine.generate(request, init_image=source.png)

    print(f"2. image jobs vs direct FluxImg2ImgPipeline calls, tiny model, 8 steps, median of {repeats}")
    for label, size, strength in (
        ("img2img 384x384, strength 0.6", 384, 0.6),
        ("upscale 384 -> 768, strength 0.3", 768, 0.3),
    ):
        t = interleaved(
            {
                "direct": lambda s=size, k=strength: direct(s, k),
                "engine": lambda s=size, k=strength: via_engine(s, k),
            },
            repeats,
        )
        print(
            f"   {label:<34} direct {t['direct'] * 1000:7.1f} ms   engine {t['engine'] * 1000:7.1f} ms   "
            f"{t['engine'] / t['direct']:.3f}x   (goal <= 1.03x)"
        )


def fill_jobs(engine: FluxEngine, repeats: int) -> None:
    from engine.outpaint import zoom_out

    assert engine.fill is not None
    fill_pipe = engine.fill.pipe
    drawn = engine.generate(GenerationRequest(prompt=PROMPT, preset="bench", seed=3, size="384x384")).images[
        0
    ]
    half = Image.new("L", drawn.size, 0)
    half.paste(255, (0, 0, drawn.width // 2, drawn.height))
    zoomed = zoom_out(drawn, 2.0, 10**8)
    cases = {
        "inpaint 384x384, half masked": (drawn, half),
        "zoom out 2x, 384 -> 768": (zoomed.image, zoomed.mask),
    }

    def stored(image: Image.Image) -> tuple[str, bytes]:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        normalized = normalize_input_image(buffer.getvalue(), max_bytes=10**8, max_pixels=10**8)
        return normalized.sha256, normalized.png

    print(f"3. Fill jobs vs direct FluxFillPipeline calls, tiny models, 8 steps, median of {repeats}")
    for label, (picture, mask) in cases.items():
        (picture_sha, picture_png), (mask_sha, mask_png) = stored(picture), stored(mask)
        width, height = picture.size

        def direct(picture: Image.Image = picture, mask: Image.Image = mask) -> object:
            with torch.inference_mode():
                return fill_pipe(
                    PROMPT,
                    image=[picture],
                    mask_image=[mask],
                    height=picture.height,
                    width=picture.width,
                    num_inference_steps=8,
                    guidance_scale=30.0,
                    generator=[torch.Generator("cpu").manual_seed(7)],
                )

        request = GenerationRequest(
            prompt=PROMPT,
            preset="fill",
            mode="inpaint",
            seed=7,
            size=f"{width}x{height}",
            init_image=picture_sha,
            mask=mask_sha,
        )

        def via_engine(
            request: GenerationRequest = request, png: bytes = picture_png, m: bytes = mask_png
        ) -> object:
            return engine.generate(request, init_image=png, references=[m])

        t = interleaved({"direct": direct, "engine": via_engine}, repeats)
        print(
            f"   {label:<34} direct {t['direct'] * 1000:7.1f} ms   engine {t['engine'] * 1000:7.1f} ms   "
            f"{t['engine'] / t['direct']:.3f}x   (goal <= 1.03x)"
        )


def write_upscaler(folder: Path) -> Path:
    """A RealESRGAN_x4plus_anime_6B-shaped file (random weights) where Forge keeps upscalers."""
    from spandrel.architectures.ESRGAN import ESRGAN

    from engine.upscaler import save_realesrgan

    torch.manual_seed(0)
    network = ESRGAN(in_nc=3, out_nc=3, num_filters=64, num_blocks=6, scale=4)
    (folder / "ESRGAN").mkdir(parents=True, exist_ok=True)
    return save_realesrgan(network, folder / "ESRGAN" / "RealESRGAN_x4plus_anime_6B.pth")


def upscale_jobs(engine: FluxEngine, repeats: int) -> None:
    from diffusers import FluxImg2ImgPipeline

    from engine.upscaler import _to_image, _to_tensor

    upscaler = engine.upscaler
    assert upscaler is not None
    drawn = engine.generate(GenerationRequest(prompt=PROMPT, preset="bench", seed=3, size="192x192")).images[
        0
    ]
    buffer = io.BytesIO()
    drawn.save(buffer, format="PNG")
    source = normalize_input_image(buffer.getvalue(), max_bytes=10**8, max_pixels=10**8)
    picture = Image.open(io.BytesIO(source.png)).convert("RGB")
    redraw_pipe = FluxImg2ImgPipeline.from_pipe(engine.pipe)
    redraw_pipe.set_progress_bar_config(disable=True)
    base = engine.resolve(
        GenerationRequest(prompt=PROMPT, preset="bench", seed=7, init_image=source.sha256, strength=0.3)
    )
    size = {"width": 768, "height": 768, "model_upscale": True}
    alone = base.model_copy(update={**size, "mode": "upscale", "strength": None})
    redrawn = base.model_copy(update=size)

    def spandrel_call() -> Image.Image:
        with torch.inference_mode():
            return _to_image(upscaler.descriptor(_to_tensor(picture)))

    def direct_redraw() -> object:
        with torch.inference_mode():
            return redraw_pipe(
                PROMPT,
                image=spandrel_call(),
                strength=0.3,
                height=768,
                width=768,
                num_inference_steps=8,
                guidance_scale=3.5,
                generator=[torch.Generator("cpu").manual_seed(7)],
            )

    print(f"4. upscaler model ({upscaler.description}) vs direct spandrel calls, median of {repeats}")
    for label, spec, direct in (
        ("model x4 192 -> 768, no redraw", alone, spandrel_call),
        ("model x4 + redraw 0.3, 8 steps", redrawn, direct_redraw),
    ):
        t = interleaved(
            {"direct": direct, "engine": lambda spec=spec: engine.draw([spec], init_image=source.png)},
            repeats,
        )
        print(
            f"   {label:<34} direct {t['direct'] * 1000:7.1f} ms   engine {t['engine'] * 1000:7.1f} ms   "
            f"{t['engine'] / t['direct']:.3f}x   (goal <= 1.03x)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    args = parser.parse_args()
    repeats = 3 if args.quick else 7
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        presets = work / "presets.toml"
        presets.write_text(PRESETS)
        (work / "none.toml").write_text("")
        upscaler = write_upscaler(work / "models")
        settings = EngineSettings(
            model="tiny",
            presets_file=presets,
            loras_file=work / "none.toml",
            fill="tiny",
            upscaler=upscaler.stem,
        )
        engine = FluxEngine.load(settings, work)
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU\n")
        preview_cost(engine, repeats)
        image_jobs(engine, repeats)
        fill_jobs(engine, repeats)
        upscale_jobs(engine, repeats)


if __name__ == "__main__":
    main()
