"""docker/: the Dockerfile passes hadolint; the compose file says what an operator needs (no engine here)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    return found


@pytest.mark.parametrize("dockerfile", ["docker/Dockerfile", "docker/Dockerfile.bot"])
def test_dockerfiles_pass_hadolint(dockerfile: str) -> None:
    run = subprocess.run([hadolint(), dockerfile], cwd=REPO, capture_output=True, text=True, timeout=60)

    assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.parametrize("dockerfile", ["docker/Dockerfile", "docker/Dockerfile.bot"])
def test_the_images_copy_everything_the_wheel_build_reads(dockerfile: str) -> None:
    # pip builds the wheel inside the image: pyproject's build_py hook (the compiled translation
    # catalogs) and every package folder must be in the build context it copied.
    copied = {
        word
        for line in (REPO / dockerfile).read_text().splitlines()
        if line.startswith("COPY")
        for word in line.split()
    }
    hook = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["cmdclass"]["build_py"]
    assert hook.split(".")[0] + ".py" in copied
    assert {"engine", "bot", "fluxbot", "migrations", "config", "pyproject.toml"} <= copied


def test_the_bot_image_installs_fluxbot_without_its_engine() -> None:
    text = (REPO / "docker" / "Dockerfile.bot").read_text()

    installs = [line for line in text.splitlines() if "pip install" in line]
    assert installs == ['RUN pip install "./[postgres]" \\'], "no engine extra, no torch"
    assert "USER 10001" in text and "/healthz" in text


def test_dockerfile_runs_fluxbot_as_non_root_with_a_healthcheck_and_volumes() -> None:
    text = (REPO / "docker" / "Dockerfile").read_text()

    assert 'CMD ["fluxbot", "run"]' in text
    assert "USER 10001" in text and "HEALTHCHECK" in text and "/healthz" in text
    assert 'VOLUME ["/models", "/data", "/config"]' in text


def test_compose_reserves_a_gpu_and_mounts_models_data_and_config() -> None:
    compose = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())
    gpu = compose["services"]["fluxbot"]

    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
    assert gpu["restart"] == "unless-stopped" and gpu["env_file"] == ["fluxbot.env"]
    targets = {volume.split(":")[1] for volume in gpu["volumes"]}
    assert targets == {"/models", "/data", "/config"}
    cpu = compose["services"]["fluxbot-cpu"]
    assert cpu["profiles"] == ["cpu"] and cpu["environment"]["FLUXBOT_MODEL"] == "tiny"
    assert "deploy" not in cpu


def test_compose_scale_profile_runs_a_bot_redis_postgres_and_a_worker_per_gpu() -> None:
    services = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())["services"]
    scale = {name: service for name, service in services.items() if "scale" in service.get("profiles", [])}
    workers = {name: service for name, service in scale.items() if name.startswith("worker-")}

    assert {"redis", "postgres", "scale-bot"} <= scale.keys() and len(workers) >= 2
    bot = scale["scale-bot"]
    assert "deploy" not in bot, "the bot holds no engine: no GPU for it"
    assert bot["build"]["dockerfile"] == "docker/Dockerfile.bot", "and no torch in its image"
    assert bot["environment"]["FLUXBOT_QUEUE"] == "redis://redis:6379/0"
    assert bot["environment"]["FLUXBOT_DATABASE_URL"].startswith("postgresql+asyncpg://")
    gpus = [w["environment"]["CUDA_VISIBLE_DEVICES"] for w in workers.values()]
    names = [w["environment"]["FLUXBOT_WORKERS__NAME"] for w in workers.values()]
    assert len(set(gpus)) == len(gpus) and len(set(names)) == len(names), "one worker per GPU"
    for worker in workers.values():
        assert worker["command"] == ["fluxbot", "worker"]
        assert worker["environment"]["FLUXBOT_QUEUE"] == bot["environment"]["FLUXBOT_QUEUE"]
        assert worker["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
        assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
        assert "FLUXBOT_WORKERS__NAME" in " ".join(worker["healthcheck"]["test"])
