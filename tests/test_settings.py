"""Settings: FLUXBOT_* env vars (nested with __), an optional TOML file, and a documented example."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from engine.settings import EngineSettings
from fluxbot.settings import (
    DeliverySettings,
    ImageSettings,
    LimitSettings,
    SafetySettings,
    Settings,
    WorkerSettings,
)
from tests.conftest import REPO


def test_defaults_use_the_embedded_tiny_model(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)

    settings = Settings()

    assert settings.engine.model == "tiny" and settings.engine.quant == "auto"


def test_env_vars_override_with_prefix_and_nesting(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FLUXBOT_MODEL", "/models/flux1-dev.gguf")
    monkeypatch.setenv("FLUXBOT_ENGINE__QUANT", "int8")
    monkeypatch.setenv("FLUXBOT_ENGINE__DEVICE", "cpu")
    monkeypatch.setenv("FLUXBOT_ENGINE__LORAS_FILE", "/etc/fluxbot/loras.toml")

    engine = Settings().engine

    assert (engine.model, engine.quant, engine.device) == ("/models/flux1-dev.gguf", "int8", "cpu")
    assert engine.loras_file == Path("/etc/fluxbot/loras.toml")


def test_toml_file_is_read_and_env_wins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "fluxbot.toml"
    config.write_text('data_dir = "/srv/fluxbot"\n[engine]\nmodel = "/models"\nquant = "fp8"\n')
    monkeypatch.setenv("FLUXBOT_CONFIG", str(config))
    monkeypatch.setenv("FLUXBOT_ENGINE__QUANT", "bf16")

    settings = Settings()

    assert settings.data_dir == Path("/srv/fluxbot")
    assert (settings.engine.model, settings.engine.quant) == ("/models", "bf16")


def test_bad_values_name_the_setting(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FLUXBOT_ENGINE__QUANT", "int9")

    with pytest.raises(ValidationError, match="engine.quant"):
        Settings()


def test_unknown_key_in_toml_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "fluxbot.toml"
    config.write_text("[engine]\nqaunt = 'int8'\n")
    monkeypatch.setenv("FLUXBOT_CONFIG", str(config))

    with pytest.raises(ValidationError, match="qaunt"):
        Settings()


def test_example_config_documents_every_key_and_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    example = REPO / "config" / "fluxbot.example.toml"
    text = example.read_text()
    sections = (
        Settings,
        EngineSettings,
        LimitSettings,
        WorkerSettings,
        DeliverySettings,
        SafetySettings,
        ImageSettings,
    )
    tables = {"engine", "limits", "workers", "delivery", "safety", "images"}
    keys = {key for section in sections for key in section.model_fields} - tables

    undocumented = [key for key in keys if not re.search(rf"^#?\s*{key} = ", text, re.MULTILINE)]
    monkeypatch.setenv("FLUXBOT_CONFIG", str(example))

    assert undocumented == []
    assert Settings().engine == EngineSettings()
    assert Settings().limits == LimitSettings()
    assert Settings().workers == WorkerSettings()
    assert Settings().delivery == DeliverySettings()
    assert Settings().images == ImageSettings()
    assert Settings().safety == SafetySettings()
