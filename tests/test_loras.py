"""LoRA whitelist: only listed, hash-pinned files load; adapters stay resident and switch per job."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from engine.api import GenerationRequest, LoraChoice
from engine.engine import FluxEngine
from engine.errors import ConfigError, LoraError, RequestError
from engine.hashing import FileHasher
from engine.settings import EngineSettings
from engine.whitelist import LoraFiles, load_whitelist
from tests.conftest import pixels
from tests.lora_support import make_lora, sha, whitelist_toml


@pytest.fixture(scope="module")
def lora_setup(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("lorasetup")
    lora_dir = root / "Lora"
    files = {
        name: make_lora(tiny_dir, lora_dir, name, seed)
        for name, seed in (("inky", 1), ("glow", 2), ("film", 3))
    }
    whitelist = root / "loras.toml"
    whitelist.write_text(
        whitelist_toml(
            {
                "inky": {
                    "file": "inky.safetensors",
                    "sha256": sha(files["inky"]),
                    "trigger_words": ["inkstyle"],
                    "default_weight": 1.0,
                    "max_weight": 2.0,
                },
                "glow": {"file": "glow.safetensors", "sha256": sha(files["glow"]), "default_weight": 0.8},
                "film": {"file": "film.safetensors", "sha256": sha(files["film"])},
                "tampered": {"file": "glow.safetensors", "sha256": "0" * 64},
                "missing": {"file": "gone.safetensors", "sha256": "1" * 64},
            }
        )
    )
    return whitelist, lora_dir


@pytest.fixture(scope="module")
def lora_engine(
    make_settings: Callable[..., EngineSettings], data_dir: Path, lora_setup: tuple[Path, Path]
) -> FluxEngine:
    whitelist, lora_dir = lora_setup
    return FluxEngine.load(
        make_settings(loras_file=whitelist, lora_dir=lora_dir, max_resident_loras=2), data_dir
    )


def test_resident_lora_changes_pixels_and_disabling_restores_them(lora_engine: FluxEngine) -> None:
    base = GenerationRequest(prompt="a cat", seed=21)
    before = lora_engine.generate(base).images[0]

    styled = lora_engine.generate(base.model_copy(update={"loras": (LoraChoice(name="glow"),)})).images[0]
    after = lora_engine.generate(base).images[0]

    assert not np.array_equal(pixels(before), pixels(styled))
    assert np.array_equal(pixels(before), pixels(after))


def test_switching_back_to_a_resident_lora_is_not_a_reload(lora_engine: FluxEngine) -> None:
    inky = GenerationRequest(prompt="a cat", seed=3, loras=(LoraChoice(name="inky", weight=0.5),))
    first = lora_engine.generate(inky).images[0]
    lora_engine.generate(inky.model_copy(update={"loras": (LoraChoice(name="glow"),)}))
    loads_before = lora_engine.loras.loads

    again = lora_engine.generate(inky).images[0]

    assert lora_engine.loras.loads == loads_before, "inky was resident: set_adapters, not load_lora_weights"
    assert np.array_equal(pixels(first), pixels(again))


def test_least_recently_used_lora_is_unloaded_past_the_limit(lora_engine: FluxEngine) -> None:
    for name in ("inky", "glow", "film"):
        lora_engine.generate(GenerationRequest(prompt="a cat", seed=1, loras=(LoraChoice(name=name),)))

    assert lora_engine.loras.resident == ["glow", "film"]


def test_stacked_loras_apply_together_and_weights_matter(lora_engine: FluxEngine) -> None:
    stack = (LoraChoice(name="inky", weight=1.0), LoraChoice(name="glow", weight=0.5))
    both = lora_engine.generate(GenerationRequest(prompt="a cat", seed=4, loras=stack))
    lighter = lora_engine.generate(
        GenerationRequest(prompt="a cat", seed=4, loras=(stack[0], LoraChoice(name="glow", weight=0.1)))
    )

    assert [lo.name for lo in both.recipes[0].loras] == ["inky", "glow"]
    assert not np.array_equal(pixels(both.images[0]), pixels(lighter.images[0]))


def test_trigger_words_are_prepended_and_recorded(lora_engine: FluxEngine) -> None:
    result = lora_engine.generate(GenerationRequest(prompt="a cat", seed=5, loras=(LoraChoice(name="inky"),)))

    assert result.recipes[0].final_prompt == "inkstyle, a cat"
    assert result.recipes[0].prompt == "a cat"
    assert result.recipes[0].loras[0].sha256 == lora_engine.resolver.catalog.lora("inky").sha256


def test_hash_mismatch_is_refused(lora_engine: FluxEngine) -> None:
    with pytest.raises(LoraError, match="sha256 .* refusing to load it"):
        lora_engine.generate(GenerationRequest(prompt="a cat", loras=(LoraChoice(name="tampered"),)))


def test_missing_file_is_refused(lora_engine: FluxEngine) -> None:
    with pytest.raises(LoraError, match="missing"):
        lora_engine.generate(GenerationRequest(prompt="a cat", loras=(LoraChoice(name="missing"),)))


@pytest.mark.parametrize("name", ["../Lora/glow", "/etc/passwd", "glow.safetensors", "nope"])
def test_names_that_are_not_whitelisted_never_reach_the_filesystem(
    lora_engine: FluxEngine, name: str
) -> None:
    with pytest.raises(LoraError, match="not on the whitelist"):
        lora_engine.resolve(GenerationRequest(prompt="a cat", loras=(LoraChoice(name=name),)))


def test_weight_above_max_and_too_many_loras_are_refused(lora_engine: FluxEngine) -> None:
    with pytest.raises(LoraError, match="weight must be within"):
        lora_engine.resolve(GenerationRequest(prompt="a", loras=(LoraChoice(name="glow", weight=3.0),)))
    many = tuple(LoraChoice(name=n) for n in ("inky", "glow", "film", "tampered"))
    with pytest.raises(LoraError, match="at most 3 LoRAs"):
        lora_engine.resolve(GenerationRequest(prompt="a", loras=many))


@pytest.mark.parametrize(
    "file", ["../outside.safetensors", "/abs/x.safetensors", "C:\\\\x.safetensors", "x.ckpt"]
)
def test_whitelist_file_paths_must_stay_inside_the_lora_folder(tmp_path: Path, file: str) -> None:
    path = tmp_path / "loras.toml"
    path.write_text(f'[bad]\nfile = "{file}"\nsha256 = "{"a" * 64}"\n')

    with pytest.raises(ConfigError, match=r"\[bad\]\.file"):
        load_whitelist(path)


def test_symlink_out_of_the_lora_folder_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "secret.safetensors"
    outside.write_bytes(b"x")
    lora_dir = tmp_path / "Lora"
    lora_dir.mkdir()
    os.symlink(outside, lora_dir / "link.safetensors")
    entry = load_whitelist(_one_entry(tmp_path, "link.safetensors", sha(outside)))["x"]

    with pytest.raises(LoraError, match="outside the LoRA folder"):
        LoraFiles(lora_dir, FileHasher(None)).verify(entry.name, entry.file, entry.sha256)


def _one_entry(tmp_path: Path, file: str, digest: str) -> Path:
    path = tmp_path / "one.toml"
    path.write_text(f'[x]\nfile = "{file}"\nsha256 = "{digest}"\n')
    return path


def test_sha256_is_computed_once_and_cached_across_processes(tmp_path: Path) -> None:
    file = tmp_path / "a.safetensors"
    file.write_bytes(b"weights")
    cache = tmp_path / "hashes.json"

    first = FileHasher(cache).sha256(file)
    assert cache.is_file()
    assert FileHasher(cache).sha256(file) == first == sha(file)


def test_a_lora_tag_draws_exactly_like_the_lora_option(lora_engine: FluxEngine) -> None:
    from engine.png import a1111_parameters

    by_option = lora_engine.generate(
        GenerationRequest(prompt="a cat, at night", seed=6, loras=(LoraChoice(name="glow", weight=0.5),))
    )
    by_tag = lora_engine.generate(GenerationRequest(prompt="a cat, <lora:glow:0.5>, at night", seed=6))

    assert np.array_equal(pixels(by_option.images[0]), pixels(by_tag.images[0]))
    recipe = by_tag.recipes[0]
    assert (recipe.prompt, recipe.final_prompt) == ("a cat, at night", "a cat, at night")
    assert [(lo.name, lo.weight) for lo in recipe.loras] == [("glow", 0.5)]
    assert "a cat, at night <lora:glow:0.5>" in a1111_parameters(recipe), "the recipe's form is unchanged"


def test_a_prompt_copied_from_a_png_draws_the_same_loras_again(lora_engine: FluxEngine) -> None:
    from engine.png import a1111_parameters

    first = lora_engine.generate(
        GenerationRequest(prompt="a cat", seed=8, loras=(LoraChoice(name="inky", weight=0.7),))
    )
    copied = a1111_parameters(first.recipes[0]).splitlines()[0]  # "inkstyle, a cat <lora:inky:0.7>"

    again = lora_engine.generate(GenerationRequest(prompt=copied, seed=8))

    assert again.recipes[0].final_prompt == first.recipes[0].final_prompt == "inkstyle, a cat"
    assert np.array_equal(pixels(first.images[0]), pixels(again.images[0]))


def test_three_tags_with_names_as_forge_writes_them_and_trigger_words(lora_engine: FluxEngine) -> None:
    spec = lora_engine.resolve(
        GenerationRequest(prompt="<lora:inky:1.2> a cat, <LORA:Glow.safetensors:-0.3>,\nat night <lora:film>")
    )

    assert [(lo.name, lo.weight) for lo in spec.loras] == [("inky", 1.2), ("glow", -0.3), ("film", 1.0)]
    assert spec.prompt == "a cat, at night"
    assert spec.final_prompt == "inkstyle, a cat, at night"


@pytest.mark.parametrize(
    ("prompt", "refusal"),
    [
        (
            "a <lora:inky> <lora:glow> <lora:film> <lora:tampered> cat",
            "at most 3 LoRAs per image (got 4)",
        ),
        ("a cat <lora:nope:0.5>", "<lora:nope:0.5>: no LoRA called 'nope' is on the whitelist"),
        ("a cat <lora:../Lora/glow:1>", "<lora:../Lora/glow:1>: no LoRA called '../Lora/glow'"),
        ("a cat <lora:glow:3>", "<lora:glow:3>: the weight of LoRA glow must be within ±1.5"),
        ("a cat <lora:glow:nan>", "<lora:glow:nan>: the weight must be a number"),
        ("a cat <lora:glow:heavy>", "<lora:glow:heavy>: the weight must be a number"),
        ("a cat <lora:glow:0.8:0.5>", "<lora:glow:0.8:0.5> is not a LoRA tag fluxbot reads"),
        ("a cat <lora:>", "<lora:> is not a LoRA tag"),
        ("a cat <lora:glow> <lora:glow:0.2>", "the same LoRA is listed twice"),
        ("<lora:glow:0.5>, ", "the prompt is empty once its <lora:...> tags are taken out"),
    ],
)
def test_bad_lora_tags_are_refused_naming_the_tag(lora_engine: FluxEngine, prompt: str, refusal: str) -> None:
    with pytest.raises(RequestError, match=re.escape(refusal)):
        lora_engine.resolve(GenerationRequest(prompt=prompt))


def test_a_tag_and_the_option_together_count_against_the_limit(lora_engine: FluxEngine) -> None:
    option = (LoraChoice(name="glow"),)
    spec = lora_engine.resolve(GenerationRequest(prompt="a cat <lora:inky:0.5>", loras=option))
    assert [lo.name for lo in spec.loras] == ["glow", "inky"]
    with pytest.raises(LoraError, match="listed twice"):
        lora_engine.resolve(GenerationRequest(prompt="a cat <lora:glow:0.5>", loras=option))
    with pytest.raises(RequestError, match="take no LoRAs"):
        lora_engine.resolve(
            GenerationRequest(prompt="make it red <lora:glow>", mode="edit", init_image="0" * 64)
        )
