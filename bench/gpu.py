"""Seconds per image on a GPU: plain diffusers bf16 against fluxbot's engine with each speed setting.

One process, the same seeds, prompt and size for every row: a FLUX.1-dev-shaped (or schnell-shaped)
pipeline with RANDOM weights, built from the configs fluxbot bundles (engine/model_configs) and saved
once as a diffusers folder, so nothing is downloaded. Random weights say nothing about image quality;
they also make step caches skip a different number of steps than real weights would (the table
says how many steps ran in full).

Rows: plain diffusers `FluxPipeline.__call__` (the baseline), then fluxbot's engine (`FluxEngine.load`
+ `generate`, prompt embeddings re-encoded every run as the baseline does) with one setting at a time
(regional / full compile, each attention backend this host has, fp8dq, fp8 weight-only, int8, nf4,
GGUF Q8_0 written on the fly), and the best combination with each step cache. Columns: s/image,
s/step (s/image over the steps), peak VRAM, compile + warm-up seconds, ratio to the baseline,
images per hour. The table is printed and written as JSON and Markdown (--out).

A second table, the image tools (rows `upscaler` and `swap`): an upscaler model of
RealESRGAN_x4plus's shape (random weights, written in its layout and read by spandrel) through the
engine's tiled path against spandrel's own call on the whole picture, for a quarter-size input (one
tile: the same call) and a full-size one (tiles of 512), and one swap of engine.extra_models = "swap"
(a FLUX.1-transformer-sized extra moved out to CPU RAM and another moved in, as ExtraSwap does).

Wheels it needs beyond torch, transformers, accelerate, safetensors and peft (carry them to a machine
without a registry): diffusers (0.42), torchao, gguf, bitsandbytes, spandrel (with torchvision and
einops), pydantic (with pydantic-core, annotated-types, typing-inspection), pydantic-settings,
pillow, numpy, tqdm, sentencepiece, and
fluxbot itself (`pip install --no-deps fluxbot-*.whl`, or run from the repository). Optional:
flash-attn 3 (`flash_attn_interface`) for the `_flash_3` backend, flash-attn for `flash`,
sageattention for `sage`.

    python bench/gpu.py --out DIR                     # everything (about 15-20 minutes on an H100)
    python bench/gpu.py --only baseline,bf16,regional,fp8dq-regional,best --out DIR
    python bench/gpu.py --skip full,gguf --runs 3
    python bench/gpu.py --smoke                       # the same code on CPU with the tiny model (< 1 min)
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fluxbot.logs import quiet

quiet()

import torch  # noqa: E402

from engine.api import GenerationRequest  # noqa: E402
from engine.engine import FluxEngine  # noqa: E402
from engine.errors import EngineError  # noqa: E402
from engine.info import library_versions, process_rss  # noqa: E402
from engine.loading import shipped_configs  # noqa: E402
from engine.quant import probe_device  # noqa: E402
from engine.settings import EngineSettings  # noqa: E402
from engine.speed import attention_backends, choose_attention  # noqa: E402

PROMPT = "a red fox in a snowy forest at dawn, detailed fur, soft light"
SEED = 20251205
# Backends tried for the attention rows, fastest first (what `auto` would take is among them).
ATTENTION_CANDIDATES = ("_flash_3", "flash", "sage", "_native_cudnn", "_native_flash", "flex")
CACHES = ("fbcache:0.08", "taylorseer:4:1")


@dataclass(frozen=True)
class Setting:
    """One engine configuration: loaded once, then timed without a cache and with `caches`."""

    name: str
    engine: dict[str, Any]
    caches: tuple[str, ...] = ()
    needs_cuda: bool = False
    note: str = ""


@dataclass
class Row:
    setting: str
    cache: str = "none"
    s_image: float | None = None
    s_step: float | None = None
    peak_gb: float | None = None
    compile_s: float | None = None
    ratio: float | None = None
    images_per_hour: float | None = None
    full_steps: str = ""
    skipped: str = ""
    runs: list[float] = field(default_factory=list)


def settings_grid(attention: str, smoke: bool) -> list[Setting]:
    """Each speed setting alone on bf16, then the best combination (fp8dq, regional, best attention)."""
    bf16 = {"quant": "bf16", "text_encoder_quant": "none"}
    grid = [
        Setting("bf16", bf16),
        Setting("regional", {**bf16, "compile": "regional"}),
        Setting("full", {**bf16, "compile": "full"}),
    ]
    grid += [
        Setting(f"attn-{name}", {**bf16, "attention": name}, needs_cuda=True)
        for name in ATTENTION_CANDIDATES
        if name in attention_backends()
    ]
    grid += [
        Setting("fp8dq", {"quant": "fp8dq", "text_encoder_quant": "none"}, needs_cuda=True),
        Setting(
            "fp8dq-regional",
            {"quant": "fp8dq", "text_encoder_quant": "none", "compile": "regional"},
            needs_cuda=True,
        ),
        Setting("fp8", {"quant": "fp8", "text_encoder_quant": "none"}),
        Setting("int8", {"quant": "int8", "text_encoder_quant": "none"}),
        Setting("nf4", {"quant": "nf4", "text_encoder_quant": "nf4"}, needs_cuda=True, note="memory tier"),
        Setting("gguf-q8_0", {"quant": "gguf", "text_encoder_quant": "none"}, note="memory tier"),
        Setting(
            "best",
            {
                "quant": "fp8dq",
                "text_encoder_quant": "none",
                "compile": "regional",
                "attention": best_attention,
            },
            caches=CACHES,
            needs_cuda=True,
        ),
    ]
    if smoke:  # the CPU stand-in for "best": what a CPU can run, with every cache
        grid.append(Setting("cpu-best", {**bf16}, caches=CACHES))
    return grid


def best_attention(device: Any) -> str:
    for name in ATTENTION_CANDIDATES:
        try:
            choose_attention(name, device)
        except EngineError:
            continue
        return name
    return "native"


# The model: random weights, FLUX.1-shaped, saved once


def build_random_model(folder: Path, variant: str, device: str, dtype: torch.dtype) -> Path:
    """A diffusers folder with FLUX.1 `variant`'s shapes and random weights, made on `device`."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from engine.tiny import word_tokenizer

    if (folder / "model_index.json").is_file():
        return folder
    configs, common = shipped_configs(variant), shipped_configs("dev")
    started = time.perf_counter()
    torch.manual_seed(SEED)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are made in bf16: 24 GB for the transformer, not 48
    try:
        with torch.device(device):
            transformer = FluxTransformer2DModel.from_config(
                FluxTransformer2DModel.load_config(str(configs / "transformer"))
            )
            vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(common / "vae")))
            clip = CLIPTextModel(CLIPTextConfig.from_pretrained(str(common / "text_encoder")))
            t5 = T5EncoderModel(T5Config.from_pretrained(str(common / "text_encoder_2")))
    finally:
        torch.set_default_dtype(previous)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(str(configs), subfolder="scheduler")
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=clip,
        tokenizer=word_tokenizer(77, "<s>"),
        text_encoder_2=t5,
        tokenizer_2=word_tokenizer(512, None),
        transformer=transformer,
    )
    partial = folder.with_name(folder.name + ".partial")
    pipe.save_pretrained(partial)
    partial.rename(folder)
    del pipe, transformer, vae, clip, t5
    free_memory()
    print(
        f"random FLUX.1-{variant}-shaped model written to {folder} in {time.perf_counter() - started:.0f} s"
    )
    return folder


def write_gguf_files(folder: Path, work: Path) -> dict[str, Path]:
    """The transformer as a Q8_0 GGUF (diffusers names) and the parts a single file needs beside it."""
    from safetensors.torch import load_file, save_file

    from engine.gguf_writer import write_gguf

    files = {
        "model": work / "flux1-bench-Q8_0.gguf",
        "vae": folder / "vae" / "diffusion_pytorch_model.safetensors",
        "clip_l": folder / "text_encoder" / "model.safetensors",
        "t5xxl": work / "t5xxl_bf16.safetensors",
    }
    if files["model"].is_file() and files["t5xxl"].is_file():
        return files
    started = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    state: dict[str, torch.Tensor] = {}
    for shard in sorted((folder / "transformer").glob("*.safetensors")):
        state.update(load_file(str(shard), device=device))
    write_gguf(state, files["model"], "Q8_0")
    del state
    t5: dict[str, torch.Tensor] = {}
    for shard in sorted((folder / "text_encoder_2").glob("*.safetensors")):
        t5.update(load_file(str(shard)))
    save_file(t5, str(files["t5xxl"]))
    del t5
    free_memory()
    print(f"GGUF Q8_0 transformer and single-file encoders written in {time.perf_counter() - started:.0f} s")
    return files


# Timing


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass
class Measure:
    """Warm-up runs, then timed ones; peak memory of the timed ones."""

    warmup: int
    runs: int
    cuda: bool

    def __call__(self, once: Callable[[], Any]) -> tuple[list[float], float]:
        for _ in range(self.warmup):
            once()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        rss = process_rss()
        times = []
        for _ in range(self.runs):
            start = time.perf_counter()
            once()
            if self.cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        peak = torch.cuda.max_memory_allocated() if self.cuda else max(rss, process_rss())
        return times, peak / 1024**3


def baseline(folder: Path, args: argparse.Namespace, measure: Measure, device: str) -> Row:
    """Plain diffusers: FluxPipeline.from_pretrained in bf16 (fp32 on CPU), its own __call__."""
    from diffusers import FluxPipeline

    dtype = torch.bfloat16 if device != "cpu" else torch.float32
    pipe = FluxPipeline.from_pretrained(str(folder), torch_dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    guidance = args.guidance if args.variant == "dev" else 0.0

    def once() -> None:
        with torch.inference_mode():
            pipe(
                PROMPT,
                height=args.size,
                width=args.size,
                num_inference_steps=args.steps,
                guidance_scale=guidance,
                generator=torch.Generator("cpu").manual_seed(SEED),
            )

    times, peak = measure(once)
    return Row("diffusers-bf16 (baseline)", runs=times, peak_gb=peak, full_steps=f"{args.steps}/{args.steps}")


def engine_rows(
    setting: Setting, engine_settings: EngineSettings, work: Path, args: argparse.Namespace, measure: Measure
) -> Iterator[Row]:
    held = [FluxEngine.load(engine_settings, work)]  # a list, so the engine can be let go at the end
    try:
        for cache in ("none", *setting.caches):
            if cache != "none" and args.cache_filter and cache.split(":")[0] not in args.cache_filter:
                continue
            request = GenerationRequest(prompt=PROMPT, preset="bench", seed=SEED, cache=cache)  # type: ignore[arg-type]
            last: list[Any] = []

            def once(request: GenerationRequest = request, last: list[Any] = last) -> None:
                last[:] = [held[0].generate(request)]

            times, peak = measure(once)
            recipe = last[0].recipes[0]
            yield Row(
                setting.name,
                cache,
                runs=times,
                peak_gb=peak,
                compile_s=held[0].warmup_s,
                full_steps=f"{recipe.computed_steps}/{recipe.steps}",
            )
    finally:
        held.clear()
        torch._dynamo.reset()  # compiled graphs hold the old modules: let them go before the next load
        free_memory()


def finish(rows: list[Row], steps: int) -> None:
    base = next((r for r in rows if r.setting.startswith("diffusers") and r.runs), None)
    for row in rows:
        if not row.runs:
            continue
        row.s_image = statistics.median(row.runs)
        row.s_step = row.s_image / steps
        row.images_per_hour = 3600 / row.s_image
        if base is not None and base.runs:
            row.ratio = statistics.median(base.runs) / row.s_image


def markdown(rows: list[Row], header: dict[str, Any]) -> str:
    def num(value: float | None, digits: int = 2) -> str:
        return "" if value is None else f"{value:.{digits}f}"

    lines = [f"- {key}: {value}" for key, value in header.items()]
    lines += [
        "",
        "| setting | cache | s/image | s/step | peak GB | compile s | x baseline | images/h | full steps |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        if r.skipped:
            lines.append(f"| {r.setting} | {r.cache} | skipped: {r.skipped} | | | | | | |")
            continue
        lines.append(
            f"| {r.setting} | {r.cache} | {num(r.s_image, 3)} | {num(r.s_step, 4)} | {num(r.peak_gb, 1)} | "
            f"{num(r.compile_s, 1)} | {num(r.ratio)} | {num(r.images_per_hour, 0)} | {r.full_steps} |"
        )
    return "\n".join(lines) + "\n"


def versions(device: Any) -> dict[str, Any]:
    import importlib.metadata

    found = library_versions()
    for name in ("torchao", "bitsandbytes", "gguf", "accelerate", "safetensors", "kernels", "flash-attn"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    found["cuda"] = torch.version.cuda or "none"
    found["device"] = f"{device.name} ({device.device})"
    if device.is_cuda:
        found["compute capability"] = ".".join(map(str, device.compute_capability or ()))
        found["driver"] = _driver()
    return found


def _driver() -> str:
    import subprocess

    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def presets_file(work: Path, args: argparse.Namespace) -> Path:
    guidance = f"guidance = {args.guidance}\nguidance_range = [0.0, 30.0]\n" if args.variant == "dev" else ""
    path = work / "bench-presets.toml"
    path.write_text(
        f'[bench]\nfamily = "flux1"\nsteps = {args.steps}\nsteps_range = [1, 200]\n{guidance}'
        f"width = {args.size}\nheight = {args.size}\nmegapixels_range = [0.001, 16.0]\n"
    )
    return path


# The image tools: the upscaler model and an extra transformer's swap


@dataclass
class ToolRow:
    what: str
    runs: list[float] = field(default_factory=list)
    peak_gb: float | None = None
    note: str = ""

    @property
    def seconds(self) -> float | None:
        return statistics.median(self.runs) if self.runs else None


def upscaler_rows(args: argparse.Namespace, measure: Measure, device: str, work: Path) -> list[ToolRow]:
    """RealESRGAN_x4plus's shape (64 filters, 23 blocks; smoke: 8 and 1): the engine's tiles against
    spandrel's call on the whole picture, for a picture of one tile and one of several."""
    from PIL import Image
    from spandrel.architectures.ESRGAN import ESRGAN

    from engine.hashing import FileHasher
    from engine.upscaler import Upscaler, _to_image, _to_tensor, save_realesrgan

    torch.manual_seed(SEED)
    filters, blocks = (8, 1) if args.smoke else (64, 23)
    network = ESRGAN(in_nc=3, out_nc=3, num_filters=filters, num_blocks=blocks, scale=4)
    path = save_realesrgan(network, work / "RealESRGAN_x4plus-random.pth")
    upscaler = Upscaler.load(path, device, FileHasher(None), tile=32 if args.smoke else 512)
    rows = []
    for side in (max(16, args.size // 4), args.size):
        picture = Image.effect_noise((side, side), 64).convert("RGB")

        def direct(picture: Image.Image = picture) -> None:
            pixels = _to_tensor(picture).to(device, upscaler.dtype)
            with torch.inference_mode():
                _to_image(upscaler.descriptor(pixels))

        def tiled(picture: Image.Image = picture) -> None:
            upscaler.upscale(picture)

        for name, once in (("spandrel call", direct), ("engine tiles", tiled)):
            try:
                times, peak = measure(once)
            except torch.OutOfMemoryError as exc:
                note = f"out of memory: {exc}"[:120]
                rows.append(ToolRow(f"upscaler {side}->{4 * side}: {name}", note=note))
                free_memory()
                continue
            note = f"{upscaler.description}, {upscaler.dtype}"
            if name == "engine tiles" and side > upscaler.tile:
                note += f", tiles of {upscaler.tile} px"
            rows.append(ToolRow(f"upscaler {side}->{4 * side}: {name}", times, peak, note))
    return rows


def swap_row(measure: Measure, device: str, transformer_config: Path) -> ToolRow:
    """engine.extra_models = "swap": one extra transformer (the benchmark model's shape) moved to CPU
    RAM and the other onto the device, by ExtraSwap itself. The weights are left uninitialized (only
    their bytes move)."""
    from types import SimpleNamespace

    from diffusers import FluxTransformer2DModel

    from engine.extra_models import ExtraModel, ExtraSwap

    config = FluxTransformer2DModel.load_config(str(transformer_config))
    with torch.device("meta"):
        made = [FluxTransformer2DModel.from_config(config) for _ in range(2)]
    dtype = torch.bfloat16 if device != "cpu" else torch.float32
    on_gpu = made[0].to_empty(device=device).to(dtype)
    waiting = made[1].to_empty(device="cpu").to(dtype)
    extras = [ExtraModel(SimpleNamespace(transformer=t), {}) for t in (on_gpu, waiting)]
    swap = ExtraSwap(device)
    swap.bring(extras[0])
    turn = [1]

    def once() -> None:
        swap.bring(extras[turn[0] % 2])
        turn[0] += 1

    times, peak = measure(once)
    size_gb = sum(p.numel() * p.element_size() for p in on_gpu.parameters()) / 1024**3
    return ToolRow("swap: one extra out, the other in", times, peak, f"{size_gb:.2f} GB each, {dtype}")


def tools_markdown(rows: list[ToolRow]) -> str:
    lines = ["", "| image tool | s (median) | peak GB | note |", "| --- | --- | --- | --- |"]
    for r in rows:
        seconds = "" if r.seconds is None else f"{r.seconds:.3f}"
        peak = "" if r.peak_gb is None else f"{r.peak_gb:.1f}"
        lines.append(f"| {r.what} | {seconds} | {peak} | {r.note} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--smoke", action="store_true", help="CPU, tiny model: the same code, in under a minute"
    )
    parser.add_argument(
        "--only", default="", help="comma-separated row names (baseline, bf16, regional, ...)"
    )
    parser.add_argument("--skip", default="", help="comma-separated row names to leave out")
    parser.add_argument("--caches", default="", help="only these cache kinds on the 'best' row (fbcache,...)")
    parser.add_argument("--variant", choices=("dev", "schnell"), default="dev")
    parser.add_argument("--size", type=int, default=None, help="width = height (default 1024; smoke 64)")
    parser.add_argument("--steps", type=int, default=None, help="default 28 (dev), 4 (schnell); smoke 8")
    parser.add_argument("--guidance", type=float, default=3.5)
    parser.add_argument("--runs", type=int, default=2, help="timed runs per row (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per row first")
    parser.add_argument("--work", type=Path, default=None, help="where the random model is written")
    parser.add_argument("--out", type=Path, default=None, help="folder for gpu-bench.json / .md")
    args = parser.parse_args()
    args.size = args.size or (64 if args.smoke else 1024)
    args.steps = args.steps or (8 if args.smoke else (28 if args.variant == "dev" else 4))
    args.cache_filter = {c for c in args.caches.split(",") if c}
    only = {n for n in args.only.split(",") if n}
    skip = {n for n in args.skip.split(",") if n}
    if args.smoke:
        skip |= {"regional", "full"}  # minutes of CPU compiling; tests/test_speed.py covers compile

    device = probe_device("cpu" if args.smoke else "auto")
    if not args.smoke and not device.is_cuda:
        sys.exit("bench/gpu.py: no CUDA GPU here; run with --smoke for the CPU check")
    header = {
        "what": "random weights: speed and memory only, nothing about image quality",
        "shape": "tiny (smoke)" if args.smoke else f"FLUX.1-{args.variant}",
        "size": f"{args.size}x{args.size}",
        "steps": args.steps,
        "guidance": args.guidance if args.variant == "dev" else "none",
        "batch": 1,
        "runs": f"{args.warmup} warm-up + {args.runs} timed (median)",
        **versions(device),
    }
    print("\n".join(f"{k}: {v}" for k, v in header.items()), flush=True)
    measure = Measure(args.warmup, args.runs, device.is_cuda)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="fluxbot-gpu-bench-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        (work / "no-loras.toml").write_text("")
        common = {
            "presets_file": presets_file(work, args),
            "loras_file": work / "no-loras.toml",
            "embed_cache_size": 0,  # encode every run, as the baseline's __call__ does
            "device": device.device,
        }
        if args.smoke:
            from engine.tiny import ensure_tiny_model

            folder = ensure_tiny_model(work / "models" / "tiny-flux1")
            common["model"] = "tiny"
        else:
            folder = build_random_model(
                work / f"flux1-{args.variant}-random", args.variant, "cuda", torch.bfloat16
            )
            common["model"] = str(folder)

        def wanted(name: str) -> bool:
            return (not only or name in only) and name not in skip

        if wanted("baseline"):
            rows.append(baseline(folder, args, measure, device.device))
            print(f"baseline: {statistics.median(rows[-1].runs):.3f} s/image", flush=True)
        for setting in settings_grid(best_attention(device), args.smoke):
            if not wanted(setting.name):
                continue
            if setting.needs_cuda and not device.is_cuda:
                rows.append(Row(setting.name, skipped="needs a CUDA GPU"))
                continue
            values = {**common, **setting.engine}
            if setting.name == "gguf-q8_0":
                values.update({k: str(v) for k, v in write_gguf_files(folder, work).items()})
                values.update({"configs": str(folder), "tokenizers": str(folder)})
            try:
                engine_settings = EngineSettings.model_validate(values)
                for row in engine_rows(setting, engine_settings, work, args, measure):
                    rows.append(row)
                    print(
                        f"{row.setting} [{row.cache}]: {statistics.median(row.runs):.3f} s/image", flush=True
                    )
            except (EngineError, RuntimeError, ValueError) as exc:  # one row fails, the table goes on
                rows.append(Row(setting.name, skipped=f"{exc.__class__.__name__}: {str(exc)[:160]}"))
                print(f"{setting.name}: {rows[-1].skipped}", flush=True)
                free_memory()
        tools: list[ToolRow] = []
        if wanted("upscaler"):
            tools += upscaler_rows(args, measure, device.device, work)
        if wanted("swap"):
            tools.append(swap_row(measure, device.device, folder / "transformer"))
            free_memory()
        for tool in tools:
            print(f"{tool.what}: {tool.seconds} s {tool.note}", flush=True)
    finish(rows, args.steps)
    table = markdown(rows, header) + tools_markdown(tools)
    print("\n" + table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu-bench.md").write_text(table)
        (args.out / "gpu-bench.json").write_text(
            json.dumps(
                {"header": header, "rows": [asdict(r) for r in rows], "tools": [asdict(t) for t in tools]},
                indent=2,
                default=str,
            )
        )


if __name__ == "__main__":
    main()
