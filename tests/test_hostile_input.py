"""Property tests: any option value, any config text ends in a result or a clear error, never a crash."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from engine.api import GenerationRequest
from engine.catalog import Catalog
from engine.errors import ConfigError, EngineError, RequestError
from engine.presets import load_presets
from engine.resolve import RequestResolver
from engine.whitelist import load_whitelist
from tests.conftest import REPO

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
text = st.text(max_size=3000) | st.sampled_from(
    [
        "",
        " ",
        "dev",
        "schnell",
        "1024x1024",
        "16:9",
        "0:0",
        "../x",
        "99999x99999",
        "a" * 5000,
        "🔁" * 100,
        "\x00",
        "1e9x1e9",
    ]
)
numbers = st.none() | st.integers(min_value=-(2**70), max_value=2**70)
floats = st.none() | st.floats(allow_nan=True, allow_infinity=True)


@pytest.fixture(scope="module")
def resolver() -> RequestResolver:
    return RequestResolver(Catalog(load_presets(REPO / "config" / "presets.toml")))


def admit(resolver: RequestResolver, fields: dict[str, Any]) -> str:
    """What the /imagine handler does with its options: a request, or a message for the user."""
    try:
        request = GenerationRequest.model_validate({k: v for k, v in fields.items() if v is not None})
        resolver.resolve(request)
    except ValidationError as exc:
        return f"invalid: {exc.errors()[0]['msg']}"
    except RequestError as exc:
        assert str(exc) and len(str(exc)) < 500
        return f"refused: {exc}"
    return "ok"


@FAST
@given(
    prompt=text,
    preset=st.none() | text,
    size=st.none() | text,
    seed=numbers,
    steps=numbers,
    guidance=floats,
    lora=st.none() | text,
    weight=floats,
    batch=numbers,
)
def test_any_imagine_options_give_a_request_or_a_clear_refusal(
    resolver: RequestResolver,
    prompt: str,
    preset: str | None,
    size: str | None,
    seed: int | None,
    steps: int | None,
    guidance: float | None,
    lora: str | None,
    weight: float | None,
    batch: int | None,
) -> None:
    loras = [{"name": lora, "weight": weight}] if lora is not None else None
    outcome = admit(
        resolver,
        {
            "prompt": prompt,
            "preset": preset,
            "size": size,
            "seed": seed,
            "steps": steps,
            "guidance": guidance,
            "loras": loras,
            "batch_size": batch,
        },
    )

    assert outcome.startswith(("ok", "invalid:", "refused:"))


toml_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(10**6), 10**6)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
)
toml_values = toml_scalars | st.lists(toml_scalars, max_size=3)
table = st.dictionaries(
    st.sampled_from(
        [
            "steps",
            "steps_range",
            "guidance",
            "guidance_range",
            "width",
            "height",
            "aspects",
            "megapixels_range",
            "family",
            "file",
            "sha256",
            "max_weight",
            "default_weight",
            "loras",
            "size_multiple",
            "true_cfg",
            "bogus",
        ]
    ),
    toml_values,
    max_size=8,
)


def to_toml(data: dict[str, dict[str, Any]]) -> str:
    def render(value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, int | float):
            return repr(value)
        if isinstance(value, list):
            return "[" + ", ".join(render(v) for v in value if v is not None) + "]"
        return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'

    lines = []
    for name, fields in data.items():
        lines.append(f'["{name}"]')
        lines += [f"{key} = {render(v)}" for key, v in fields.items() if v is not None]
    return "\n".join(lines) + "\n"


@FAST
@given(
    data=st.dictionaries(
        st.text(min_size=1, max_size=12).filter(lambda s: '"' not in s and "\\" not in s and s.isprintable()),
        table,
        max_size=3,
    )
)
def test_any_presets_or_whitelist_file_loads_or_names_the_problem(
    tmp_path: Path, data: dict[str, Any]
) -> None:
    path = tmp_path / "data.toml"
    path.write_text(to_toml(data), encoding="utf-8")
    for load in (lambda: load_presets(path), lambda: load_whitelist(path)):
        try:
            load()
        except ConfigError as exc:
            assert str(exc).startswith(str(path))


@FAST
@given(quant=text, steps=text, port=text, model=text)
def test_any_settings_from_the_environment_load_or_fail_as_validation_errors(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, quant: str, steps: str, port: str, model: str
) -> None:
    from fluxbot.settings import Settings

    for key, value in (
        ("FLUXBOT_ENGINE__QUANT", quant),
        ("FLUXBOT_LIMITS__MAX_QUEUE", steps),
        ("FLUXBOT_METRICS_PORT", port),
        ("FLUXBOT_MODEL", model),
    ):
        if "\x00" in value:
            continue  # the OS refuses NUL in environment variables before we ever see it
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("FLUXBOT_CONFIG", str(tmp_path / "absent.toml"))
    with contextlib.suppress(ValidationError):  # the other outcome: settings that loaded
        Settings()


@given(name=text)
@settings(max_examples=200, deadline=None)
def test_lora_names_never_reach_the_filesystem(resolver: RequestResolver, name: str) -> None:
    try:
        request = GenerationRequest(prompt="a cat", loras=({"name": name},))  # type: ignore[arg-type]
    except ValidationError:
        return
    with pytest.raises(EngineError, match="not on the whitelist"):
        resolver.resolve(request)
