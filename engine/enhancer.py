"""Prompt enhancement: a short prompt expanded into the detailed scene description FLUX draws best,
by an OpenAI-compatible chat endpoint the operator runs (Ollama, LM Studio, vLLM, llama.cpp's
server: `engine.prompt_enhancer = "http://127.0.0.1:11434/v1"`), called with the `openai` client.

An enhancement is made once per job and stored with it (DrawSpec.enhanced_prompt), so a rerun draws
the same pixels without asking again. A failing enhancer never fails the job: the engine draws the
prompt as written and the recipe says why (Recipe.enhance_note)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from PIL import Image

from engine.errors import EngineError
from engine.settings import EngineSettings
from engine.text import clean_text

# What the model is asked to do. Short on purpose: small local models follow short instructions.
SYSTEM_PROMPT = (
    "You rewrite prompts for the FLUX text-to-image model. Expand the user's prompt into one "
    "detailed paragraph of plain description: subject, setting, composition, lighting, colours, "
    "style and mood, in the order that matters most. Keep every element the user named and any "
    "quoted text exactly; add nothing they would not want. FLUX reads natural sentences, not tag "
    "lists or weights. Answer with the new prompt only, in English, under 120 words."
)
MAX_ENHANCED_CHARS = 1500  # about T5's 512 tokens; what is longer is cut at a sentence
_PREFIX = re.compile(r"^\s*(?:here is|here's|sure|prompt|enhanced prompt)[^:\n]{0,40}:\s*", re.IGNORECASE)


class EnhancerError(EngineError):
    """The enhancer gave no usable prompt (unreachable, timed out, refused, empty answer)."""


class PromptEnhancer(Protocol):
    @property
    def name(self) -> str:
        """What doctor and the logs say (endpoint and model, or the family's upsampler)."""
        ...

    def enhance(self, prompt: str, images: Sequence[Image.Image] = ()) -> str:
        """The expansion of `prompt`; `images`: an edit's reference images, in order (an enhancer
        that reads none refuses them with EnhancerError)."""
        ...


@dataclass
class EndpointEnhancer:
    """An OpenAI-compatible chat-completions endpoint."""

    base_url: str
    model: str
    api_key: str = "fluxbot"  # local servers ignore it; the client library requires one
    timeout_s: float = 30.0

    @property
    def name(self) -> str:
        return f"{self.model} at {self.base_url}"

    def enhance(self, prompt: str, images: Sequence[Image.Image] = ()) -> str:
        from openai import OpenAI

        if images:  # the resolver lets edits ask only an enhancer that reads pictures (FLUX.3's own)
            raise EnhancerError("the prompt enhancer expands text-to-image prompts, not edits")

        # One try, bounded: a job waits on this, and a failure only means drawing the prompt as written.
        client = OpenAI(base_url=self.base_url, api_key=self.api_key, timeout=self.timeout_s, max_retries=0)
        try:
            with client:
                answer = client.chat.completions.create(
                    model=self.model,
                    messages=[
                        {"role": "system", "content": SYSTEM_PROMPT},
                        {"role": "user", "content": prompt},
                    ],
                    temperature=0.7,
                )
                choices = answer.choices or []
                text = choices[0].message.content if choices and choices[0].message else None
        except Exception as exc:  # a server that is down, slow, or speaks something else: all the same here
            # What went wrong in a few words: the recipe (in a public PNG) never carries the
            # endpoint's address or its error body; the log has the whole error.
            raise EnhancerError("the prompt enhancer failed: {problem}", problem=_problem(exc)) from exc
        return tidy(text or "")


def tidy(text: str) -> str:
    """An LLM's answer as a prompt: no preamble ("Here is the prompt:"), no wrapping quotes, no
    control characters, within MAX_ENHANCED_CHARS. Raises EnhancerError when nothing is left."""
    text = clean_text(text).strip()
    text = _PREFIX.sub("", text).strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'“”":
        text = text[1:-1].strip()
    text = " ".join(text.split())
    if len(text) > MAX_ENHANCED_CHARS:
        cut = text[:MAX_ENHANCED_CHARS]
        text = cut[: cut.rfind(". ") + 1] if ". " in cut else cut
    if not text:
        raise EnhancerError("the prompt enhancer answered with an empty prompt")
    return text


def _problem(exc: Exception) -> str:
    from openai import APIConnectionError, APIStatusError, APITimeoutError

    if isinstance(exc, APITimeoutError):
        return "no answer in time"
    if isinstance(exc, APIConnectionError):
        return "not reachable"
    if isinstance(exc, APIStatusError):
        return f"HTTP {exc.status_code}"
    return f"an answer that is not a chat completion ({type(exc).__name__})"


def endpoint_enhancer(settings: EngineSettings) -> EndpointEnhancer | None:
    """The operator's endpoint, if one is set."""
    if not settings.prompt_enhancer:
        return None
    return EndpointEnhancer(
        base_url=settings.prompt_enhancer,
        model=settings.prompt_enhancer_model,
        api_key=settings.prompt_enhancer_key.get_secret_value()
        if settings.prompt_enhancer_key
        else "fluxbot",
        timeout_s=settings.prompt_enhancer_timeout_s,
    )
