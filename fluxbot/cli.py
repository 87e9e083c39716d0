"""The `fluxbot` command: imagine (offline generation) and doctor; bad input is one line and exit 1."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from pydantic import ValidationError

from engine.api import GenerationRequest, LoraChoice, StepProgress
from engine.errors import EngineError, first_problem
from fluxbot.logs import configure as configure_logging
from fluxbot.logs import quiet as quiet_loggers
from fluxbot.settings import Settings

log = logging.getLogger("fluxbot")


def _lora_arg(text: str) -> LoraChoice:
    name, _, weight = text.partition(":")
    try:
        return LoraChoice(name=name, weight=float(weight) if weight else None)
    except (ValueError, ValidationError) as exc:
        raise argparse.ArgumentTypeError(f"--lora takes NAME or NAME:WEIGHT, got {text!r}") from exc


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fluxbot", description="A Discord image studio on one FLUX engine.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    imagine = sub.add_parser("imagine", help="generate an image offline, no Discord needed")
    imagine.add_argument("prompt")
    imagine.add_argument("--preset", help="default: the first preset for the model's family (dev)")
    imagine.add_argument("--seed", type=int)
    imagine.add_argument("--steps", type=int)
    imagine.add_argument("--guidance", type=float)
    imagine.add_argument("--size", help="WxH (e.g. 1024x768) or an aspect such as 16:9")
    imagine.add_argument("--lora", action="append", type=_lora_arg, default=[], metavar="NAME[:WEIGHT]")
    imagine.add_argument("--batch", type=int, default=1, help="images from consecutive seeds")
    imagine.add_argument("--out", type=Path, help="PNG path (default fluxbot-<seed>.png)")
    imagine.add_argument("--image", type=Path, help="draw from this PNG/JPEG/WebP (img2img)")
    imagine.add_argument("--strength", type=float, help="with --image: how much is redrawn (0-1)")
    imagine.add_argument(
        "--enhance",
        action=argparse.BooleanOptionalAction,
        help="expand the prompt with engine.prompt_enhancer first (default: the preset's)",
    )
    imagine.add_argument(
        "--edit",
        action="store_true",
        help="with --image: the prompt is a Kontext instruction (engine.kontext)",
    )

    sub.add_parser("doctor", help="check torch/CUDA, VRAM, quant tier, model files and LoRAs")
    sub.add_parser("run", help="start the Discord bot (without a token: how to get one, and an offline demo)")
    worker = sub.add_parser(
        "worker", help="start an engine worker for the bot (needs FLUXBOT_QUEUE=redis://...)"
    )
    worker.add_argument(
        "--name", help="its name in /admin workers (default: workers.name, else <host>-<pid>)"
    )
    db = sub.add_parser("db", help="database maintenance")
    db.add_argument("action", choices=["upgrade"], help="apply migrations up to the newest")
    return parser


# What the "engine" extra brings: a bot in scale-out mode runs without any of it.
ENGINE_PACKAGES = {
    "torch",
    "diffusers",
    "transformers",
    "accelerate",
    "peft",
    "safetensors",
    "gguf",
    "tokenizers",
}
NO_ENGINE = "the engine: pip install 'fluxbot[engine]' (a bot with queue = redis://... runs without it)"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(logging.INFO if args.verbose else logging.WARNING, json_lines=False)
    if not args.verbose:
        # arq logs each retry while Redis is unreachable; the one-line error below says it once.
        quiet_loggers("arq.connections")
    engine_here = args.command in ("imagine", "worker", "doctor")
    try:
        settings = Settings()
        if engine_here or (args.command == "run" and not settings.uses_redis):
            _quiet_libraries(args.verbose)  # only where the engine runs: a scale-out bot imports no torch
        if args.command == "imagine":
            return _imagine(args, settings)
        if args.command == "run":
            return _run(settings)
        if args.command == "worker":
            return _worker(settings, args.name)
        if args.command == "db":
            return _db(settings)
        return _doctor(settings)
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in ENGINE_PACKAGES:
            raise
        print(f"fluxbot: {args.command} needs {NO_ENGINE} ({exc.name} is not installed)", file=sys.stderr)
    except ValidationError as exc:
        print(f"fluxbot: {first_problem(exc)!s}", file=sys.stderr)
    except EngineError as exc:
        print(f"fluxbot: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        print("fluxbot: interrupted", file=sys.stderr)
    except OSError as exc:  # an unwritable data_dir or --out folder, a full disk: the operator's to fix
        print(f"fluxbot: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
    return 1


def _imagine(args: argparse.Namespace, settings: Settings) -> int:
    from tqdm import tqdm

    from engine.engine import FluxEngine
    from engine.input_image import normalize_input_image
    from engine.png import save_png
    from engine.resolve import RequestResolver
    from engine.sources import locate_model, model_family

    if args.out is not None and args.out.suffix.lower() != ".png":
        raise EngineError(f"--out must name a .png file, got {args.out}")
    source = None
    if args.image is not None:
        try:
            data = args.image.read_bytes()
        except OSError as exc:
            raise EngineError(f"--image: cannot read {args.image} ({exc.strerror})") from None
        limits = settings.images
        try:
            source = normalize_input_image(
                data,
                max_bytes=int(limits.max_input_mb * 1e6),
                max_pixels=int(limits.max_input_megapixels * 1e6),
            )
        except EngineError as exc:
            raise EngineError(f"--image: {exc}") from None
    elif args.strength is not None or args.edit:
        raise EngineError("--strength and --edit need --image")
    if args.edit and settings.engine.kontext is None:  # refused before minutes of model loading
        raise EngineError(
            '--edit needs FLUX.1 Kontext: set engine.kontext = "<folder, .safetensors or .gguf>"'
        )
    request = GenerationRequest(
        prompt=args.prompt,
        preset=args.preset or ("kontext" if args.edit else None),
        size=args.size or (f"{source.width}x{source.height}" if args.edit and source else None),
        seed=args.seed,
        steps=args.steps,
        guidance=args.guidance,
        loras=tuple(args.lora),
        batch_size=args.batch,
        init_image=source.sha256 if source else None,
        strength=args.strength,
        mode="edit" if args.edit else None,
        enhance=args.enhance,
    )
    # Bad input is refused before minutes of loading, against the family the model's files say.
    family = model_family(locate_model(settings.engine, settings.data_dir, build=False))
    RequestResolver.from_settings(settings.engine, family).resolve(request)
    print("loading the model (once per process)...", file=sys.stderr)
    engine = FluxEngine.load(settings.engine, settings.data_dir)
    resolution = engine.resolver.resolve(request)
    for warning in resolution.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    spec = resolution.spec
    if spec.enhance and engine.enhancer is not None:
        print(f"enhancing the prompt ({engine.enhancer.name})...", file=sys.stderr)
    with tqdm(total=spec.steps, desc="denoising", unit="step", file=sys.stderr) as bar:

        def on_step(progress: StepProgress) -> None:
            bar.update(progress.step - bar.n)

        (result,) = engine.draw([spec], on_step=on_step, init_image=source.png if source else None)
    for note in result.warnings:
        print(f"warning: {note}", file=sys.stderr)
    if result.recipes[0].enhanced_prompt:
        print(f"enhanced prompt: {result.recipes[0].enhanced_prompt}", file=sys.stderr)
    for index, (image, recipe) in enumerate(zip(result.images, result.recipes, strict=True)):
        path = _out_path(args.out, recipe.seed, index, len(result.images))
        save_png(image, recipe, path)
        print(
            f"{path}  seed {recipe.seed}  {recipe.width}x{recipe.height}  {recipe.steps} steps  "
            f"{result.timings.total_s:.1f}s"
        )
    return 0


NO_TOKEN = (
    "no Discord token: create an application at https://discord.com/developers/applications, "
    "copy its bot token (Bot > Reset Token) and set FLUXBOT_DISCORD_TOKEN=... (or discord_token in "
    "config/fluxbot.toml)"
)
DEMO_PROMPT = "a red fox in a snowy forest, cinematic"


def _run(settings: Settings) -> int:
    if settings.discord_token is None:
        print(f"fluxbot: {NO_TOKEN}", file=sys.stderr)
        print(f'meanwhile, offline: fluxbot imagine "{DEMO_PROMPT}"', file=sys.stderr)
        demo = build_parser().parse_args(["imagine", DEMO_PROMPT, "--seed", "1", "--out", "fluxbot-demo.png"])
        _imagine(demo, settings)
        return 2
    import asyncio

    import aiohttp
    import discord

    from bot.client import run_bot

    configure_logging(settings.log_level.upper(), json_lines=settings.log_json)
    try:
        with _services_reachable(settings):
            asyncio.run(run_bot(settings))
    except discord.LoginFailure as exc:
        raise EngineError(f"Discord refused the token in FLUXBOT_DISCORD_TOKEN ({exc})") from exc
    except (aiohttp.ClientError, OSError) as exc:
        raise EngineError(f"cannot reach Discord at {settings.discord_api_base}: {exc}") from exc
    return 0


def _worker(settings: Settings, name: str | None) -> int:
    import asyncio

    from bot.worker import run_worker

    if not settings.uses_redis:
        raise EngineError("fluxbot worker serves a bot through Redis: set FLUXBOT_QUEUE=redis://host:6379/0")
    configure_logging(settings.log_level.upper(), json_lines=settings.log_json)
    with _services_reachable(settings):
        asyncio.run(run_worker(settings, name))
    return 0


@contextlib.contextmanager
def _services_reachable(settings: Settings) -> Iterator[None]:
    """Redis or the database away at start: one line naming which, not a traceback."""
    import redis.exceptions
    import sqlalchemy.exc

    try:
        yield
    except redis.exceptions.RedisError as exc:
        raise EngineError(f"cannot reach Redis at {_without_password(settings.queue)}: {exc}") from exc
    except sqlalchemy.exc.DBAPIError as exc:
        url = _without_password(settings.resolved_database_url)
        raise EngineError(f"cannot use the database at {url}: {exc.orig}") from exc


def _without_password(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not an SQLAlchemy URL (redis://...): drop any user:password@
        scheme, _, rest = url.partition("://")
        return f"{scheme}://{rest.rpartition('@')[2]}"


def _db(settings: Settings) -> int:
    from alembic.util import CommandError

    from bot.store.database import upgrade_database

    try:
        with _services_reachable(settings):
            upgrade_database(settings.resolved_database_url)
    except CommandError as exc:  # alembic: a missing revision, a broken script folder
        raise EngineError(f"cannot migrate the database: {exc}") from exc
    except OSError as exc:  # the server is not there (asyncpg raises it before any DBAPI error)
        url = _without_password(settings.resolved_database_url)
        raise EngineError(f"cannot use the database at {url}: {exc}") from exc
    print(f"database at the newest schema: {settings.resolved_database_url}")
    return 0


def _out_path(out: Path | None, seed: int, index: int, count: int) -> Path:
    if out is None:
        return Path(f"fluxbot-{seed}.png")
    return out if count == 1 else out.with_name(f"{out.stem}-{index + 1}{out.suffix}")


def _doctor(settings: Settings) -> int:
    from engine.doctor import run_doctor

    report = run_doctor(settings.engine, settings.data_dir)
    print(report.render())
    return 0 if report.ok else 1


def _quiet_libraries(verbose: bool) -> None:
    # diffusers/transformers print load progress bars and advisory warnings; the CLI shows its own bar.
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    if not verbose:
        diffusers.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()


if __name__ == "__main__":
    sys.exit(main())
