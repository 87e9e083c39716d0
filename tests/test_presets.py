"""Presets as data: the shipped file's defaults, and requests refused outside a preset's bounds."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.api import GenerationRequest, LoraChoice
from engine.catalog import Catalog
from engine.errors import ConfigError, RequestError
from engine.presets import load_presets
from engine.resolve import RequestResolver
from tests.conftest import REPO


@pytest.fixture(scope="module")
def resolver() -> RequestResolver:
    return RequestResolver(Catalog(load_presets(REPO / "config" / "presets.toml")))


def test_shipped_dev_preset_has_flux_dev_settings(resolver: RequestResolver) -> None:
    dev = resolver.resolve(GenerationRequest(prompt="a cat", preset="dev")).spec

    assert (dev.guidance, dev.true_cfg, dev.sampler, dev.steps) == (3.5, 1.0, "euler", 28)
    assert (dev.width, dev.height, dev.max_sequence_length) == (1024, 1024, 512)


def test_shipped_schnell_preset_has_four_steps_and_no_guidance(resolver: RequestResolver) -> None:
    schnell = resolver.resolve(GenerationRequest(prompt="a cat", preset="schnell")).spec

    assert (schnell.steps, schnell.guidance) == (4, None)


def test_shipped_fast_preset_is_eight_steps_with_a_turbo_lora() -> None:
    fast = load_presets(REPO / "config" / "presets.toml")["fast"]

    assert fast.steps == 8 and [lora.name for lora in fast.loras] == ["hyper-flux-8step"]


def test_fast_preset_without_its_lora_whitelisted_is_refused_clearly(resolver: RequestResolver) -> None:
    with pytest.raises(RequestError, match="needs LoRA 'hyper-flux-8step'"):
        resolver.resolve(GenerationRequest(prompt="a cat", preset="fast"))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"steps": 60}, "steps must be between 10 and 50"),
        ({"steps": 5}, "steps must be between 10 and 50"),
        ({"guidance": 12.0}, "guidance must be between 1.0 and 10.0"),
        ({"size": "1000x1000"}, "multiples of 16"),
        ({"size": "256x256"}, "below this preset's minimum"),
        ({"size": "2048x2048"}, "above this preset's maximum"),
        ({"size": "1024x512"}, "aspect 1024:512 is not one of"),
        ({"size": "big"}, "must look like 1024x768"),
        ({"preset": "ultra"}, "unknown preset 'ultra'"),
        ({"preset": "schnell", "guidance": 3.5}, "takes no guidance"),
        ({"loras": (LoraChoice(name="../../etc/passwd"),)}, "not on the whitelist"),
    ],
)
def test_requests_outside_preset_bounds_are_refused(
    resolver: RequestResolver, overrides: dict[str, object], message: str
) -> None:
    with pytest.raises(RequestError, match=message):
        resolver.resolve(GenerationRequest.model_validate({"prompt": "a cat", **overrides}))


def test_aspect_is_turned_into_a_size_on_the_grid(resolver: RequestResolver) -> None:
    wide = resolver.resolve(GenerationRequest(prompt="a cat", size="16:9")).spec

    assert wide.width % 16 == 0 and wide.height % 16 == 0
    assert abs(wide.width / wide.height - 16 / 9) < 0.03
    assert 0.9 < wide.width * wide.height / 1e6 < 1.2


def test_small_dev_image_is_allowed_with_a_noise_warning(resolver: RequestResolver) -> None:
    small = resolver.resolve(GenerationRequest(prompt="a cat", size="512x512"))

    assert small.warnings and "noisy" in str(small.warnings[0])


def test_empty_prompt_and_negative_seed_are_invalid_requests() -> None:
    with pytest.raises(ValueError, match="prompt is empty"):
        GenerationRequest(prompt="   ")
    with pytest.raises(ValueError, match="greater than or equal to 0"):
        GenerationRequest(prompt="a cat", seed=-1)
    with pytest.raises(ValueError, match="at most 2000"):
        GenerationRequest(prompt="x" * 2001)


def test_malformed_presets_file_names_file_key_and_problem(tmp_path: Path) -> None:
    bad = tmp_path / "presets.toml"
    bad.write_text("[dev]\nsteps = 80\nsteps_range = [10, 50]\nwidth = 1024\nheight = 1024\n")

    with pytest.raises(ConfigError, match=r"presets.toml: \[dev\].*steps 80 must lie in steps_range"):
        load_presets(bad)


def test_unknown_key_in_presets_file_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "presets.toml"
    bad.write_text("[dev]\nstepz = 8\nsteps = 8\nsteps_range = [1, 50]\nwidth = 1024\nheight = 1024\n")

    with pytest.raises(ConfigError, match=r"\[dev\]\.stepz: Extra inputs are not permitted"):
        load_presets(bad)


def test_broken_toml_is_a_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "presets.toml"
    bad.write_text("[dev\n")

    with pytest.raises(ConfigError, match="not valid TOML"):
        load_presets(bad)
