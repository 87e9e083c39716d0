"""The `fluxbot` command as a user runs it: a PNG with its recipe, one-line errors, doctor."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.png import read_parameters, read_recipe
from fluxbot.cli import main


@pytest.fixture(scope="module")
def cli_env(
    data_dir: Path, tiny_dir: Path, presets_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, str]:
    empty = tmp_path_factory.mktemp("cli") / "loras.toml"
    empty.write_text("")
    env = dict(os.environ)
    env.update(
        FLUXBOT_DATA_DIR=str(data_dir),
        FLUXBOT_ENGINE__PRESETS_FILE=str(presets_file),
        FLUXBOT_ENGINE__LORAS_FILE=str(empty),
        FLUXBOT_CONFIG=str(tmp_path_factory.mktemp("noconfig") / "absent.toml"),
    )
    return env


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """In-process `main` configures the root logger onto this test's captured stderr: undo it after."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def fluxbot(env: dict[str, str], *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fluxbot.cli", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_imagine_writes_a_png_with_its_recipe(cli_env: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "cat.png"

    run = fluxbot(
        cli_env,
        "imagine",
        "a red cat",
        "--seed",
        "42",
        "--steps",
        "3",
        "--size",
        "96x64",
        "--out",
        str(out),
        cwd=tmp_path,
    )

    assert run.returncode == 0, run.stderr
    recipe = read_recipe(out)
    assert (recipe.prompt, recipe.seed, recipe.steps, recipe.width, recipe.height) == (
        "a red cat",
        42,
        3,
        96,
        64,
    )
    assert "Seed: 42" in (read_parameters(out) or "")
    assert "denoising" in run.stderr and "3/3" in run.stderr, "a progress bar on the terminal"
    assert str(out) in run.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["imagine", ""], "prompt: the prompt is empty"),
        (["imagine", "a cat", "--size", "100x100"], "multiples of 16"),
        (["imagine", "a cat", "--seed", "-1"], "seed: Input should be greater than or equal to 0"),
        (["imagine", "a cat", "--lora", "nope"], "LoRA 'nope' is not on the whitelist"),
        (["imagine", "a cat", "--preset", "ultra"], "unknown preset 'ultra'"),
        (["imagine", "a cat", "--out", "x.jpg"], "--out must name a .png file"),
    ],
)
def test_bad_input_is_one_line_and_a_nonzero_exit(
    cli_env: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    message: str,
) -> None:
    # In-process (same entry function as the console script) to keep the suite fast.
    for key, value in cli_env.items():
        if key.startswith("FLUXBOT_"):
            monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)

    code = main(args)

    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(lines) == 1 and lines[0].startswith("fluxbot: ") and message in lines[0], lines
    assert not list(tmp_path.glob("*.png"))


def test_doctor_reports_host_tier_model_and_loras(cli_env: dict[str, str], tmp_path: Path) -> None:
    run = fluxbot(cli_env, "doctor", cwd=tmp_path)

    assert run.returncode == 0, run.stdout + run.stderr
    for label in ("torch", "gpu", "auto tier", "model", "quant", "presets", "loras", "kontext", "preview"):
        assert f"] {label}" in run.stdout
    assert "CPU: full-precision float32" in run.stdout


def test_doctor_fails_on_a_kontext_file_that_is_not_there(cli_env: dict[str, str], tmp_path: Path) -> None:
    env = {**cli_env, "FLUXBOT_ENGINE__KONTEXT": str(tmp_path / "flux1-kontext-dev.safetensors")}

    run = fluxbot(env, "doctor", cwd=tmp_path)

    assert run.returncode != 0
    assert "[FAIL] kontext" in run.stdout and "flux1-kontext-dev.safetensors does not exist" in run.stdout


def test_doctor_fails_on_a_checkpoint_without_text_encoders(cli_env: dict[str, str], tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    checkpoint = tmp_path / "flux1-dev.safetensors"
    save_file(
        {
            "transformer_blocks.0.attn.to_q.weight": torch.zeros(2, 2),
            "time_text_embed.guidance_embedder.linear_1.weight": torch.zeros(2, 2),
        },
        checkpoint,
    )
    env = {**cli_env, "FLUXBOT_MODEL": str(checkpoint), "FLUXBOT_ENGINE__VAE": str(checkpoint)}

    run = fluxbot(env, "doctor", cwd=tmp_path)

    assert run.returncode == 1
    assert "[FAIL] checkpoint" in run.stdout
    assert "this checkpoint has no text encoders: set engine.clip_l / engine.t5xxl" in run.stdout


def test_imagine_draws_from_an_image_and_refuses_a_bad_one_in_one_line(
    cli_env: dict[str, str], tmp_path: Path
) -> None:
    source, out = tmp_path / "cat.png", tmp_path / "dog.png"
    assert (
        fluxbot(
            cli_env, "imagine", "a cat", "--steps", "2", "--size", "64x64", "--out", str(source), cwd=tmp_path
        ).returncode
        == 0
    )

    run = fluxbot(
        cli_env,
        "imagine",
        "a dog",
        "--image",
        str(source),
        "--strength",
        "0.5",
        "--size",
        "64x64",
        "--out",
        str(out),
        cwd=tmp_path,
    )
    (tmp_path / "fake.png").write_bytes(b"GIF89a\x01\x00\x01\x00\x00\x00\x00;")
    bad = fluxbot(cli_env, "imagine", "a dog", "--image", str(tmp_path / "fake.png"), cwd=tmp_path)

    assert run.returncode == 0, run.stderr
    recipe = read_recipe(out)
    assert recipe.kind == "img2img" and recipe.strength == 0.5 and recipe.init_image_sha256
    assert bad.returncode != 0 and bad.stderr.strip().count("\n") == 0
    assert "--image: the file is not a" in bad.stderr
    no_kontext = fluxbot(cli_env, "imagine", "make it night", "--image", str(source), "--edit", cwd=tmp_path)
    assert no_kontext.returncode != 0 and "--edit needs FLUX.1 Kontext" in no_kontext.stderr


def test_imagine_with_missing_model_is_one_line(cli_env: dict[str, str], tmp_path: Path) -> None:
    run = fluxbot({**cli_env, "FLUXBOT_MODEL": str(tmp_path / "nothing")}, "imagine", "a cat", cwd=tmp_path)

    assert run.returncode == 1
    assert len(run.stderr.strip().splitlines()) <= 2  # the "loading" notice, then the one-line error
    assert run.stderr.strip().splitlines()[-1].startswith("fluxbot: model ")


@pytest.mark.parametrize(
    ("queue", "message"),
    [
        ("local", "fluxbot worker serves a bot through Redis: set FLUXBOT_QUEUE=redis://"),
        ("amqp://127.0.0.1", "queue must be 'local' or a Redis URL"),
        ("redis://:hunter2@127.0.0.1:1/0", "cannot reach Redis at redis://:***@127.0.0.1:1/0"),
    ],
)
def test_worker_without_a_usable_redis_is_one_line(
    cli_env: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    queue: str,
    message: str,
) -> None:
    for key, value in cli_env.items():
        if key.startswith("FLUXBOT_"):
            monkeypatch.setenv(key, value)
    monkeypatch.setenv("FLUXBOT_QUEUE", queue)
    monkeypatch.chdir(tmp_path)

    code = main(["worker"])

    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(lines) == 1 and message in lines[0], lines
    assert "hunter2" not in lines[0]


def test_imagine_enhance_draws_the_expansion_and_doctor_names_the_enhancer(
    cli_env: dict[str, str], tmp_path: Path
) -> None:
    from tests.chat_server import chat_server, expansion_of

    with chat_server() as chat:
        env = {
            **cli_env,
            "FLUXBOT_ENGINE__PROMPT_ENHANCER": chat.url,
            "FLUXBOT_ENGINE__PROMPT_ENHANCER_MODEL": "tiny",
        }
        out = tmp_path / "fox.png"

        run = fluxbot(env, "imagine", "a fox", "--enhance", "--seed", "2", "--out", str(out), cwd=tmp_path)
        doctor = fluxbot(env, "doctor", cwd=tmp_path)
        plain = fluxbot(cli_env, "imagine", "a fox", "--enhance", cwd=tmp_path)

    assert run.returncode == 0, run.stderr
    assert f"enhanced prompt: {expansion_of('a fox')}" in run.stderr
    assert read_recipe(out).enhanced_prompt == expansion_of("a fox") and len(chat.requests) == 1
    assert re.search(rf"\[ok  \] enhancer +tiny at {re.escape(chat.url)} ", doctor.stdout)
    assert plain.returncode != 0 and plain.stderr.strip().splitlines()[-1] == (
        "fluxbot: prompt enhancement is not set up here (an admin sets engine.prompt_enhancer)"
    )
