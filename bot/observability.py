"""Prometheus metrics and /healthz on one port. One registry per app: no global collectors."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:
    from engine.engine import FluxEngine

log = logging.getLogger(__name__)
STEP_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8)
JOB_BUCKETS = (0.5, 1, 2, 5, 10, 20, 40, 60, 120, 300, 600)


class Metrics:
    """What the queue and the studio count. Tests read the same registry the endpoint serves."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.queue_depth = Gauge("fluxbot_queue_jobs", "Jobs by state", ["state"], registry=self.registry)
        self.jobs = Counter("fluxbot_jobs", "Finished jobs by outcome", ["outcome"], registry=self.registry)
        self.job_seconds = Histogram(
            "fluxbot_job_seconds", "Engine time per job", buckets=JOB_BUCKETS, registry=self.registry
        )
        self.step_seconds = Histogram(
            "fluxbot_step_seconds", "Seconds per denoising step", buckets=STEP_BUCKETS, registry=self.registry
        )
        self.rejections = Counter(
            "fluxbot_rejections", "Requests refused, by reason", ["reason"], registry=self.registry
        )
        self.steps = Counter(
            "fluxbot_denoise_steps",
            "Denoising steps of finished jobs: run in full, or skipped/predicted by a step cache",
            ["run"],
            registry=self.registry,
        )

    def watch_engine(self, engine: FluxEngine) -> None:
        """The in-process engine's own counters (memory, caches), read at scrape time."""
        from bot.engine_metrics import EngineCollector  # torch: only where an engine runs

        self.registry.register(EngineCollector(engine))

    def render(self) -> bytes:
        return generate_latest(self.registry)


HealthCheck = Callable[[], Awaitable[dict[str, bool]]]
HealthDetails = Callable[[], Awaitable[dict[str, Any]]]


async def serve(
    metrics: Metrics, health: HealthCheck, host: str, port: int, details: HealthDetails | None = None
) -> web.AppRunner:
    """GET /metrics (Prometheus text) and GET /healthz (200 when every check passes, else 503; the
    body is every check's boolean, plus `details`, such as the engines' compile and warm-up)."""

    async def metrics_view(request: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), headers={"Content-Type": "text/plain; version=0.0.4"})

    async def health_view(request: web.Request) -> web.Response:
        checks = await health()
        extra = await details() if details is not None else {}
        return web.json_response({**checks, **extra}, status=200 if all(checks.values()) else 503)

    app = web.Application()
    app.router.add_get("/metrics", metrics_view)
    app.router.add_get("/healthz", health_view)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    log.info("metrics and health on http://%s:%d/metrics, /healthz", host, port)
    return runner
