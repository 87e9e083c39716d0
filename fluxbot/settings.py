"""The one settings tree: env vars FLUXBOT_* (nested with __), then config/fluxbot.toml, then defaults."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from engine.settings import EngineSettings

DEFAULT_CONFIG_FILE = Path("config/fluxbot.toml")


def config_file_path() -> Path:
    """The optional TOML file; FLUXBOT_CONFIG points elsewhere."""
    return Path(os.environ.get("FLUXBOT_CONFIG", DEFAULT_CONFIG_FILE))


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
    discord_token: SecretStr | None = Field(None, description="The bot's token; never logged.")
    engine: EngineSettings = EngineSettings()

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
