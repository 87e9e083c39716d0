"""one typed spec per job: the resolved DrawSpec replaces the stored request

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05 14:00:00

A stored request named a preset and left the rest to be resolved when the job ran; a spec is that
resolution, pinned. Each row is converted with what drew it: a finished job's recipe (final prompt,
true CFG, every LoRA with its sha256, strength, the cache that ran), and for what the recipe lacks
(and jobs that never ran) the presets and whitelist in use, passed in by fluxbot
(`config.attributes["fluxbot_catalog"]`; the shipped files otherwise), with the admins' changes to
them from the settings table. The conversion is written out here, not imported: a migration must
keep doing what it did when the code around it changes.
"""

from __future__ import annotations

import json
import tomllib
from importlib.resources import files
from typing import Any

import sqlalchemy as sa
from alembic import context, op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

jobs = sa.table(
    "jobs",
    sa.column("id", sa.Integer),
    sa.column("kind", sa.String),
    sa.column("parent_id", sa.Integer),
    sa.column("request", sa.JSON),
    sa.column("recipe", sa.JSON),
    sa.column("spec", sa.JSON),
)
settings = sa.table("settings", sa.column("key", sa.String), sa.column("value", sa.JSON))
IMAGE_KINDS = {"vary_subtle", "vary_strong", "upscale"}


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("spec", sa.JSON(), nullable=True))
    connection = op.get_bind()
    catalog = _catalog(connection)
    rows = connection.execute(
        sa.select(jobs.c.id, jobs.c.kind, jobs.c.parent_id, jobs.c.request, jobs.c.recipe)
    ).all()
    for job_id, kind, parent_id, request, recipe in rows:
        spec = to_spec(_json(request), _json(recipe), str(kind).lower(), parent_id, catalog)
        connection.execute(jobs.update().where(jobs.c.id == job_id).values(spec=spec))
    with op.batch_alter_table("jobs") as batch:
        batch.alter_column("spec", existing_type=sa.JSON(), nullable=False)
        batch.drop_column("request")


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("request", sa.JSON(), nullable=True))
    connection = op.get_bind()
    for job_id, spec in connection.execute(sa.select(jobs.c.id, jobs.c.spec)).all():
        connection.execute(jobs.update().where(jobs.c.id == job_id).values(request=to_request(_json(spec))))
    with op.batch_alter_table("jobs") as batch:
        batch.alter_column("request", existing_type=sa.JSON(), nullable=False)
        batch.drop_column("spec")


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def _catalog(connection: Any) -> dict[str, dict[str, dict[str, Any]]]:
    """Presets and whitelist entries by name, as dicts: fluxbot's (or the shipped files), then the
    admins' stored changes on top, as fluxbot applies them at start."""
    given = context.config.attributes.get("fluxbot_catalog")
    if given is not None:
        catalog = {"presets": dict(given["presets"]), "loras": dict(given["loras"])}
    else:
        shipped = files("engine.defaults")
        presets = tomllib.loads((shipped / "presets.toml").read_text())
        loras = tomllib.loads((shipped / "loras.toml").read_text())
        catalog = {"presets": presets, "loras": loras}
    for key, value in connection.execute(sa.select(settings.c.key, settings.c.value)).all():
        value = _json(value)
        if str(key).startswith("preset:"):
            catalog["presets"][key.removeprefix("preset:")] = value
        elif str(key).startswith("lora:"):
            name = key.removeprefix("lora:")
            if value.get("removed"):
                catalog["loras"].pop(name, None)
            else:
                catalog["loras"][name] = value
    return catalog


def to_spec(
    request: dict[str, Any],
    recipe: dict[str, Any] | None,
    kind: str,
    parent_id: int | None,
    catalog: dict[str, dict[str, dict[str, Any]]],
) -> dict[str, Any]:
    """One stored request (and the recipe of what it drew, if it ran) as a DrawSpec's JSON."""
    preset = catalog["presets"].get(str(request.get("preset")), {})
    width, height = (int(x) for x in str(request.get("size") or "1024x1024").lower().split("x"))
    init_image = request.get("init_image")
    mode = "edit" if request.get("kind") == "edit" else ("img2img" if init_image else "txt2img")
    if recipe:
        loras = [{k: lo[k] for k in ("name", "sha256", "weight")} for lo in recipe["loras"]]
        final_prompt, true_cfg, strength = recipe["final_prompt"], recipe["true_cfg"], recipe.get("strength")
        family = recipe.get("family", "flux1")
    else:
        loras, triggers = _loras(request, preset, catalog["loras"])
        missing = [w for w in triggers if w.lower() not in str(request["prompt"]).lower()]
        final_prompt = ", ".join([*missing, request["prompt"]])
        true_cfg = float(preset.get("true_cfg", 1.0))
        strength = request.get("strength")
        if mode == "img2img" and strength is None:
            strength = float(preset.get("strength", 0.7))
        family = preset.get("family", "flux1")
    return {
        "family": family,
        "mode": mode,
        "preset": str(request.get("preset") or "dev"),
        "prompt": request["prompt"],
        "final_prompt": final_prompt,
        "width": width,
        "height": height,
        "steps": int(request.get("steps") or preset.get("steps", 28)),
        "guidance": request.get("guidance"),
        "true_cfg": true_cfg,
        "sampler": "euler",
        "max_sequence_length": int(preset.get("max_sequence_length", 512)),
        "seed": int(request.get("seed") or 0),
        "batch_size": int(request.get("batch_size") or 1),
        "loras": loras if mode != "edit" else [],
        "init_image": init_image,
        "strength": strength if mode == "img2img" else None,
        "cache": request.get("cache") or "none",
        "origin": kind if kind else "imagine",
        "parent_job": request.get("parent_job") or parent_id,
    }


def _loras(
    request: dict[str, Any], preset: dict[str, Any], whitelist: dict[str, dict[str, Any]]
) -> tuple[list[dict[str, Any]], list[str]]:
    """A job that never ran: the preset's LoRAs and the asked ones, pinned by the whitelist's hashes."""
    chosen: list[tuple[str, float]] = [(pl["name"], float(pl["weight"])) for pl in preset.get("loras", [])]
    taken = {name for name, _ in chosen}
    for lora in request.get("loras") or []:
        if lora["name"] not in taken:
            weight = lora.get("weight")
            if weight is None:
                weight = whitelist.get(lora["name"], {}).get("default_weight", 1.0)
            chosen.append((lora["name"], float(weight)))
    loras, triggers = [], []
    for name, weight in chosen:
        entry = whitelist.get(name)
        if entry is None:  # removed since: the job fails when it runs, as it would have
            continue
        loras.append({"name": name, "sha256": entry["sha256"], "weight": weight})
        triggers += list(entry.get("trigger_words", []))
    return loras, triggers


def to_request(spec: dict[str, Any]) -> dict[str, Any]:
    """The request an older fluxbot stores, from a spec (for a downgrade)."""
    origin = spec.get("origin", "imagine")
    kind = "edit" if spec["mode"] == "edit" else (origin if origin in IMAGE_KINDS else None)
    return {
        "prompt": spec["prompt"],
        "preset": spec["preset"],
        "size": f"{spec['width']}x{spec['height']}",
        "seed": spec["seed"],
        "steps": spec["steps"],
        "guidance": spec["guidance"],
        "loras": [{"name": lo["name"], "weight": lo["weight"]} for lo in spec.get("loras", [])],
        "batch_size": spec.get("batch_size", 1),
        "init_image": spec.get("init_image"),
        "strength": spec.get("strength"),
        "kind": kind,
        "parent_job": spec.get("parent_job"),
        "cache": spec.get("cache", "none"),
    }
