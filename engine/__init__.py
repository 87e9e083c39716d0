"""The image engine: one resident FLUX pipeline behind a small typed API. Never imports bot/ or discord."""

from engine.api import GenerationRequest, GenerationResult, LoraChoice, Recipe, ResolvedRequest, StepProgress
from engine.engine import FluxEngine
from engine.errors import (
    ConfigError,
    EngineError,
    GenerationCancelled,
    LoraError,
    ModelLoadError,
    QuantizationError,
    RequestError,
)
from engine.settings import EngineSettings

__all__ = [
    "ConfigError",
    "EngineError",
    "EngineSettings",
    "FluxEngine",
    "GenerationCancelled",
    "GenerationRequest",
    "GenerationResult",
    "LoraChoice",
    "LoraError",
    "ModelLoadError",
    "QuantizationError",
    "Recipe",
    "RequestError",
    "ResolvedRequest",
    "StepProgress",
]
