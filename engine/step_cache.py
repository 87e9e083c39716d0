"""Step caching as data: the typed value of a preset's `cache` field (torch-free, so the bot and the
presets read it without loading the engine's libraries)."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer, ValidationError

from engine.errors import RequestError, first_problem

CacheKind = Literal["none", "fbcache", "taylorseer", "magcache"]
FBCACHE_DEFAULT = 0.08  # what Hugging Face measured on FLUX.1-dev: 1.4x on a compiled model
MAGCACHE_DEFAULT = 0.06  # diffusers' default
TAYLORSEER_WARMUP_STEPS = 3  # diffusers' default: the first steps always run in full
_CACHE_TEXT = re.compile(r"^(none|fbcache|taylorseer|magcache)(?::([^:]+))?(?::([^:]+))?$")
CACHE_FORMS = '"none", "fbcache:<threshold>", "taylorseer:<interval>[:<order>]" or "magcache[:<threshold>]"'


class StepCache(BaseModel):
    """A step cache, parsed once from its text form: which steps may reuse (or predict) the
    transformer's output instead of running it.

    - fbcache:<threshold>  First Block Cache: the rest of the transformer is skipped while the first
      block's output changes less than `threshold` (relative) from the last full step.
    - taylorseer:<interval>[:<order>]  TaylorSeer (diffusers' lite variant): after the first 3 steps,
      one full step in `interval`, the output in between predicted by a Taylor series of `order`.
    - magcache[:<threshold>]  MagCache with the FLUX.1 magnitude ratios diffusers ships.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: CacheKind = "none"
    threshold: float | None = Field(None, gt=0.0, le=1.0)
    interval: int | None = Field(None, ge=2, le=20)
    order: int | None = Field(None, ge=1, le=4)

    @classmethod
    def parse(cls, text: str) -> StepCache:
        """The typed value of a preset's `cache` text; ValueError naming the accepted forms."""
        m = _CACHE_TEXT.match(text.strip().lower())
        if m is None:
            raise ValueError(f"cache {text[:40]!r} is not one of {CACHE_FORMS}")
        kind, first, second = m[1], m[2], m[3]
        try:
            if kind == "none" and first is None:
                return cls()
            if kind in ("fbcache", "magcache") and second is None:
                default = FBCACHE_DEFAULT if kind == "fbcache" else MAGCACHE_DEFAULT
                return cls(kind=kind, threshold=float(first) if first is not None else default)
            if kind == "taylorseer" and first is not None:
                return cls(kind=kind, interval=int(first), order=int(second) if second is not None else 1)
        except ValidationError as exc:  # a number out of range
            raise ValueError(f"cache {text[:40]!r}: {first_problem(exc)!s}") from None
        except ValueError:  # not a number
            raise ValueError(
                f"cache {text[:40]!r}: numbers expected (a threshold like fbcache:0.08, whole numbers "
                "like taylorseer:4:1)"
            ) from None
        raise ValueError(f"cache {text[:40]!r} is not one of {CACHE_FORMS}")

    @property
    def on(self) -> bool:
        return self.kind != "none"

    def __str__(self) -> str:
        if self.kind in ("fbcache", "magcache"):
            return f"{self.kind}:{self.threshold:g}"
        if self.kind == "taylorseer":
            return f"taylorseer:{self.interval}:{self.order}"
        return "none"

    def check_family(self, family: str) -> None:
        if self.on and family == "flux3":
            raise RequestError(
                "step caches are not wired for FLUX.3 yet (its modular pipeline has no cache hooks here)"
            )
        if self.kind == "magcache" and family != "flux1":
            raise RequestError(
                "magcache needs magnitude ratios calibrated for the model, and diffusers ships them for "
                "FLUX.1 only (this model is {family}): use fbcache or taylorseer",
                family=family,
            )


def _to_step_cache(value: object) -> object:
    if isinstance(value, str):
        return StepCache.parse(value)
    return value


# A preset's `cache` field: text in TOML, JSON and Discord ("fbcache:0.08"), a StepCache in memory.
StepCacheField = Annotated[
    StepCache, BeforeValidator(_to_step_cache), PlainSerializer(str, return_type=str, when_used="always")
]
NO_CACHE = StepCache()
