"""Seconds per image: step caching (per preset), compilation and the attention backend.

Everything here goes through diffusers' own switches: `transformer.enable_cache(...)` with its
FirstBlockCache / TaylorSeer / MagCache configs, `compile_repeated_blocks` (regional compilation) or
`torch.compile` of the whole transformer, and `set_attention_backend`. What fluxbot adds is the
typed settings, when each is applied (a cache per job, compilation once at start), counting how many
steps ran the full transformer, and refusing what cannot run here in one line.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from engine.errors import ConfigError, last_line
from engine.quant import DeviceInfo
from engine.step_cache import TAYLORSEER_WARMUP_STEPS, StepCache

log = logging.getLogger(__name__)


def diffusers_cache_config(cache: StepCache, steps: int) -> Any:
    """diffusers' config object for a job of `steps` transformer calls (None: no cache)."""
    import diffusers

    if cache.kind == "fbcache":
        return diffusers.FirstBlockCacheConfig(threshold=cache.threshold)
    if cache.kind == "taylorseer":
        # Lite: on predicted steps every block is skipped and only the output is predicted, so the
        # saving is the whole transformer and the cache holds one small tensor, not a Taylor
        # series per attention layer (several GB at 1 MP).
        return diffusers.TaylorSeerCacheConfig(
            cache_interval=cache.interval,
            max_order=cache.order,
            disable_cache_before_step=TAYLORSEER_WARMUP_STEPS,
            use_lite_mode=True,
            taylor_factors_dtype=torch.float32,
        )
    if cache.kind == "magcache":
        from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS

        return diffusers.MagCacheConfig(
            threshold=cache.threshold, num_inference_steps=steps, mag_ratios=FLUX_MAG_RATIOS
        )
    return None


# What the engine runs a cached job with: how many transformer calls did the full work.


class FullRuns(Protocol):
    """Counts the calls of one block's own forward (see `full_runs_hook`)."""

    name: str
    calls: int


@functools.cache
def _full_runs_class() -> type[Any]:
    """Made once per process (a class made per job would be a new type to torch.compile's guards,
    and recompile every time); imported late, as diffusers pulls in torchao and friends."""
    from diffusers.hooks import ModelHook

    class FullRunsHook(ModelHook):  # type: ignore[misc]  # diffusers is untyped
        """Registered before the cache's hooks, so it sits inside them: a step the cache skips or
        predicts never reaches it."""

        name = "fluxbot_full_runs"

        def __init__(self) -> None:
            super().__init__()
            self.calls = 0

        @torch.compiler.disable  # type: ignore[untyped-decorator]
        def count(self) -> None:
            self.calls += 1

        def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
            self.count()
            return self.fn_ref.original_forward(*args, **kwargs)

    return FullRunsHook


@contextlib.contextmanager
def cached_run(transformer: Any, cache: StepCache, steps: int) -> Iterator[FullRuns | None]:
    """The cache applied to `transformer` for one pipeline call, and removed after it (so the next
    job's pixels never depend on this one). Yields the full-run counter, or None without a cache.

    Pipelines that do not name their transformer calls (img2img, Kontext) run inside one "cond"
    context; FluxPipeline sets its own per call."""
    config = diffusers_cache_config(cache, steps)
    if config is None:
        yield None
        return
    from diffusers.hooks import HookRegistry

    tail = _tail_block(transformer)
    registry = HookRegistry.check_if_exists_or_initialize(tail)
    counter: FullRuns = _full_runs_class()()
    registry.register_hook(counter, counter.name)
    try:
        transformer.enable_cache(config)
        try:
            with transformer.cache_context("cond"):
                yield counter
        finally:
            transformer.disable_cache()
    finally:
        registry.remove_hook(counter.name, recurse=False)


def _tail_block(transformer: Any) -> torch.nn.Module:
    """The last transformer block (what every cache skips, or predicts past, on a cached step)."""
    for name in ("single_transformer_blocks", "transformer_blocks"):
        blocks = getattr(transformer, name, None)
        if isinstance(blocks, torch.nn.ModuleList) and len(blocks):
            return blocks[-1]
    raise ConfigError(f"{transformer.__class__.__name__} has no transformer blocks to cache")


# Compilation


def compile_transformer(transformer: Any, mode: str, on_cuda: bool) -> None:
    """Regional: each repeated block compiled once (diffusers' compile_repeated_blocks: FLUX.1 has two
    block kinds); full: the whole transformer. Dynamic shapes, so sizes, aspects and batch sizes share
    graphs after the warm-up instead of compiling one each."""
    if mode == "off":
        return
    # One server keeps a handful of variants (sizes, batch, each preset's cache): more than dynamo's
    # default of 8 per function, which would drop the rest to eager without an error.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    if mode == "regional":
        transformer.compile_repeated_blocks(dynamic=True)
    else:
        # Autotuned GEMMs pay off on a GPU; on a CPU they only lengthen the compile.
        kwargs = {"mode": "max-autotune-no-cudagraphs"} if on_cuda else {}
        transformer.compile(dynamic=True, **kwargs)


def compiled_graphs() -> int:
    """Graphs torch has compiled in this process so far (the warm-up's count, and recompiles after)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


# Attention backends: (module that must import, needs CUDA) for each family of diffusers' names.
_BACKEND_NEEDS: tuple[tuple[str, str | None, bool], ...] = (
    ("_native_npu", "torch_npu", False),
    ("_native_xla", "torch_xla", False),
    ("_native_", None, True),  # _native_cudnn / _flash / _efficient: SDPA kernels that exist on CUDA
    ("native", None, False),
    ("flex", None, False),
    ("_flash_3_hub", "kernels", True),
    ("_flash_3", "flash_attn_interface", True),
    ("_flash_varlen_3", "flash_attn_interface", True),
    ("flash", "flash_attn", True),
    ("aiter", "kernels", True),
    ("sage_hub", "kernels", True),
    ("sage_blackwell_hub", "kernels", True),
    ("_sage", "sageattention", True),
    ("sage", "sageattention", True),
    ("xformers", "xformers", True),
)


@dataclass(frozen=True)
class AttentionChoice:
    backend: str  # a diffusers AttentionBackendName value
    why: str


NATIVE_ATTENTION = AttentionChoice("native", "PyTorch SDPA")


def attention_backends() -> list[str]:
    from diffusers.models.attention_dispatch import AttentionBackendName

    return sorted(member.value for member in AttentionBackendName)


def choose_attention(setting: str, device: DeviceInfo) -> AttentionChoice:
    """What `engine.attention` means on this host; ConfigError (one line) for a backend it lacks."""
    name = setting.strip().lower()
    if name == "auto":
        if device.compute_capability is not None and device.compute_capability[0] == 9:
            if importlib.util.find_spec("flash_attn_interface") is not None:
                return AttentionChoice("_flash_3", "auto: Hopper GPU with FlashAttention 3 installed")
            return AttentionChoice(
                "native",
                "auto: Hopper GPU without FlashAttention 3 (flash_attn_interface) installed: SDPA",
            )
        where = device.name if device.is_cuda else "CPU"
        return AttentionChoice("native", f"auto: PyTorch SDPA on {where}")
    known = attention_backends()
    if name not in known:
        raise ConfigError(
            f"engine.attention = {setting[:40]!r} is not a diffusers attention backend; use auto, native, "
            "flash, _flash_3, sage, xformers, flex or another of diffusers' names"
        )
    module, needs_cuda = next(
        ((mod, cuda) for prefix, mod, cuda in _BACKEND_NEEDS if name.startswith(prefix)), (None, True)
    )
    if needs_cuda and not device.is_cuda:
        raise ConfigError(
            f"engine.attention = {name!r} needs a CUDA GPU; on this host use 'native' or 'auto'"
        )
    if module is not None and importlib.util.find_spec(module) is None:
        raise ConfigError(
            f"engine.attention = {name!r} needs the {module} package, which is not installed: install it "
            "or use 'auto'"
        )
    return AttentionChoice(name, f"set by the operator (engine.attention = {name!r})")


def apply_attention(transformer: Any, choice: AttentionChoice) -> None:
    """Native SDPA is diffusers' default; anything else is set (and checked again) by diffusers."""
    if choice.backend == "native":
        return
    try:
        transformer.set_attention_backend(choice.backend)
    except (RuntimeError, ValueError, ImportError, OSError) as exc:
        raise ConfigError(f"engine.attention = {choice.backend!r} cannot run here: {last_line(exc)}") from exc
