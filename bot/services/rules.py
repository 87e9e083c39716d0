"""The presets and LoRA whitelist in force now, as one replaceable snapshot (see engine/catalog.py)."""

from __future__ import annotations

from engine.catalog import Catalog
from engine.resolve import RequestResolver
from engine.spec import DrawSpec
from engine.whitelist import LoraUse


class LiveRules:
    """Holds the resolver every admission uses. Admins replace its catalog (`publish`); nothing
    changes a catalog in place, so a request in flight keeps the snapshot it started with. Executors
    read the LoRA files of a job from here when they hand it out."""

    def __init__(self, resolver: RequestResolver) -> None:
        self._resolver = resolver

    @property
    def resolver(self) -> RequestResolver:
        return self._resolver

    @property
    def catalog(self) -> Catalog:
        return self._resolver.catalog

    def publish(self, catalog: Catalog) -> None:
        self._resolver = self._resolver.with_catalog(catalog)

    def lora_uses(self, spec: DrawSpec) -> list[LoraUse]:
        """The files of a job's LoRAs now; LoraError when one was withdrawn since it was stored."""
        return self.catalog.lora_uses(spec)
