"""The one settings tree: env vars FLUXBOT_* (nested with __), then config/fluxbot.toml, then defaults."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from engine.settings import TINY_MODELS, EngineSettings

DEFAULT_CONFIG_FILE = Path("config/fluxbot.toml")


def config_file_path() -> Path:
    """The optional TOML file; FLUXBOT_CONFIG points elsewhere."""
    return Path(os.environ.get("FLUXBOT_CONFIG", DEFAULT_CONFIG_FILE))


class LimitSettings(BaseModel):
    """Defaults for every user; admins change them from Discord (stored in the database)."""

    model_config = ConfigDict(extra="forbid")

    jobs_per_window: int = Field(5, ge=1, le=1000, description="jobs a user may start per window")
    window_s: float = Field(60.0, gt=0, le=86400)
    max_queued_per_user: int = Field(3, ge=1, le=100)
    max_queue: int = Field(100, ge=1, le=100_000, description="jobs waiting across all users")


class DeliverySettings(BaseModel):
    """How results reach Discord when it is slow or failing (discord.py already retries each request)."""

    model_config = ConfigDict(extra="forbid")

    retry_first_s: float = Field(2.0, gt=0, le=600, description="pause before the first redelivery")
    retry_max_s: float = Field(60.0, gt=0, le=3600, description="longest pause between redeliveries")
    horizon_s: float = Field(
        86400.0, gt=0, description="give up on delivering a result this long after it finished"
    )


class WorkerSettings(BaseModel):
    """Scale-out mode (queue = redis://...): how engine workers run and how the bot reaches them."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
        description="this worker's name in /admin workers; default: <host>-<pid>",
    )
    images: Literal["redis", "shared"] = Field(
        "redis",
        description="how PNGs reach the bot: inside the job result in Redis, or as files in a data_dir "
        "that the bot and the workers share (one volume, mounted at the same path)",
    )
    heartbeat_s: float = Field(1.0, gt=0, le=60, description="how often a worker refreshes its entry")
    dead_after_s: float = Field(
        6.0, gt=0, le=600, description="a worker silent this long is dead: its job goes to another"
    )
    job_timeout_s: float = Field(900.0, gt=0, le=86400, description="arq cancels a job running this long")
    max_tries: int = Field(2, ge=1, le=10, description="runs per job when workers die (2 = one retry)")
    family: Literal["auto", "flux1", "flux2", "flux3"] = Field(
        "auto",
        description="model family the bot checks requests against when it holds no engine; "
        "auto: flux2 for 'tiny-flux2', flux3 for 'tiny-flux3', else flux1",
    )

    @model_validator(mode="after")
    def _dead_after_heartbeats(self) -> WorkerSettings:
        if self.dead_after_s < 2 * self.heartbeat_s:
            raise ValueError("workers.dead_after_s must be at least twice workers.heartbeat_s")
        return self


class SafetySettings(BaseModel):
    """The content policy beside the nsfw flags of presets and LoRAs (see README, Safety and privacy)."""

    model_config = ConfigDict(extra="forbid")

    blocked_terms: list[str] = Field(
        default_factory=list,
        description="prompts with these words are refused; the starting list, which admins then change "
        "with /admin blocklist (stored in the database, audited)",
    )
    classifier: str | None = Field(
        None,
        description="a transformers image-classification model (hub id or folder) that checks every "
        "image after decoding; unset: off",
    )
    threshold: float = Field(0.5, ge=0.0, le=1.0, description="a flagged label scoring at least this flags")
    flagged_labels: list[str] = Field(
        default_factory=lambda: ["nsfw", "porn", "hentai", "sexy", "explicit", "unsafe"],
        description="the classifier's labels (case-insensitive) that count as sexual content",
    )
    flagged_action: Literal["withhold", "spoiler"] = Field(
        "withhold",
        description="a flagged image outside age-restricted channels: not sent, or sent as a spoiler",
    )


class ImageSettings(BaseModel):
    """Image in, image out: what an attached image may be, and the live previews while drawing."""

    model_config = ConfigDict(extra="forbid")

    max_input_mb: float = Field(
        10.0, gt=0, le=500, description="largest attachment taken as an input image (Discord allows 25 MB+)"
    )
    max_input_megapixels: float = Field(
        40.0, gt=0, le=400, description="larger images are refused before they are decoded"
    )
    previews: bool = Field(True, description="show the picture forming in the progress message")
    preview_every_steps: int | None = Field(
        None, ge=1, le=200, description="a preview every N steps; unset: one per progress_interval_s"
    )


class Settings(BaseSettings):
    """Root of all fluxbot settings. Sections are sub-models so each part sees only its own."""

    model_config = SettingsConfigDict(
        env_prefix="FLUXBOT_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    data_dir: Path = Path("data")
    log_level: str = "INFO"
    log_json: bool = Field(False, description="one JSON object per log line (for log shippers)")
    discord_token: SecretStr | None = Field(None, description="The bot's token; never logged.")
    discord_api_base: str = Field(
        "https://discord.com/api/v10", description="REST base (a proxy, or a test server)"
    )
    discord_gateway_url: str = Field("wss://gateway.discord.gg/", description="Gateway websocket URL")
    database_url: str | None = Field(None, description="default: sqlite+aiosqlite:///<data_dir>/fluxbot.db")
    guild_ids: list[int] = Field(
        default_factory=list, description="sync commands to these guilds; empty: global"
    )
    admin_role_ids: list[int] = Field(default_factory=list)
    admin_user_ids: list[int] = Field(default_factory=list)
    # Servers whose own admins (Manage Server) may change that server's role and channel rules; off
    # by default: only the admins above change anything.
    server_admin_guilds: list[int] = Field(default_factory=list)
    admin_permission: str = Field(
        "manage_guild", description="Discord permission that shows /admin in the UI"
    )
    progress_interval_s: float = Field(
        1.5, ge=0.2, le=60, description="at most one progress edit per interval"
    )
    metrics_host: str = Field("127.0.0.1", description="0.0.0.0 to let Prometheus scrape from outside")
    metrics_port: int | None = Field(9100, ge=0, le=65535, description="/metrics and /healthz; unset: off")
    shutdown_grace_s: float = Field(30.0, ge=0, le=3600, description="SIGTERM: time the running job gets")
    queue: str = Field(
        "local",
        description="'local' (one process, in-process queue) or redis://host:6379/0: the bot admits "
        "and orders jobs, `fluxbot worker` processes run them",
    )
    limits: LimitSettings = LimitSettings()
    delivery: DeliverySettings = DeliverySettings()
    safety: SafetySettings = SafetySettings()
    images: ImageSettings = ImageSettings()
    engine: EngineSettings = EngineSettings()
    workers: WorkerSettings = WorkerSettings()

    model: str | None = Field(
        None, description="Shorthand for engine.model (FLUXBOT_MODEL); wins over engine.model when set."
    )

    @model_validator(mode="after")
    def _apply_model_shorthand(self) -> Settings:
        # FLUXBOT_MODEL is the one setting every operator touches, so it gets a short name; the
        # engine reads only engine.model.
        if self.model is not None and self.model != self.engine.model:
            self.engine = self.engine.model_copy(update={"model": self.model})
        return self

    @field_validator("queue")
    @classmethod
    def _is_a_queue(cls, value: str) -> str:
        value = value.strip()
        if value != "local" and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("queue must be 'local' or a Redis URL such as redis://127.0.0.1:6379/0")
        return value

    @property
    def uses_redis(self) -> bool:
        return self.queue != "local"

    @property
    def workers_family(self) -> str:
        """The family the bot checks requests against when the engines live in workers."""
        if self.workers.family != "auto":
            return self.workers.family
        return TINY_MODELS.get(self.engine.model, "flux1")

    @field_validator("admin_permission")
    @classmethod
    def _is_a_permission(cls, value: str) -> str:
        import discord

        if value not in discord.Permissions.VALID_FLAGS:
            raise ValueError(f"{value!r} is not a Discord permission (e.g. manage_guild, administrator)")
        return value

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite+aiosqlite:///{self.data_dir / 'fluxbot.db'}"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml = TomlConfigSettingsSource(settings_cls, toml_file=config_file_path())
        return (init_settings, env_settings, toml, file_secret_settings)
