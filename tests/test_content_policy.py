"""The pure parts of the trust boundary: the blocked-terms matcher, text cleaning, echo escaping and
log redaction (the Discord-level behaviour is in test_trust_boundaries)."""

from __future__ import annotations

import logging

import pytest

from bot import render
from bot.services.content_policy import BlockedTerms, normalize_term
from engine.api import GenerationRequest
from fluxbot.logs import RedactingFormatter, redact

BLOCKED = BlockedTerms.of(["nude", "blood bath", "ass"])


@pytest.mark.parametrize(
    "prompt",
    [
        "nude",
        "NUDE portrait",
        "N U D E",
        "n.u.d.e",
        "n-u-d-e cat",
        "nüde",
        "ｎｕｄｅ",  # full-width
        "𝐧𝐮𝐝𝐞",  # mathematical bold
        "nu\u200bde",  # zero-width space
        "nuuuude",
        "nud3",
        "$nude",
        "nиde".replace("и", "u"),
        "nudе",  # Cyrillic е
        "blood bath",
        "Blood-Bath",
        "a bloodbath",
        "a$$",
    ],
)
def test_obfuscated_terms_match(prompt: str) -> None:
    assert BLOCKED.find(prompt) is not None


@pytest.mark.parametrize(
    "prompt",
    [
        "a grapefruit",
        "a bass guitar",
        "as a cat",
        "assassin",
        "nudibranch",
        "a blood orange bath",
        "wow! nice",
    ],
)
def test_words_that_merely_contain_a_term_do_not(prompt: str) -> None:
    assert BLOCKED.find(prompt) is None


def test_terms_are_stored_normalized_and_removed_by_any_spelling() -> None:
    assert normalize_term("  Blood-BATH ") == "blood bath"
    assert BLOCKED.without("BLOOD   bath").terms == ("ass", "nude")
    assert BlockedTerms.of(["", "  ", "!!"]).terms == ()


def test_prompts_are_stored_without_control_bidi_or_invisible_characters() -> None:
    request = GenerationRequest(prompt="a\x00 cat\u202e on\u2066 a\u200b mat\t\nnow 👩\u200d🚀")
    assert request.prompt == "a cat on a mat  now 👩\u200d🚀"
    with pytest.raises(ValueError, match="empty"):
        GenerationRequest(prompt="\x00\u202e\u200b")


def test_echoed_text_is_inert() -> None:
    text = render.short("[free nitro](https://evil.example/claim) @everyone <@123456789012345678> **b** `c`")
    assert "](https://" not in text and "https://evil" not in text
    assert "@everyone" not in text and "<@123456789012345678>" not in text
    assert "**b**" not in text and "`c`" not in text
    assert "free nitro" in text  # still readable


def test_tokens_are_redacted_from_log_lines() -> None:
    line = (
        "POST /api/v10/interactions/123/aW50ZXJhY3Rpb246MTIzOnNlY3JldA/callback with "
        "{'token': 'tok-1'} PATCH /webhooks/9/tok-2/messages/@original Authorization: Bot "
        "MTIzNDU2Nzg5MDEyMzQ1Njc4.OTAx.abc and later aW50ZXJhY3Rpb246OTk5Omxhc3Q"
    )
    redacted = redact(line)
    for secret in ("aW50ZXJhY3Rpb246", "tok-1", "tok-2", "MTIzNDU2Nzg5MDEyMzQ1Njc4"):
        assert secret not in redacted
    formatter = RedactingFormatter(logging.Formatter("%(message)s"))
    record = logging.LogRecord("discord.http", logging.DEBUG, "", 0, "%s", ("/webhooks/1/tok-3/x",), None)
    assert formatter.format(record) == "/webhooks/1/[redacted]/x"
