"""/metrics from the in-process engine: memory and its caches, read at scrape time (local mode only)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from engine.engine import FluxEngine
from engine.info import process_rss


class EngineCollector(Collector):
    """Read at scrape time from the engine's own counters, so nothing is counted twice."""

    def __init__(self, engine: FluxEngine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Any]:
        memory = GaugeMetricFamily(
            "fluxbot_engine_memory_bytes", "VRAM allocated on CUDA, else process RSS", labels=["kind"]
        )
        if self.engine.info.device.is_cuda:
            memory.add_metric(["vram"], float(torch.cuda.memory_allocated()))
        memory.add_metric(["rss"], float(process_rss()))
        yield memory
        cache = self.engine.embed_cache
        embeds = CounterMetricFamily(
            "fluxbot_embed_cache", "Prompt-embedding cache lookups", labels=["result"]
        )
        embeds.add_metric(["hit"], cache.hits)
        embeds.add_metric(["miss"], cache.misses)
        yield embeds
        loras = CounterMetricFamily(
            "fluxbot_lora_cache", "LoRA activations: resident hit or load", labels=["result"]
        )
        loras.add_metric(["hit"], self.engine.loras.hits)
        loras.add_metric(["load"], self.engine.loras.loads)
        yield loras
