"""Shared fixtures: the tiny model, built once per session, and a fast presets file for it."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL.Image import Image

from engine.engine import FluxEngine
from engine.settings import EngineSettings
from engine.tiny import ensure_tiny_model
from fluxbot.logs import quiet as quiet_loggers
from tests import services
from tests.discord_support import Harness, make_bot_settings, running_bot
from tests.fake_discord import FakeDiscord

REPO = Path(__file__).resolve().parent.parent

quiet_loggers()

# The shipped presets with bounds widened to tiny sizes, so generation tests take milliseconds.
FAST_PRESETS = """
[dev]
family = "flux1"
steps = 4
steps_range = [1, 50]
guidance = 3.5
guidance_range = [1.0, 10.0]
true_cfg = 1.0
width = 64
height = 64
megapixels_range = [0.001, 2.1]
warn_below_megapixels = 0.002
aspects = ["1:1", "3:2", "2:3", "16:9", "9:16"]

[cfg]
family = "flux1"
steps = 3
steps_range = [1, 10]
guidance = 3.5
guidance_range = [1.0, 10.0]
true_cfg = 2.0
width = 64
height = 64
megapixels_range = [0.001, 2.1]

[schnell]
family = "flux1"
steps = 2
steps_range = [1, 8]
width = 64
height = 64
megapixels_range = [0.001, 2.1]
max_sequence_length = 256

[fill]
steps = 3
steps_range = [1, 50]
guidance = 30.0
guidance_range = [1.0, 30.0]
width = 64
height = 64
megapixels_range = [0.001, 4.2]

[klein]
family = "flux2"
variants = ["klein"]
steps = 2
steps_range = [1, 8]
width = 64
height = 64
megapixels_range = [0.001, 4.2]

[klein-base]
family = "flux2"
variants = ["klein-base"]
steps = 3
steps_range = [1, 16]
guidance = 4.0
guidance_range = [1.0, 10.0]
width = 64
height = 64
megapixels_range = [0.001, 4.2]

[flux3-distilled]
family = "flux3"
variants = ["klein"]
steps = 3
steps_range = [1, 16]
width = 64
height = 64
megapixels_range = [0.001, 4.2]

[flux3]
family = "flux3"
variants = ["klein-base"]
steps = 3
steps_range = [1, 16]
true_cfg = 4.0
width = 64
height = 64
megapixels_range = [0.001, 4.2]
"""


@pytest.fixture(params=["sqlite", "postgres"])
def database_backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a test once on SQLite and once on a fresh PostgreSQL database (via make_settings)."""
    backend = str(request.param)
    if backend == "postgres":
        services.require_postgres()
    monkeypatch.setenv(services.DATABASE_BACKEND, backend)
    return backend


@pytest.fixture(scope="session", autouse=True)
def _drop_test_databases() -> Iterator[None]:
    yield
    with contextlib.suppress(Exception):  # no Postgres here: nothing was created
        services.drop_test_databases()


@pytest.fixture
async def fake() -> AsyncIterator[FakeDiscord]:
    """A fresh fake Discord server on 127.0.0.1 for one test."""
    server = FakeDiscord()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def tiny_dir(data_dir: Path) -> Path:
    return ensure_tiny_model(data_dir / "models" / "tiny-flux1")


@pytest.fixture(scope="session")
def presets_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("config") / "presets.toml"
    path.write_text(FAST_PRESETS)
    return path


@pytest.fixture(scope="session")
def make_settings(
    presets_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Callable[..., EngineSettings]:
    empty_whitelist = tmp_path_factory.mktemp("nolora") / "loras.toml"
    empty_whitelist.write_text("")

    def make(**overrides: object) -> EngineSettings:
        values: dict[str, object] = {
            "model": "tiny",
            "presets_file": presets_file,
            "loras_file": empty_whitelist,
        }
        values.update(overrides)
        return EngineSettings.model_validate(values)

    return make


@pytest.fixture(scope="session")
def engine(make_settings: Callable[..., EngineSettings], data_dir: Path, tiny_dir: Path) -> FluxEngine:
    return FluxEngine.load(make_settings(), data_dir)


@pytest.fixture
def bitsandbytes_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lift only diffusers' "No GPU found" check (and its default of placing the model on cuda:0);
    everything else is the product's own nf4 path."""
    from diffusers.quantizers.bitsandbytes.bnb_quantizer import BnB4BitDiffusersQuantizer

    monkeypatch.setattr(BnB4BitDiffusersQuantizer, "validate_environment", lambda self, *a, **k: None)
    monkeypatch.setattr(BnB4BitDiffusersQuantizer, "update_device_map", lambda self, dm: dm or {"": "cpu"})
    # On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks 4-bit weights for its CPU kernel, which
    # needs layers at least one quantization block (64) wide: the tiny model's are 16-32 (real FLUX
    # layers are 3072+). Its reference path, which every other CPU takes, draws them.
    monkeypatch.setattr("bitsandbytes.nn.modules.has_avx512bf16", lambda: False)


def pixels(image: Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


@pytest.fixture
async def harness(
    fake: FakeDiscord, tmp_path: Path, make_settings: Callable[..., EngineSettings], data_dir: Path
) -> AsyncIterator[Harness]:
    """The real bot on the tiny engine against a fresh fake Discord, started."""
    async with running_bot(fake, make_bot_settings(tmp_path, make_settings, fake), data_dir) as started:
        yield started
