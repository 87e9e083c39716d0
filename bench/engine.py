"""Engine benchmark: prints figures, asserts nothing. Run: python bench/engine.py [--quick]

1. Overhead: FluxEngine.generate vs a direct FluxPipeline.__call__ on the same tiny model, seed and
   size, interleaved in one run (goal <= 3 %).
2. Reroll: the same prompt again with cached text embeddings vs cold.
3. Memory: bytes of a mid-size random FLUX transformer per quant mode vs bf16 (goal Q8 <= 0.55x,
   Q4 <= 0.32x).
4. Step caches: each cache's share of steps run in full and its wall time against no cache, tiny model,
   dev's 28 steps, interleaved.
5. Compilation: regional vs full compile (+ warm-up) time and each one's run time against eager.
   (CPU figures; the GPU goals, >= 2.5x plain bf16 diffusers and >= 4x with a cache, are bench/gpu.py's.)
6. Families: FLUX.2 klein and FLUX.3 klein, FluxEngine.generate vs each family's own diffusers
   pipeline call on the same tiny model, seed and size, interleaved (goal <= 1.03x).
7. Prompt enhancement: latency of an enhanced job against the same job without, with a local
   OpenAI-compatible server answering at once (the enhancer's own cost, without an LLM's).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fluxbot.logs import quiet

quiet()

from bench.timing import interleaved  # noqa: E402
from engine.api import GenerationRequest  # noqa: E402
from engine.engine import FluxEngine  # noqa: E402
from engine.gguf_writer import write_gguf  # noqa: E402
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
"""


def overhead(data_dir: Path, presets: Path, repeats: int) -> None:
    settings = EngineSettings(
        model="tiny", presets_file=presets, loras_file=data_dir / "none.toml", embed_cache_size=0
    )
    engine = FluxEngine.load(settings, data_dir)
    pipe = engine.pipe
    request = GenerationRequest(prompt="a red fox in a snowy forest", preset="bench", seed=7)

    def direct() -> None:
        with torch.inference_mode():
            pipe(
                "a red fox in a snowy forest",
                height=768,
                width=768,
                num_inference_steps=8,
                guidance_scale=3.5,
                generator=torch.Generator("cpu").manual_seed(7),
            )

    def via_engine() -> None:
        engine.generate(request)

    direct(), via_engine()  # warm-up both paths
    times: dict[str, list[float]] = {"direct": [], "engine": []}
    for _ in range(repeats):  # interleaved, so drift hits both sides alike
        for name, fn in (("direct", direct), ("engine", via_engine)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    d, e = statistics.median(times["direct"]), statistics.median(times["engine"])
    print(f"1. overhead, tiny model 768x768 x 8 steps, median of {repeats} interleaved runs")
    print(f"   direct FluxPipeline.__call__   {d * 1000:8.1f} ms")
    print(f"   FluxEngine.generate            {e * 1000:8.1f} ms")
    print(f"   overhead                       {100 * (e - d) / d:+8.2f} %   (goal <= 3 %)")


def reroll(data_dir: Path, presets: Path, repeats: int) -> None:
    settings = EngineSettings(model="tiny", presets_file=presets, loras_file=data_dir / "none.toml")
    engine = FluxEngine.load(settings, data_dir)
    cold, warm = [], []
    for i in range(repeats):
        prompt = f"a lighthouse on a cliff at night, variation {i}"
        first = engine.generate(GenerationRequest(prompt=prompt, preset="bench", seed=i))
        again = engine.generate(GenerationRequest(prompt=prompt, preset="bench", seed=i + 1000))
        assert not first.timings.embeds_cached and again.timings.embeds_cached
        cold.append(first.timings)
        warm.append(again.timings)
    enc_c = statistics.median(t.encode_s for t in cold)
    enc_w = statistics.median(t.encode_s for t in warm)
    tot_c = statistics.median(t.total_s for t in cold)
    tot_w = statistics.median(t.total_s for t in warm)
    print(f"2. reroll with cached embeddings vs cold, median of {repeats}")
    print(f"   text encoding  cold {enc_c * 1000:7.2f} ms   cached {enc_w * 1000:7.3f} ms")
    print(f"   whole job      cold {tot_c * 1000:7.1f} ms   cached {tot_w * 1000:7.1f} ms")
    print("   (tiny encoders cost little; on FLUX.1-dev the T5-XXL pass is ~0.1-0.5 s on a GPU)")


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a weight really holds, looking inside tensor subclasses (torchao) and GGUF parameters."""
    if hasattr(t, "__tensor_flatten__") and type(t) not in (torch.Tensor, torch.nn.Parameter):
        names, _ = t.__tensor_flatten__()
        if names:
            return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def model_bytes(model: torch.nn.Module) -> int:
    return sum(tensor_bytes(p) for p in model.parameters()) + sum(tensor_bytes(b) for b in model.buffers())


def memory(work: Path) -> None:
    from diffusers import FluxTransformer2DModel, GGUFQuantizationConfig, TorchAoConfig
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig

    config = dict(
        patch_size=1,
        in_channels=64,
        num_layers=2,
        num_single_layers=4,
        attention_head_dim=128,
        num_attention_heads=8,
        joint_attention_dim=1024,
        pooled_projection_dim=768,
        guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    )
    torch.manual_seed(0)
    model = FluxTransformer2DModel(**config).to(torch.bfloat16).eval()
    folder = work / "mid"
    model.save_pretrained(folder / "transformer")
    base = model_bytes(model)
    params = sum(p.numel() for p in model.parameters())
    rows = [("bf16", base)]
    for name, quant in (
        ("fp8 (torchao)", Float8WeightOnlyConfig()),
        ("int8 (torchao)", Int8WeightOnlyConfig()),
    ):
        q = FluxTransformer2DModel.from_pretrained(
            folder, subfolder="transformer", dtype=torch.bfloat16, quantization_config=TorchAoConfig(quant)
        )
        rows.append((name, model_bytes(q)))
    state = model.state_dict()
    for qtype in ("Q8_0", "Q5_0", "Q4_0"):
        path = write_gguf(state, work / f"mid-{qtype}.gguf", qtype)
        q = FluxTransformer2DModel.from_single_file(
            str(path),
            config=str(folder),
            subfolder="transformer",
            dtype=torch.bfloat16,
            quantization_config=GGUFQuantizationConfig(compute_dtype=torch.bfloat16),
        )
        rows.append((f"GGUF {qtype}", model_bytes(q)))
    print(f"3. transformer bytes, mid-size random FLUX ({params / 1e6:.0f} M params, hidden 1024)")
    for name, size in rows:
        print(f"   {name:<16} {size / 2**20:9.1f} MiB   {size / base:5.2f}x bf16")
    print("   goals: Q8 <= 0.55x, Q4 <= 0.32x")


def step_caches(data_dir: Path, presets: Path, repeats: int) -> None:
    settings = EngineSettings(
        model="tiny", presets_file=presets, loras_file=data_dir / "none.toml", embed_cache_size=0
    )
    engine = FluxEngine.load(settings, data_dir)
    caches = ["none", "fbcache:0.08", "fbcache:0.3", "taylorseer:4:1", "taylorseer:6:2", "magcache:0.06"]
    requests = {
        c: GenerationRequest(prompt="a red fox in a snowy forest", preset="bench", seed=7, steps=28, cache=c)
        for c in caches
    }
    times: dict[str, list[float]] = {c: [] for c in caches}
    full: dict[str, int] = {}
    for cache in caches:  # warm-up
        engine.generate(requests[cache])
    for _ in range(repeats):
        for cache in caches:
            result = engine.generate(requests[cache])
            times[cache].append(result.timings.total_s)
            full[cache] = result.timings.computed_steps or 28
    base = statistics.median(times["none"])
    print(f"4. step caches, tiny model 768x768 x 28 steps, median of {repeats} interleaved runs")
    for cache in caches:
        t = statistics.median(times[cache])
        steps = f"{full[cache]:>2}/28 steps in full"
        print(f"   {cache:<16} {steps}   {t * 1000:8.1f} ms   {base / t:5.2f}x no cache")
    print("   (random weights: a first-block cache at 0.08 rarely skips; real FLUX.1-dev skips ~30-40 %)")


def compilation(data_dir: Path, presets: Path, repeats: int) -> None:
    base = dict(model="tiny", presets_file=presets, loras_file=data_dir / "none.toml", embed_cache_size=0)
    request = GenerationRequest(prompt="a red fox in a snowy forest", preset="bench", seed=7)
    engines = {
        mode: FluxEngine.load(EngineSettings(**base, compile=mode), data_dir)
        for mode in ("off", "regional", "full")
    }
    times: dict[str, list[float]] = {mode: [] for mode in engines}
    for engine in engines.values():
        engine.generate(request)
    for _ in range(repeats):
        for mode, engine in engines.items():
            start = time.perf_counter()
            engine.generate(request)
            times[mode].append(time.perf_counter() - start)
    eager = statistics.median(times["off"])
    print(f"5. compilation, tiny model 768x768 x 8 steps, median of {repeats} interleaved runs")
    for mode, engine in engines.items():
        t = statistics.median(times[mode])
        took = f"{engine.warmup_s:6.1f} s compile + warm-up" if engine.warmup_s is not None else " " * 26
        print(f"   {mode:<9} {took}   {t * 1000:8.1f} ms per image   {eager / t:5.2f}x eager")


FAMILY_PRESETS = """
[klein]
family = "flux2"
steps = 8
steps_range = [1, 50]
width = 512
height = 512
megapixels_range = [0.01, 2.1]

[flux3-distilled]
family = "flux3"
steps = 8
steps_range = [1, 50]
width = 512
height = 512
megapixels_range = [0.01, 2.1]
"""


def families(data_dir: Path, repeats: int) -> None:
    from engine.flux3 import encode_prompt

    presets = data_dir / "family-presets.toml"
    presets.write_text(FAMILY_PRESETS)
    prompt = "a red fox in a snowy forest"
    print(f"6. families: engine vs each family's own pipeline, tiny 512x512 x 8 steps, median of {repeats}")
    for model in ("tiny-flux2", "tiny-flux3"):
        settings = EngineSettings(
            model=model, presets_file=presets, loras_file=data_dir / "none.toml", embed_cache_size=0
        )
        engine = FluxEngine.load(settings, data_dir)
        pipe = engine.pipe

        def direct(pipe: Any = pipe, model: str = model) -> None:
            generator = torch.Generator("cpu").manual_seed(7)
            with torch.inference_mode():
                if model == "tiny-flux3":
                    embeds = encode_prompt(pipe, prompt, 512)  # what its text step computes, every call
                    pipe.pipe(
                        prompt_embeds=embeds,
                        height=512,
                        width=512,
                        num_inference_steps=8,
                        generator=generator,
                        output="images",
                    )
                else:
                    pipe(
                        prompt=prompt,
                        height=512,
                        width=512,
                        num_inference_steps=8,
                        generator=generator,
                        guidance_scale=1.0,
                        max_sequence_length=512,
                    )

        def via_engine(engine: FluxEngine = engine) -> None:
            engine.generate(GenerationRequest(prompt=prompt, seed=7))

        t = interleaved({"direct": direct, "engine": via_engine}, repeats)
        print(
            f"   {model:<11} direct {t['direct'] * 1000:8.1f} ms   engine {t['engine'] * 1000:8.1f} ms   "
            f"{t['engine'] / t['direct']:5.3f}x   (goal <= 1.03x)"
        )


def enhancement(data_dir: Path, presets: Path, repeats: int) -> None:
    from tests.chat_server import chat_server

    with chat_server() as chat:
        settings = EngineSettings(
            model="tiny", presets_file=presets, loras_file=data_dir / "none.toml", prompt_enhancer=chat.url
        )
        engine = FluxEngine.load(settings, data_dir)
        plain = GenerationRequest(prompt="a lighthouse", preset="bench", seed=3)
        enhanced = plain.model_copy(update={"enhance": True})
        t = interleaved(
            {"plain": lambda: engine.generate(plain), "enhanced": lambda: engine.generate(enhanced)}, repeats
        )
        started = time.perf_counter()
        for _ in range(repeats * 4):
            assert engine.enhancer is not None
            engine.enhancer.enhance("a lighthouse")
        call = (time.perf_counter() - started) / (repeats * 4)
    print(
        f"7. enhancement against a local chat-completions server, tiny 768x768 x 8 steps, median of {repeats}"
    )
    print(f"   one enhancer call (HTTP + openai client)  {call * 1000:8.1f} ms")
    print(f"   job without / with enhancement  {t['plain'] * 1000:8.1f} / {t['enhanced'] * 1000:8.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument(
        "--only", help="comma-separated sections: overhead,reroll,memory,caches,compile,families,enhance"
    )
    args = parser.parse_args()
    repeats = 3 if args.quick else 7
    chosen = set(args.only.split(",")) if args.only else None

    def wanted(name: str) -> bool:
        return chosen is None or name in chosen

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        presets = work / "presets.toml"
        presets.write_text(PRESETS)
        (work / "none.toml").write_text("")
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU\n")
        sections: list[tuple[str, Callable[[], None]]] = [
            ("overhead", lambda: overhead(work, presets, repeats)),
            ("reroll", lambda: reroll(work, presets, repeats)),
            ("memory", lambda: memory(work)),
            ("caches", lambda: step_caches(work, presets, repeats)),
            ("compile", lambda: compilation(work, presets, repeats)),
            ("families", lambda: families(work, repeats)),
            ("enhance", lambda: enhancement(work, presets, repeats)),
        ]
        for name, run in sections:
            if wanted(name):
                run()


if __name__ == "__main__":
    main()
