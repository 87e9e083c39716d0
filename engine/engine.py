"""FluxEngine: one resident FLUX pipeline that turns GenerationRequests into images and recipes."""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from engine.api import GenerationRequest, GenerationResult, Recipe, StepProgress, Timings
from engine.embed_cache import PromptEmbedCache
from engine.enhancer import EndpointEnhancer, EnhancerError, PromptEnhancer, endpoint_enhancer
from engine.errors import ConfigError, GenerationCancelled, OutOfMemory, RequestError
from engine.extra_models import FILL, KONTEXT, ExtraModel, ExtraSwap, extra_policy, load_extra
from engine.families import Embeds, FamilyAdapter, adapter_for, concat_embeds, repeat_embeds
from engine.flux3 import Flux3Upsampler, auto_for, plan_for, set_guidance
from engine.hashing import FileHasher
from engine.info import (
    EngineInfo,
    library_versions,
    make_recipe,
    model_hashes,
    process_rss,
    record_warmup,
)
from engine.input_image import decode_input, reference_problem
from engine.loading import LoadedModel, load_pipeline
from engine.lora_slots import lora_switch
from engine.loras import LoraSwitch
from engine.preview import (
    LatentDecoder,
    PreviewMaker,
    latent_rgb,
    preview_decoder,
    unpack_flux2_latents,
    unpack_latents,
)
from engine.quant import QuantPlan, plan_quant, probe_device
from engine.resolve import RequestResolver, reference_count_problem
from engine.settings import EngineSettings
from engine.sources import locate_model
from engine.spec import MAX_PIXELS, DrawSpec, PreviewEvery
from engine.speed import (
    apply_attention,
    cached_run,
    choose_attention,
    compile_transformer,
    compiled_graphs,
)
from engine.step_cache import NO_CACHE, StepCache
from engine.tiny import ensure_tiny_upsampler
from engine.upscaler import Upscaler, locate_upscaler
from engine.whitelist import LoraFiles, LoraUse, default_lora_dir

log = logging.getLogger(__name__)

StepCallback = Callable[[StepProgress], None]
GRID = 16  # FLUX latents are 8x smaller than the picture, then packed in 2x2 patches


class FluxEngine:
    """Holds the pipeline resident. `generate` is blocking and serialized: call it off the event loop."""

    def __init__(
        self,
        loaded: LoadedModel,
        resolver: RequestResolver,
        info: EngineInfo,
        loras: LoraSwitch,
        embed_cache: PromptEmbedCache,
    ) -> None:
        self.pipe = loaded.pipe
        self.resolver = resolver
        self.info = info
        self.loras = loras
        self.embed_cache = embed_cache
        self._family: FamilyAdapter = adapter_for(loaded.family)
        self._lock = threading.Lock()
        self._versions = library_versions()
        self.memory_cap_bytes: int | None = None
        self._img2img_pipe: Any = None
        self.kontext: ExtraModel | None = None  # FLUX.1 Kontext: edits
        self.fill: ExtraModel | None = None  # FLUX.1 Fill: inpainting
        self.extra_policy = "off"  # resident | swap | off: how Kontext and Fill are held
        self.swap: ExtraSwap | None = None  # with "swap": which extra is on the GPU now
        self.preview_decoder: LatentDecoder | None = latent_rgb
        self.vae_tiling_above_mp = 1.6
        self.warmup_s: float | None = None  # compile + warm-up at start (None: not compiled)
        self.warmup_graphs = 0  # graphs torch compiled during the warm-up
        self.max_batch_size = 4  # images in one pipeline call (engine.max_batch_size)
        self.lora_files: LoraFiles | None = None  # the LoRA folder, hash-checked (for admins' additions)
        self.enhancer: PromptEnhancer | None = None  # engine.prompt_enhancer (engine/enhancer.py)
        self.upscaler: Upscaler | None = None  # engine.upscaler: Upscale enlarges with it first

    @classmethod
    def load(cls, settings: EngineSettings, data_dir: Path, plan: QuantPlan | None = None) -> FluxEngine:
        """Load presets, whitelist and the model once; raises an EngineError the operator can act on.
        With `compile`, the transformer is compiled and warmed up here, before any job. `plan`: one
        made elsewhere (bench/gpu.py's side-by-side runs, tests) instead of the settings' own."""
        device = probe_device(settings.device)
        attention = choose_attention(settings.attention, device)  # refused before minutes of loading
        source = locate_model(settings, data_dir)
        if plan is None:
            plan = plan_quant(settings, device, source.is_gguf, auto_for(source, device, settings))
        plan = plan_for(plan, settings, source)
        hasher = FileHasher(data_dir / "hashes.json")
        started = time.perf_counter()
        loaded = load_pipeline(source, plan, settings, device)
        log.info(
            "model %s loaded in %.1fs on %s", loaded.model_id, time.perf_counter() - started, device.device
        )
        info = EngineInfo(
            loaded.model_id,
            loaded.family,
            loaded.variant,
            device,
            plan,
            model_hashes(source, hasher),
            attention,
        )
        resolver = RequestResolver.from_settings(settings, loaded.family, loaded.variant)
        files = LoraFiles(settings.lora_dir or default_lora_dir(source.models_dir, data_dir), hasher)
        loras = lora_switch(loaded.pipe, files, resolver.catalog, settings, plan)
        engine = cls(loaded, resolver, info, loras, PromptEmbedCache(settings.embed_cache_size))
        engine.max_batch_size = settings.max_batch_size
        engine.lora_files = files
        engine.set_memory_cap(settings.memory_cap_gb)
        engine.vae_tiling_above_mp = settings.vae_tiling_above_megapixels
        engine.enhancer = endpoint_enhancer(settings)
        if settings.upscaler is not None:
            file = locate_upscaler(settings.upscaler, source.models_dir, data_dir)
            engine.upscaler = Upscaler.load(file, device.device, hasher, tile=settings.upscaler_tile)
        if settings.prompt_upsampler is not None:
            if loaded.family != "flux3":
                raise ConfigError(
                    "engine.prompt_upsampler is FLUX.3's; for other models use engine.prompt_enhancer"
                )
            where = settings.prompt_upsampler
            folder = (
                ensure_tiny_upsampler(data_dir / "models" / "tiny-flux3-pup")
                if where == "tiny"
                else Path(where)
            )
            engine.enhancer = Flux3Upsampler.load(folder, device.device, plan.dtype)
        if loaded.family == "flux1" or settings.preview in ("latent", "off"):  # TAEF1 is FLUX.1's
            engine.preview_decoder = preview_decoder(settings.preview, device.device, plan.dtype)
        else:
            raise ConfigError(
                'engine.preview: TAEF1 decodes FLUX.1 latents; for FLUX.2 use "latent" or "off"'
            )
        wanted = [
            (k, where)
            for k, where in ((KONTEXT, settings.kontext_in_use), (FILL, settings.fill_in_use))
            if where
        ]
        if wanted and loaded.family != "flux1":
            raise ConfigError(f"engine.{wanted[0][0].name} needs a FLUX.1 model")
        # Each extra is a transformer the size of the resident one (Fill's first layer is a little wider).
        size = sum(p.numel() * p.element_size() for p in loaded.pipe.transformer.parameters())
        engine.extra_policy = (
            extra_policy(settings.extra_models, device, size * len(wanted)) if wanted else "off"
        )
        if engine.extra_policy == "swap":
            if plan.compile != "off":
                raise ConfigError('engine.extra_models = "swap" with engine.compile is not supported yet')
            engine.swap = ExtraSwap(device.device)
        for kind, location in wanted:
            place = "cpu" if engine.swap is not None else None
            extra = load_extra(
                kind, location, loaded.pipe, plan, device, data_dir, hasher, settings.configs, place
            )
            setattr(engine, kind.name, extra)
        engine.speed_up()
        if engine.warmup_s is not None:
            record_warmup(data_dir, engine.info, engine.warmup_s, engine.warmup_graphs)
        return engine

    def speed_up(self) -> None:
        """The attention backend, then compilation and a warm-up (every graph a job will need is
        compiled now, not in the first user's job)."""
        transformers = [self.pipe.transformer] + [
            extra.pipe.transformer for extra in (self.kontext, self.fill) if extra is not None
        ]
        for transformer in transformers:
            apply_attention(transformer, self.info.attention)
        mode = self.info.plan.compile
        if mode == "off":
            return
        from engine.warmup import warm_up

        started, graphs = time.perf_counter(), compiled_graphs()
        for transformer in transformers:
            compile_transformer(transformer, mode, self.info.device.is_cuda)
        warm_up(self)
        self.warmup_s = time.perf_counter() - started
        self.warmup_graphs = compiled_graphs() - graphs
        log.info(
            "%s compile and warm-up: %.1f s, %d graphs (%s)",
            mode,
            self.warmup_s,
            self.warmup_graphs,
            self.info.attention.backend,
        )

    def set_memory_cap(self, gigabytes: float | None) -> None:
        """On CPU there is no OOM error before the kernel kills us: fail the job past this RSS instead."""
        self.memory_cap_bytes = None if gigabytes is None else int(gigabytes * 1024**3)

    def free_vram_gb(self) -> float | None:
        """Free memory on the engine's GPU now (None on CPU): what a scale-out worker advertises."""
        if not self.info.device.is_cuda:
            return None
        free, _ = torch.cuda.mem_get_info(torch.device(self.info.device.device))
        return free / 1024**3

    def resolve(self, request: GenerationRequest) -> DrawSpec:
        """A request checked against the engine's own presets and whitelist files."""
        return self.resolver.resolve(request).spec

    def generate(
        self,
        request: GenerationRequest,
        on_step: StepCallback | None = None,
        cancel: threading.Event | None = None,
        init_image: bytes | None = None,
        preview: PreviewEvery | None = None,
        references: Sequence[bytes] = (),
    ) -> GenerationResult:
        """A request resolved against the engine's own presets and whitelist files, then drawn (the
        CLI's and the benchmarks' way in; the bot resolves itself and calls `draw`)."""
        resolution = self.resolver.resolve(request)
        result = self.draw([resolution.spec], None, on_step, cancel, init_image, preview, references)[0]
        return replace(result, warnings=(*(str(w) for w in resolution.warnings), *result.warnings))

    def generate_batch(
        self,
        requests: Sequence[GenerationRequest],
        on_step: StepCallback | None = None,
        cancel: threading.Event | None = None,
        init_image: bytes | None = None,
        preview: PreviewEvery | None = None,
    ) -> list[GenerationResult]:
        """Several requests that batch together (same preset, size, LoRAs...) in one pipeline call."""
        specs = [self.resolve(r) for r in requests]
        return self.draw(specs, None, on_step, cancel, init_image, preview)

    def draw(
        self,
        specs: Sequence[DrawSpec],
        loras: Sequence[LoraUse] | None = None,
        on_step: StepCallback | None = None,
        cancel: threading.Event | None = None,
        init_image: bytes | None = None,
        preview: PreviewEvery | None = None,
        references: Sequence[bytes] = (),
        enhance_notes: Sequence[str | None] = (),
    ) -> list[GenerationResult]:
        """Specs (one, or several that batch together) -> images, seeds and recipes, in one pipeline
        call. Only the engine's own hard limits are checked: presets were the resolver's business.
        `loras`: the files of the specs' LoRAs (default: the engine's whitelist file); `init_image`:
        the stored PNG whose sha256 the spec names, and `references` those of its further reference
        images, in its order; with `preview`, `on_step` gets a JPEG of the picture forming that often;
        `enhance_notes`: what `enhance_ahead` said of each spec, when it enhanced them.
        Raises GenerationCancelled, OutOfMemory, RequestError."""
        first = self._check(specs)
        if self.info.family == "flux3" and len(specs) > 1:
            # FLUX.3 attends to each prompt's own padded window: prompts cannot share one call.
            return [
                result
                for spec in specs
                for result in self.draw([spec], loras, on_step, cancel, init_image, preview, references)
            ]
        uses = list(loras) if loras is not None else self.resolver.catalog.lora_uses(first)
        source = None
        if first.init_image is not None:
            if init_image is None:
                raise RequestError("this job draws from an input image, and none was given to the engine")
            source = decode_input(init_image, first.init_image)
        others = first.inputs[1:]  # its references, then its mask
        if len(references) != len(others):
            raise RequestError(
                "this job reads {wanted} more reference images, and the engine was given {given}",
                wanted=len(others),
                given=len(references),
            )
        more = [decode_input(data, sha) for data, sha in zip(references, others, strict=True)]
        mask = more.pop() if first.mask is not None else None
        if first.mode == "edit" and self.info.family == "flux2":
            for image in [source, *more]:
                if image is not None and (problem := reference_problem(*image.size)) is not None:
                    raise RequestError(problem)
        # An edit's enhancer (FLUX.3's upsampler) reads the references too, in the job's order.
        edited = [source, *more] if first.mode == "edit" and source is not None else []
        specs, notes = self._enhanced(specs, edited)
        if enhance_notes:  # one per spec, from enhance_ahead: such a note wins over one made here
            notes = [ahead or own for ahead, own in zip(enhance_notes, notes, strict=True)]
        if cancel is not None and cancel.is_set():  # cancelled while the enhancer answered
            raise GenerationCancelled(0, first.steps)
        with self._lock:
            started = time.perf_counter()
            if first.model_upscale:
                # 0. Upscale: the upscaler model enlarges the input; the pipeline redraws it at the
                # job's size (or, in mode "upscale", the enlargement is the result).
                assert source is not None  # an upscale spec has an input image
                source = self._model_upscaled(first, source, on_step, cancel)
            if first.mode == "upscale":
                assert source is not None
                encoded, all_cached = started, True
                run = _Run([_sized(source, first)], time.perf_counter(), 0, 0, NO_CACHE)
            else:
                encoded, all_cached, run = self._denoised(
                    specs, uses, on_step, cancel, source, preview, more, mask
                )
            finished = time.perf_counter()
        timings = Timings(
            encode_s=encoded - started,
            denoise_s=run.denoised_at - encoded,
            decode_s=finished - run.denoised_at,
            total_s=finished - started,
            steps=run.steps,
            embeds_cached=all_cached,
            computed_steps=run.computed_steps,
        )
        results, offset = [], 0
        for r, note in zip(specs, notes, strict=True):
            n = len(r.seeds)
            results.append(
                GenerationResult(
                    images=run.images[offset : offset + n],
                    seeds=list(r.seeds),
                    recipes=[self._recipe(r, seed, run, note) for seed in r.seeds],
                    timings=timings,
                    warnings=(note,) if note else (),
                )
            )
            offset += n
        return results

    def _denoised(
        self,
        specs: Sequence[DrawSpec],
        uses: list[LoraUse],
        on_step: StepCallback | None,
        cancel: threading.Event | None,
        source: Image.Image | None,
        preview: PreviewEvery | None,
        more: Sequence[Image.Image],
        mask: Image.Image | None,
    ) -> tuple[float, bool, _Run]:
        """LoRAs, prompts, then the pipeline: when encoding ended, whether every prompt's embedding
        came from the cache, and the run. Under the engine's lock."""
        first = specs[0]
        # 1. LoRAs: resident adapters, switched not reloaded.
        self.loras.activate(uses)
        lora_key = self.loras.text_encoder_signature(uses)
        # 2. Prompts -> embeddings, from the cache when this prompt was seen before.
        parts, all_cached = [], True
        for r in specs:
            embeds, cached = self._embeds(r.drawn_prompt, r.max_sequence_length, lora_key)
            parts.append(repeat_embeds(embeds, len(r.seeds)))
            all_cached &= cached
        negative = None
        if first.true_cfg > 1.0 or self._klein_base_cfg(first):
            empty, _ = self._embeds("", first.max_sequence_length, lora_key)
            negative = repeat_embeds(empty, sum(len(r.seeds) for r in specs))
        encoded = time.perf_counter()
        # 3. Denoise and decode: the pipeline's own loop, one generator per image for reproducibility.
        seeds = [s for r in specs for s in r.seeds]
        run = self._run(
            first, concat_embeds(parts), negative, seeds, on_step, cancel, source, preview, more, mask
        )
        return encoded, all_cached, run

    def _model_upscaled(
        self,
        spec: DrawSpec,
        source: Image.Image,
        on_step: StepCallback | None,
        cancel: threading.Event | None,
    ) -> Image.Image:
        """The input enlarged by the upscaler model, tile by tile (each tile reported as a step of an
        upscale-only job: it has no other progress to show)."""
        assert self.upscaler is not None  # _check refused the spec otherwise
        started = time.perf_counter()

        def on_tile(done: int, tiles: int) -> None:
            if on_step is not None and spec.mode == "upscale":
                on_step(StepProgress(done, tiles, time.perf_counter() - started))

        try:
            with torch.inference_mode():
                enlarged = self.upscaler.upscale(source, on_tile, cancel)
        except torch.OutOfMemoryError as exc:
            raise self._out_of_memory(spec, 1, exc) from exc
        log.info(
            "upscaled %dx%d -> %dx%d with %s in %.2f s",
            *source.size,
            *enlarged.size,
            self.upscaler.file.name,
            time.perf_counter() - started,
        )
        return enlarged

    def _check(self, specs: Sequence[DrawSpec]) -> DrawSpec:
        """The engine's own limits, whoever resolved the specs."""
        if not specs:
            raise RequestError("nothing to draw")
        first = specs[0]
        if len({s.batch_key for s in specs}) != 1:
            raise RequestError(
                "only specs with the same size, steps, guidance, LoRAs and cache batch together"
            )
        if first.family != self.info.family:
            raise RequestError(
                "that job needs a {family} model; this engine holds {loaded}",
                family=first.family,
                loaded=self.info.family,
            )
        if first.width % GRID or first.height % GRID:
            raise RequestError(
                "width and height must be multiples of {m} (got {size})", m=GRID, size=first.size
            )
        if first.pixels > MAX_PIXELS:
            raise RequestError(
                "{size} is above the engine's limit of {limit:.1f} MP",
                size=first.size,
                limit=MAX_PIXELS / 1e6,
            )
        if sum(s.batch_size for s in specs) > self.max_batch_size:
            raise RequestError("more than {most} images in one call", most=self.max_batch_size)
        preset = self.resolver.catalog.presets.get(first.preset)
        if preset is not None and preset.variants and self.info.variant not in preset.variants:
            # A bot whose engines are workers does not know their variant when it resolves.
            raise RequestError(
                "preset {preset} is for {variants}, but the loaded model is {loaded}",
                preset=first.preset,
                variants=", ".join(preset.variants),
                loaded=self.info.variant,
            )
        if first.mode == "img2img" and self.info.family != "flux1":
            raise RequestError(
                "image-to-image needs a FLUX.1 model (this engine holds {family})", family=self.info.family
            )
        if first.mode == "edit" and self.info.family == "flux1" and self.kontext is None:
            raise RequestError("edits need FLUX.1 Kontext, and this engine has none (engine.kontext)")
        if first.mode == "inpaint" and self.fill is None:
            raise RequestError("inpainting needs FLUX.1 Fill, and this engine has none (engine.fill)")
        if first.model_upscale:
            if self.upscaler is None:
                raise RequestError(
                    "this job upscales with a model, and this engine has none (engine.upscaler)"
                )
            if first.upscaler is not None and first.upscaler != self.upscaler.sha256:
                raise RequestError(
                    "this job was upscaled with another upscaler model (sha256 {wanted}…); this engine "
                    "has {name} ({sha}…)",
                    wanted=first.upscaler[:12],
                    name=self.upscaler.file.name,
                    sha=self.upscaler.sha256[:12],
                )
        edited = 1 + len(first.references) if first.mode == "edit" else 1
        if (problem := reference_count_problem(self.info.family, edited)) is not None:
            raise RequestError(problem)
        return first

    def _klein_base_cfg(self, spec: DrawSpec) -> bool:
        """FLUX.2 klein base runs real CFG at guidance > 1 with an empty prompt's embedding, which the
        pipeline would encode once for the whole batch: the engine hands it one per image instead."""
        distilled = getattr(getattr(self.pipe, "config", None), "is_distilled", True)
        return self.info.family == "flux2" and not distilled and (spec.guidance or 1.0) > 1.0

    def _embeds(self, prompt: str, max_len: int, lora_key: tuple[Any, ...]) -> tuple[Embeds, bool]:
        def encode() -> Embeds:
            with torch.inference_mode():
                return self._family.encode(self.pipe, prompt, max_len)

        return self.embed_cache.get_or_encode((prompt, max_len, lora_key), encode)

    def _run(
        self,
        params: DrawSpec,
        embeds: Embeds,
        negative: Embeds | None,
        seeds: list[int],
        on_step: StepCallback | None,
        cancel: threading.Event | None,
        source: Image.Image | None = None,
        preview: PreviewEvery | None = None,
        more: Sequence[Image.Image] = (),
        mask: Image.Image | None = None,
    ) -> _Run:
        start = time.perf_counter()
        last_step = [start]
        previews = (
            PreviewMaker(
                params.height,
                params.width,
                preview,
                self.preview_decoder,
                unpack_flux2_latents if self.info.family in ("flux2", "flux3") else unpack_latents,
            )
            if preview is not None and on_step is not None and self.preview_decoder is not None
            else None
        )

        def step_end(pipe: Any, index: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            last_step[0] = time.perf_counter()
            if on_step is not None:
                scheduler = pipe.scheduler
                shown = (
                    previews.after_step(
                        tensors["latents"], scheduler.sigmas, scheduler.step_index, last_step[0]
                    )
                    if previews is not None
                    else None
                )
                # img2img runs only the last `strength` part of the schedule.
                total = getattr(pipe, "num_timesteps", None) or params.steps
                on_step(StepProgress(index + 1, total, last_step[0] - start, shown))
            if cancel is not None and cancel.is_set():
                # Raising stops the loop now; the pipeline's interrupt flag would still decode.
                raise GenerationCancelled(index + 1, params.steps)
            if self.memory_cap_bytes is not None and process_rss() > self.memory_cap_bytes:
                raise torch.OutOfMemoryError(f"process memory above engine.memory_cap_gb at step {index + 1}")
            return tensors

        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        if self.info.family == "flux3":
            images = self._run_flux3(params, embeds, negative, generators, step_end, source, more)
            return _Run(images, last_step[0], params.steps, params.steps, NO_CACHE)
        pipe = self.pipe
        extra: dict[str, Any] = {}
        if source is not None and params.mode == "edit" and self.info.family == "flux2":
            # FLUX.2 klein reads its references itself (each scaled to at most 1 MP on its grid) as
            # tokens beside the picture's: the resident model edits, with no second transformer.
            extra = {"image": [source, *more]}
        elif source is not None:
            # Resized here to the job's size (Lanczos): an upscale is this resize, then a light redraw.
            images = [source.resize((params.width, params.height), Image.Resampling.LANCZOS)] * len(seeds)
            if params.mode == "inpaint":
                assert self.fill is not None and mask is not None  # _check refused it otherwise
                if self.swap is not None:
                    self.swap.bring(self.fill)
                pipe = self.fill.pipe
                mask = mask.convert("L").resize((params.width, params.height), Image.Resampling.LANCZOS)
                extra = {"image": images, "mask_image": [mask] * len(seeds)}
            elif params.mode == "edit":
                assert self.kontext is not None  # generate_batch refused the edit otherwise
                if self.swap is not None:
                    self.swap.bring(self.kontext)
                pipe = self.kontext.pipe
                # Kontext would resize to its preferred sizes and rescale to max_area (1 MP): the
                # job's own size and area keep the picture at the size asked for.
                extra = {"image": images, "_auto_resize": False, "max_area": params.width * params.height}
            else:
                pipe = self._img2img()
                extra = {"image": images, "strength": params.strength}
        # Large jobs (upscales) decode in tiles; a plan that tiles everything already is left as it is.
        tiled = params.width * params.height / 1e6 > self.vae_tiling_above_mp and not pipe.vae.use_tiling
        cache = self._cache_for(params, pipe, source is not None)
        try:
            if tiled:
                pipe.vae.enable_tiling()  # large upscales: decode in tiles, not one huge activation
            with torch.inference_mode(), cached_run(pipe.transformer, cache, params.steps) as full_runs:
                family_kwargs = self._family.call_kwargs(params, negative)
                if params.mode == "inpaint":
                    family_kwargs.pop("true_cfg_scale", None)  # FluxFillPipeline has no true CFG
                out = pipe(
                    **embeds,
                    **family_kwargs,
                    **extra,
                    height=params.height,
                    width=params.width,
                    num_inference_steps=params.steps,
                    num_images_per_prompt=1,
                    generator=generators,
                    callback_on_step_end=step_end,
                )
        except torch.OutOfMemoryError as exc:
            raise self._out_of_memory(params, len(seeds), exc) from exc
        finally:
            if tiled:
                pipe.vae.disable_tiling()
        steps = int(getattr(pipe, "num_timesteps", 0) or params.steps)
        computed = steps
        if full_runs is not None:
            # true CFG: two transformer calls a step (FluxPipeline caches each on its own)
            computed = min(steps, round(full_runs.calls / (2 if params.true_cfg > 1.0 else 1)))
        images = list(out.images)
        if params.mode == "inpaint" and mask is not None and source is not None:
            # Only the mask's part is repainted: outside it the picture is the input's own pixels,
            # not their trip through the VAE (soft mask edges blend).
            kept = source.resize((params.width, params.height), Image.Resampling.LANCZOS)
            images = [Image.composite(image.convert("RGB"), kept, mask) for image in images]
        return _Run(images, last_step[0], steps, computed, cache)

    def _run_flux3(
        self,
        params: DrawSpec,
        embeds: Embeds,
        negative: Embeds | None,
        generators: list[torch.Generator],
        step_end: Callable[[Any, int, Any, dict[str, Any]], dict[str, Any]],
        source: Image.Image | None,
        more: Sequence[Image.Image],
    ) -> list[Any]:
        """FLUX.3's modular pipeline (engine/flux3.py): the same step contract through its step hook;
        references (edits) as its `image` input, which it reads beside the picture itself."""

        def hook(components: Any, index: int, timestep: Any, latents: torch.Tensor) -> None:
            step_end(components, index, timestep, {"latents": latents})

        set_guidance(self.pipe, params.true_cfg)
        extra: dict[str, Any] = {"image": [source, *more]} if source is not None else {}
        try:
            with torch.inference_mode():
                images: list[Any] = self.pipe(
                    **embeds,
                    **self._family.call_kwargs(params, negative),
                    **extra,
                    height=params.height,
                    width=params.width,
                    num_inference_steps=params.steps,
                    num_images_per_prompt=1,
                    generator=generators,
                    step_callback=hook,
                    output="images",
                )
        except torch.OutOfMemoryError as exc:
            raise self._out_of_memory(params, len(generators), exc) from exc
        return images

    def _out_of_memory(self, params: DrawSpec, images: int, exc: Exception) -> OutOfMemory:
        """What a job that did not fit says (memory freed first, so the next job starts clean)."""
        self._free_memory()
        log.warning("out of memory at %dx%d x%d (%s)", params.width, params.height, images, exc)
        return OutOfMemory(
            f"Out of memory drawing {params.width}x{params.height}"
            + (f" x{images}" if images > 1 else "")
            + f" with preset {params.preset}: try a smaller size, fewer images or a lighter preset."
        )

    def _cache_for(self, params: DrawSpec, pipe: Any, from_image: bool) -> StepCache:
        """The cache this job can run with. img2img and Kontext name no transformer call of their
        own, so one context serves the whole call: with true CFG (two calls a step) they run
        uncached. MagCache's ratios follow a full schedule: text-to-image only."""
        cache = params.cache
        if not cache.on:
            return cache
        if pipe is not self.pipe and params.true_cfg > 1.0:
            return NO_CACHE
        if cache.kind == "magcache" and from_image:
            return NO_CACHE
        return cache

    def _img2img(self) -> Any:
        """diffusers' img2img pipeline over the resident components (from_pipe: the same modules,
        no second copy of any weight), made on first use."""
        if self._img2img_pipe is None:
            from diffusers import FluxImg2ImgPipeline

            self._img2img_pipe = FluxImg2ImgPipeline.from_pipe(self.pipe)
            self._img2img_pipe.set_progress_bar_config(disable=True)
        return self._img2img_pipe

    def _recipe(self, r: DrawSpec, seed: int, run: _Run, enhance_note: str | None = None) -> Recipe:
        extra = {"edit": self.kontext, "inpaint": self.fill}.get(r.mode)
        files = extra.files if extra is not None else None
        upscaler = None
        if r.model_upscale and self.upscaler is not None:
            upscaler = (self.upscaler.files, self.upscaler.run_description)
        return make_recipe(
            self.info,
            self._versions,
            r,
            seed,
            files,
            str(run.cache),
            run.computed_steps,
            enhance_note,
            upscaler,
        )

    @property
    def enhances_ahead(self) -> bool:
        """The enhancer is an endpoint elsewhere (not a model on this device): a job can be enhanced
        ahead of its turn, in another thread, while the engine draws the job before it."""
        return isinstance(self.enhancer, EndpointEnhancer)

    def enhance_ahead(self, spec: DrawSpec) -> tuple[DrawSpec, str | None]:
        """`spec` with its enhancement made (or, when the enhancer failed, drawn as written, and why).
        Blocking, and safe beside a running draw: it takes no lock and touches no model."""
        if not self.enhances_ahead or spec.mode == "edit":
            return spec, None
        (enhanced,), (note,) = self._enhanced([spec])
        return enhanced, note

    def _enhanced(
        self, specs: Sequence[DrawSpec], images: Sequence[Image.Image] = ()
    ) -> tuple[list[DrawSpec], list[str | None]]:
        """Each spec that asks for an enhancement and has none yet, with its enhanced prompt. A failed
        enhancement does not fail the job: the spec draws its prompt as written (enhance off, so a
        rerun of it draws the same), and the note says why. Runs before the engine's lock: an
        endpoint's seconds keep no one else from the model."""
        out: list[DrawSpec] = []
        notes: list[str | None] = []
        for spec in specs:
            if not spec.needs_enhancement or spec.mode == "upscale":  # an upscale reads no prompt
                out.append(spec)
                notes.append(None)
                continue
            try:
                if self.enhancer is None:
                    raise EnhancerError("this engine has no prompt enhancer (engine.prompt_enhancer)")
                started = time.perf_counter()
                expanded = self.enhancer.enhance(spec.prompt, images)
                log.info("prompt enhanced by %s in %.1f s", self.enhancer.name, time.perf_counter() - started)
            except EnhancerError as exc:
                log.warning("drawing the prompt as written: %s (%r)", exc, exc.__cause__)
                out.append(spec.model_copy(update={"enhance": False}))
                notes.append(str(exc))
                continue
            out.append(spec.model_copy(update={"enhanced_prompt": expanded}))
            notes.append(None)
        return out, notes

    def _free_memory(self) -> None:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _sized(picture: Image.Image, spec: DrawSpec) -> Image.Image:
    """The picture at the spec's size (Lanczos), as it is when it already has it."""
    size = (spec.width, spec.height)
    return picture if picture.size == size else picture.resize(size, Image.Resampling.LANCZOS)


@dataclass(frozen=True)
class _Run:
    """One pipeline call: its images, when denoising ended, steps run and how many ran in full."""

    images: list[Any]
    denoised_at: float
    steps: int
    computed_steps: int
    cache: StepCache
