"""The product as an operator installs it: a wheel, installed non-editable into a fresh venv, run from
an empty folder. Nothing here sees the repository: not its path, not its config/ or migrations/.

The fresh venv gets fluxbot from the wheel alone; its dependencies (torch, diffusers...) come from
the test venv's site-packages through a .pth line, which adds that folder to sys.path without
running the .pth files in it, so the repository's editable install stays out.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from engine.png import read_recipe
from tests.conftest import REPO


def _run(
    *command: str | Path, cwd: Path, env: dict[str, str], timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `fluxbot` script of a fresh venv holding the wheel built from this checkout."""
    work = tmp_path_factory.mktemp("installed")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    built = _run(
        sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", work / "dist",
        REPO, cwd=work, env=env,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    (wheel,) = (work / "dist").glob("fluxbot-*.whl")
    venv = work / "venv"
    assert _run(sys.executable, "-m", "venv", venv, cwd=work, env=env).returncode == 0
    python = venv / "bin" / "python"
    site = _run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=work, env=env)
    Path(site.stdout.strip(), "_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = _run(python, "-m", "pip", "install", "--no-deps", "--no-index", "-q", wheel, cwd=work, env=env)
    assert install.returncode == 0, install.stderr
    return venv / "bin" / "fluxbot"


@pytest.fixture
def empty_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "empty"
    folder.mkdir()
    return folder


def clean_env(**extra: str) -> dict[str, str]:
    """The operator's environment: no FLUXBOT_* from the test run, no repository on the path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLUXBOT_", "PYTHON"))}
    return {**env, **extra}


def test_the_wheel_carries_migrations_and_defaults_not_the_repository(installed: Path) -> None:
    python = installed.parent / "python"
    probe = _run(
        python,
        "-c",
        "import bot, engine.settings as s; from bot.store.database import MIGRATIONS; "
        "print(bot.__file__); print(s.shipped('presets.toml')); print(MIGRATIONS)",
        cwd=installed.parent,
        env=clean_env(),
    )
    package, presets, migrations = probe.stdout.split()
    assert probe.returncode == 0, probe.stderr
    assert str(REPO) not in package and "site-packages" in package
    assert Path(presets).is_file() and str(REPO) not in presets
    assert migrations == "bot.migrations:"


def test_the_wheel_carries_compiled_spanish_catalogs(installed: Path) -> None:
    python = installed.parent / "python"
    probe = _run(
        python,
        "-c",
        "from importlib.resources import files; from bot.i18n import Languages; "
        "print((files('bot') / 'locale' / 'es' / 'LC_MESSAGES' / 'fluxbot.mo').is_file()); "
        "print(Languages.load().for_locale('es-419').tr('job {job}', job=7))",
        cwd=installed.parent,
        env=clean_env(),
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split() == ["True", "trabajo", "7"]


def test_doctor_from_an_empty_folder_passes_and_writes_nothing(installed: Path, empty_folder: Path) -> None:
    run = _run(installed, "doctor", cwd=empty_folder, env=clean_env())

    assert run.returncode == 0, run.stdout + run.stderr
    assert "[ok  ] presets" in run.stdout and "not built yet" in run.stdout
    assert list(empty_folder.iterdir()) == []


def test_doctor_reads_an_upscaler_file_with_the_installed_spandrel(
    installed: Path, empty_folder: Path
) -> None:
    from spandrel.architectures.ESRGAN import ESRGAN

    from engine.upscaler import save_realesrgan

    folder = empty_folder / "data" / "models" / "ESRGAN"
    folder.mkdir(parents=True)
    network = ESRGAN(in_nc=3, out_nc=3, num_filters=8, num_blocks=1, scale=4)
    save_realesrgan(network, folder / "RealESRGAN_x4plus.pth")

    env = clean_env(FLUXBOT_ENGINE__UPSCALER="realesrgan_x4plus")  # its name, in any case
    run = _run(installed, "doctor", cwd=empty_folder, env=env)

    assert run.returncode == 0, run.stdout + run.stderr
    assert "RealESRGAN_x4plus.pth: ESRGAN x4 (8nf, 1nb), tiles of 512 px" in run.stdout


def test_imagine_and_db_upgrade_from_an_empty_folder(installed: Path, empty_folder: Path) -> None:
    imagine = _run(
        installed, "imagine", "a lighthouse at dusk", "--seed", "3", "--steps", "10", "--size", "512x512",
        "--out", "lighthouse.png", cwd=empty_folder, env=clean_env(),
    )  # fmt: skip
    upgrade = _run(installed, "db", "upgrade", cwd=empty_folder, env=clean_env())

    assert imagine.returncode == 0, imagine.stderr
    recipe = read_recipe((empty_folder / "lighthouse.png").read_bytes())
    assert recipe.prompt == "a lighthouse at dusk" and recipe.seed == 3 and recipe.preset == "dev"
    assert upgrade.returncode == 0, upgrade.stderr
    assert (empty_folder / "data" / "fluxbot.db").is_file()


def test_cli_errors_from_an_installed_package_are_one_line(installed: Path, empty_folder: Path) -> None:
    bad_db = clean_env(FLUXBOT_DATABASE_URL="postgresql+asyncpg://nobody@127.0.0.1:1/none")
    no_token = _run(installed, "run", cwd=empty_folder, env=clean_env())
    upgrade = _run(installed, "db", "upgrade", cwd=empty_folder, env=bad_db)

    assert upgrade.returncode == 1 and upgrade.stderr.count("\n") == 1, upgrade.stderr
    assert upgrade.stderr.startswith("fluxbot: cannot use the database")
    assert no_token.returncode == 2, no_token.stderr  # no token: says how to get one, draws a demo
    assert "discord.com/developers" in no_token.stderr
    assert (empty_folder / "fluxbot-demo.png").is_file()
